// Flash-style attention forward: O = softmax(Q K^T * scale) V with an online softmax, so the
// N x N score matrix never leaves registers.
//
// Layout: q [B, H, Nq, D], k and v [B, H, Nk, D] with arbitrary (16-byte aligned) strides over
// b, h and n and a contiguous head dim; o is written through strides (o_sb, o_sh, o_sn): either a
// contiguous [B, H, Nq, D] or the heads merged, [B, Nq, H * D]. Causal masking lets query i see
// keys 0 ..= i + (Nk - Nq).
//
// Each warp owns 16 query rows; a block of WARPS warps owns BR = 16 * WARPS rows and walks the keys
// in tiles of BC. Q fragments stay in registers for the whole walk; S = Q K^T and O += P V use
// tensor-core mma.sync with f32 accumulators (m16n8k16 on sm_80+, two m16n8k8 on sm_75, which
// has no m16n8k16 for f16). K and V tiles go through shared memory, padded by 16 bytes per row so
// that ldmatrix is free of bank conflicts:
//   sm_80+: cp.async into a two-stage ring, BC = 64 (the next tile loads while this one computes);
//   sm_75:  plain loads, one stage, BC = 32 (17 KB at D = 128: several blocks fit the T4's 64 KB
//           of shared memory per SM).
// Q is staged through the last K/V stage. Shared memory = stages * 2 * BC * (D + 8) * 2 bytes; the
// host side (src/cuda.rs) computes the same size from the build's compute capability: keep the
// two in step.
#include "common.cuh"

using namespace paw;

namespace {

#ifdef PAW_SM80
constexpr int kStages = 2;
constexpr int kBc = 64;
#else
constexpr int kStages = 1;
constexpr int kBc = 32;
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                        uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                          uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// c += a (16x16, row) * b (16x8, col), f32 accumulators.
template <typename T> struct Mma;

template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#ifdef PAW_SM80
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    // m16n8k16 = two m16n8k8 over the two k halves (registers a0/a1 + b0, then a2/a3 + b1).
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

#ifdef PAW_SM80
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
#endif

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte copy global -> shared; rows past the end are zero-filled (V must hold zeros there: the
// masked probabilities are 0, and 0 * garbage could be NaN).
__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
#ifdef PAW_SM80
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(n));
#else
  uint4 v = valid ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
  *reinterpret_cast<uint4*>(dst) = v;
#endif
}

__device__ __forceinline__ void cp_commit() {
#ifdef PAW_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N> __device__ __forceinline__ void cp_wait() {
#ifdef PAW_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Copy rows [row0, row0 + ROWS) x D of a strided [n, D] matrix into shared memory (row stride LDS).
template <typename T, int ROWS, int D, int LDS, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, long long stride_n, int row0, int n) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * CPR; i += NT) {
    const int r = i / CPR, c = i % CPR;
    const int row = row0 + r;
    const bool valid = row < n;
    cp16(s + r * LDS + c * 8, g + (valid ? (long long)row * stride_n : 0) + c * 8, valid);
  }
}

template <typename T, int D, int WARPS, bool CAUSAL>
__device__ __forceinline__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k,
                                          const T* __restrict__ v, T* __restrict__ o, int H,
                                          int nq, int nk, long long q_sb, long long q_sh,
                                          long long q_sn, long long k_sb, long long k_sh,
                                          long long k_sn, long long v_sb, long long v_sh,
                                          long long v_sn, long long o_sb, long long o_sh,
                                          long long o_sn, float scale_log2) {
  constexpr int NT = WARPS * 32;
  constexpr int BR = 16 * WARPS;
  constexpr int BC = kBc;
  constexpr int LDS = D + 8;
  constexpr int KS = D / 16;   // k16 steps over the head dim
  constexpr int NS = BC / 8;   // n8 tiles of S
  constexpr int NO = D / 8;    // n8 tiles of O

  // Shared memory: kStages stages of [K tile | V tile]. Q is staged once through the last stage
  // (which the first prefetch overwrites only after the Q fragments are in registers).
  static_assert(BR <= 2 * BC, "the Q tile must fit one K/V stage");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sbase = reinterpret_cast<T*>(smem_raw);
  T* const sQ = sbase + (kStages - 1) * 2 * BC * LDS;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Causal blocks near the end do the most work: start them first.
  const int qt = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int hh = blockIdx.y, bb = blockIdx.z;
  const int q0 = qt * BR;
  q += bb * q_sb + hh * q_sh;
  k += bb * k_sb + hh * k_sh;
  v += bb * v_sb + hh * v_sh;
  o += bb * o_sb + hh * o_sh;
  const int offset = nk - nq;

  int n_tiles = (nk + BC - 1) / BC;
  if (CAUSAL) n_tiles = min(n_tiles, (q0 + BR - 1 + offset) / BC + 1);

  uint32_t qf[KS][4];
  load_tile<T, BR, D, LDS, NT>(sQ, q, q_sn, q0, nq);
  cp_commit();
  if (kStages == 2 && n_tiles > 0) {
    load_tile<T, BC, D, LDS, NT>(sbase, k, k_sn, 0, nk);
    load_tile<T, BC, D, LDS, NT>(sbase + BC * LDS, v, v_sn, 0, nk);
    cp_commit();
    cp_wait<1>();
  } else {
    cp_wait<0>();
  }
  __syncthreads();
  {
    const int r = warp * 16 + (lane & 15);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const uint32_t a = smem_u32(sQ + r * LDS + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(a, qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
    }
  }
  __syncthreads();  // the Q staging area is overwritten by the next K/V load

  float acc[NO][4];
#pragma unroll
  for (int j = 0; j < NO; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY};
  float l_i[2] = {0.f, 0.f};
  const int row_lo = q0 + warp * 16 + (lane >> 2);  // this thread's rows: row_lo and row_lo + 8

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = kStages == 2 ? (t & 1) : 0;
    if (kStages == 2) {
      if (t + 1 < n_tiles) {
        T* const nxt = sbase + ((t + 1) & 1) * 2 * BC * LDS;
        load_tile<T, BC, D, LDS, NT>(nxt, k, k_sn, (t + 1) * BC, nk);
        load_tile<T, BC, D, LDS, NT>(nxt + BC * LDS, v, v_sn, (t + 1) * BC, nk);
        cp_commit();
        cp_wait<1>();
      } else {
        cp_wait<0>();
      }
    } else {
      load_tile<T, BC, D, LDS, NT>(sbase, k, k_sn, t * BC, nk);
      load_tile<T, BC, D, LDS, NT>(sbase + BC * LDS, v, v_sn, t * BC, nk);
    }
    __syncthreads();
    const T* Ks = sbase + stage * 2 * BC * LDS;
    const T* Vs = Ks + BC * LDS;

    // S = Q K^T for this warp's 16 rows x BC keys.
    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
      for (int jj = 0; jj < NS / 2; ++jj) {
        const int r = jj * 16 + (lane >> 4) * 8 + (lane & 7);
        const int c = kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t b0, b1, b2, b3;
        ldsm_x4(smem_u32(Ks + r * LDS + c), b0, b1, b2, b3);
        Mma<T>::run(s[2 * jj], qf[kk], b0, b1);
        Mma<T>::run(s[2 * jj + 1], qf[kk], b2, b3);
      }
    }

    const int k0 = t * BC;
    const bool need_mask = (k0 + BC > nk) || (CAUSAL && k0 + BC - 1 > q0 + offset);
    if (need_mask) {
#pragma unroll
      for (int j = 0; j < NS; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + j * 8 + (lane & 3) * 2 + (e & 1);
          const int row = row_lo + (e >> 1) * 8;
          const bool ok = key < nk && (!CAUSAL || key <= row + offset);
          if (!ok) s[j][e] = -INFINITY;
        }
      }
    }

    // Online softmax in the log2 domain; rows r = 0 (row_lo) and 1 (row_lo + 8).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NS; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_i[r], mx * scale_log2);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2_approx(m_i[r] - m_use);
      m_i[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        s[j][2 * r] = exp2_approx(fmaf(s[j][2 * r], scale_log2, -m_use));
        s[j][2 * r + 1] = exp2_approx(fmaf(s[j][2 * r + 1], scale_log2, -m_use));
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      l_i[r] = l_i[r] * alpha + sum;  // per-thread partial sum; reduced over the quad at the end
#pragma unroll
      for (int j = 0; j < NO; ++j) {
        acc[j][2 * r] *= alpha;
        acc[j][2 * r + 1] *= alpha;
      }
    }

    // O += P V. The S accumulator layout of two n8 tiles is the A-fragment layout of one k16 step.
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int jj = 0; jj < NO / 2; ++jj) {
        const int r = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int c = jj * 16 + (lane >> 4) * 8;
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(smem_u32(Vs + r * LDS + c), b0, b1, b2, b3);
        Mma<T>::run(acc[2 * jj], a, b0, b1);
        Mma<T>::run(acc[2 * jj + 1], a, b2, b3);
      }
    }
    __syncthreads();  // the next iteration overwrites the buffers read above
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row_lo + r * 8;
    if (row < nq) {
      T* orow = o + (long long)row * o_sn + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < NO; ++j) {
        *reinterpret_cast<uint32_t*>(orow + j * 8) =
            Mma<T>::pack(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
      }
    }
  }
}

}  // namespace

#define FLASH(T, SUF, D, W, CAUSAL, CSUF)                                                        \
  extern "C" __global__ void __launch_bounds__(W * 32)                                          \
      flash_fwd_##SUF##_d##D##_w##W##_##CSUF(                                                   \
          const T* q, const T* k, const T* v, T* o, int H, int nq, int nk, long long q_sb,       \
          long long q_sh, long long q_sn, long long k_sb, long long k_sh, long long k_sn,        \
          long long v_sb, long long v_sh, long long v_sn, long long o_sb, long long o_sh,        \
          long long o_sn, float scale_log2) {                                                    \
    flash_fwd<T, D, W, CAUSAL>(q, k, v, o, H, nq, nk, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb,  \
                               v_sh, v_sn, o_sb, o_sh, o_sn, scale_log2);                        \
  }

#define FLASH_BOTH(T, SUF, D, W) \
  FLASH(T, SUF, D, W, false, full) \
  FLASH(T, SUF, D, W, true, causal)

#define FLASH_DTYPE(T, SUF)   \
  FLASH_BOTH(T, SUF, 128, 4)  \
  FLASH_BOTH(T, SUF, 64, 4)   \
  FLASH_BOTH(T, SUF, 32, 4)

// 4 warps (64 query rows) per block. Measured on the H100 at 1x24x4608x128, 8 warps (128 rows,
// half the K/V traffic from L2) ran 5% slower (1.08 vs 1.02 ms), so only 4 are built.
FLASH_DTYPE(__half, f16)
#ifdef PAW_SM80
FLASH_DTYPE(__nv_bfloat16, bf16)
#endif
