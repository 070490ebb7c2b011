// Memory-bound fused ops of the FLUX / Florence-2 hot path:
//   ln_mod      LayerNorm (no affine) over the last dim, optionally followed by (1 + scale) * n + shift
//   gated_res   x + gate * y, optionally clipped to the finite f16 range
//   bias_gelu   gelu_tanh(x + bias)
//   rms_rope    RMSNorm over the head dim (optional) then rotary embedding on interleaved pairs
// Each kernel issues all of its loads before the first dependent computation, so that enough
// bytes are in flight to cover memory latency.
// All arithmetic is f32; inputs and outputs are f32, f16 or (compute capability >= 8.0) bf16.
#include "common.cuh"

using namespace paw;

namespace {

// One block per row of C elements. Each thread keeps NV vectors of VW elements in registers, so
// the row is read from memory once. shift/scale rows are selected by `row / rows_per_mod`, with a
// stride of `mod_stride` elements between consecutive modulation rows (0 = one row for all).
template <typename T, int VW, int NV>
__device__ __forceinline__ void ln_mod_impl(const T* __restrict__ x, const T* __restrict__ shift,
                                            const T* __restrict__ scale, T* __restrict__ out, int C,
                                            int rows_per_mod, long long mod_stride, float eps) {
  __shared__ float red[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * C;
  T* orow = out + row * C;
  const long long mrow = (row / rows_per_mod) * mod_stride;
  const bool has_mod = shift != nullptr;
  // Issue every load (the row and its modulation vectors) before the first reduction.
  Raw<T, VW> v[NV], sh[NV], sc[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VW;
    if (c < C) {
      v[i].load(xr + c);
      if (has_mod) {
        sh[i].load(shift + mrow + c);
        sc[i].load(scale + mrow + c);
      }
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VW;
    if (c < C) {
#pragma unroll
      for (int e = 0; e < VW; ++e) sum += v[i].get(e);
    }
  }
  const float mean = block_sum(sum, red) / C;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VW;
    if (c < C) {
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const float d = v[i].get(e) - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, red) / C + eps);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VW;
    if (c < C) {
      Vec<T, VW> o;
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const float n = (v[i].get(e) - mean) * rstd;
        o.v[e] = has_mod ? n * (1.f + sc[i].get(e)) + sh[i].get(e) : n;
      }
      o.store(orow + c);
    }
  }
}

// out = x + gate * y over `n` elements; the gate row is selected like ln_mod's modulation rows.
template <typename T, int VW>
__device__ __forceinline__ void gated_res_impl(const T* __restrict__ x, const T* __restrict__ gate,
                                               const T* __restrict__ y, T* __restrict__ out,
                                               long long n, int C, long long rows_per_gate,
                                               long long gate_stride, int clamp) {
  const long long nv = n / VW;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < nv;
       i += (long long)gridDim.x * blockDim.x) {
    const long long e0 = i * VW;
    const long long row = e0 / C;
    const int c = (int)(e0 - row * C);
    Vec<T, VW> a, b, g;
    a.load(x + e0);
    b.load(y + e0);
    g.load(gate + (row / rows_per_gate) * gate_stride + c);
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      float r = a.v[e] + g.v[e] * b.v[e];
      if (clamp) r = r > 65504.f ? 65504.f : (r < -65504.f ? -65504.f : r);  // NaN stays NaN
      a.v[e] = r;
    }
    a.store(out + e0);
  }
}

__device__ __forceinline__ float gelu_tanh(float v) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * v * (1.f + tanhf(k * v * (1.f + 0.044715f * v * v)));
}

template <typename T, int VW>
__device__ __forceinline__ void bias_gelu_impl(const T* __restrict__ x, const T* __restrict__ bias,
                                               T* __restrict__ out, long long n, int C) {
  const long long nv = n / VW;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < nv;
       i += (long long)gridDim.x * blockDim.x) {
    const long long e0 = i * VW;
    const int c = (int)(e0 % C);
    Vec<T, VW> a, b;
    a.load(x + e0);
    b.load(bias + c);
#pragma unroll
    for (int e = 0; e < VW; ++e) a.v[e] = gelu_tanh(a.v[e] + b.v[e]);
    a.store(out + e0);
  }
}

template <typename T> struct Pair;
template <> struct Pair<float> {
  using V = float2;
  static __device__ __forceinline__ float2 ld(const float* p) { return *reinterpret_cast<const float2*>(p); }
  static __device__ __forceinline__ void st(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
};
template <> struct Pair<__half> {
  static __device__ __forceinline__ float2 ld(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
  }
  static __device__ __forceinline__ void st(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
};
#ifdef PAW_SM80
template <> struct Pair<__nv_bfloat16> {
  static __device__ __forceinline__ float2 ld(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
};
#endif

// One warp per position (b, n) and HC consecutive heads: the position's cos/sin (and the weight)
// are loaded once and reused for every head, and all HC rows are loaded before the first
// reduction, so several rows' worth of memory traffic is in flight. Lane l handles the pairs
// l, l + 32, ... (at most 32 * MAXP pairs, i.e. D <= 64 * MAXP). x rows may be strided (sb, sh, sn
// in elements, the head dim contiguous); out is [B, H, N, D]. With `norm`:
// n = round_T(x * rsqrt(mean(x^2) + eps) * w), then RoPE in f32 on n.
template <typename T, int MAXP, int HC>
__device__ __forceinline__ void rms_rope_impl(const T* __restrict__ x, const T* __restrict__ w,
                                              const float* __restrict__ cosv,
                                              const float* __restrict__ sinv, T* __restrict__ out,
                                              int H, int N, int D, long long sb, long long sh,
                                              long long sn, long long positions, float eps,
                                              int norm) {
  const int lane = threadIdx.x & 31;
  const int chunks = (H + HC - 1) / HC;
  const long long wid = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (wid >= positions * chunks) return;
  const long long pos = wid / chunks;
  const int h0 = (int)(wid % chunks) * HC;
  const long long b = pos / N;
  const int n = (int)(pos % N);
  const int P = D / 2;
  const T* xp = x + b * sb + n * sn;
  float2 a[HC][MAXP], cs[MAXP], wv[MAXP];
#pragma unroll
  for (int r = 0; r < HC; ++r) {
    if (h0 + r < H) {
#pragma unroll
      for (int i = 0; i < MAXP; ++i) {
        const int p = lane + 32 * i;
        if (p < P) a[r][i] = Pair<T>::ld(xp + (long long)(h0 + r) * sh + 2 * p);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MAXP; ++i) {
    const int p = lane + 32 * i;
    if (p < P) {
      cs[i] = make_float2(__ldg(cosv + (long long)n * P + p), __ldg(sinv + (long long)n * P + p));
      wv[i] = norm ? Pair<T>::ld(w + 2 * p) : make_float2(1.f, 1.f);
    }
  }
#pragma unroll
  for (int r = 0; r < HC; ++r) {
    if (h0 + r >= H) break;
    float rstd = 1.f;
    if (norm) {
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < MAXP; ++i)
        if (lane + 32 * i < P) ss += a[r][i].x * a[r][i].x + a[r][i].y * a[r][i].y;
      rstd = rsqrtf(warp_sum(ss) / D + eps);
    }
    T* orow = out + ((b * H + h0 + r) * N + n) * (long long)D;
#pragma unroll
    for (int i = 0; i < MAXP; ++i) {
      const int p = lane + 32 * i;
      if (p < P) {
        float n0 = a[r][i].x, n1 = a[r][i].y;
        if (norm) {
          // The normed values are rounded to the activation dtype before RoPE (as diffusers does).
          n0 = to_f(from_f<T>(n0 * rstd * wv[i].x));
          n1 = to_f(from_f<T>(n1 * rstd * wv[i].y));
        }
        const float c = cs[i].x, s = cs[i].y;
        Pair<T>::st(orow + 2 * p, n0 * c - n1 * s, n1 * c + n0 * s);
      }
    }
  }
}

}  // namespace

#define LN_MOD(NAME, T, VW)                                                                    \
  extern "C" __global__ void NAME(const T* x, const T* shift, const T* scale, T* out, int C,   \
                                  int rows_per_mod, long long mod_stride, float eps) {         \
    ln_mod_impl<T, VW, 2>(x, shift, scale, out, C, rows_per_mod, mod_stride, eps);             \
  }
#define GATED_RES(NAME, T, VW)                                                                 \
  extern "C" __global__ void NAME(const T* x, const T* gate, const T* y, T* out, long long n,  \
                                  int C, long long rows_per_gate, long long gate_stride,       \
                                  int clamp) {                                                 \
    gated_res_impl<T, VW>(x, gate, y, out, n, C, rows_per_gate, gate_stride, clamp);           \
  }
#define BIAS_GELU(NAME, T, VW)                                                                 \
  extern "C" __global__ void NAME(const T* x, const T* bias, T* out, long long n, int C) {     \
    bias_gelu_impl<T, VW>(x, bias, out, n, C);                                                 \
  }
#define RMS_ROPE(NAME, T, MAXP)                                                                \
  extern "C" __global__ void NAME(const T* x, const T* w, const float* cosv, const float* sinv, \
                                  T* out, int H, int N, int D, long long sb, long long sh,     \
                                  long long sn, long long positions, float eps, int norm) {    \
    rms_rope_impl<T, MAXP, 4>(x, w, cosv, sinv, out, H, N, D, sb, sh, sn, positions, eps, norm); \
  }

#define ALL_OPS(SUF, T)                       \
  LN_MOD(ln_mod_v_##SUF, T, 16 / sizeof(T))   \
  LN_MOD(ln_mod_s_##SUF, T, 1)                \
  GATED_RES(gated_res_v_##SUF, T, 16 / sizeof(T)) \
  GATED_RES(gated_res_s_##SUF, T, 1)          \
  BIAS_GELU(bias_gelu_v_##SUF, T, 16 / sizeof(T)) \
  BIAS_GELU(bias_gelu_s_##SUF, T, 1)          \
  RMS_ROPE(rms_rope_p1_##SUF, T, 1)          \
  RMS_ROPE(rms_rope_p2_##SUF, T, 2)          \
  RMS_ROPE(rms_rope_p4_##SUF, T, 4)

ALL_OPS(f32, float)
ALL_OPS(f16, __half)
#ifdef PAW_SM80
ALL_OPS(bf16, __nv_bfloat16)
#endif
