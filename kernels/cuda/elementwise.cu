// Memory-bound fused ops of the FLUX / Florence-2 hot path:
//   ln_mod      LayerNorm (no affine) over the last dim, optionally followed by (1 + scale) * n + shift
//   gated_res   x + gate * y, optionally clipped to the finite f16 range
//   bias_gelu   gelu_tanh(x + bias)
//   rms_rope    RMSNorm over the head dim (optional) then rotary embedding on interleaved pairs
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
  Vec<T, VW> v[NV];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VW;
    if (c < C) {
      v[i].load(xr + c);
#pragma unroll
      for (int e = 0; e < VW; ++e) sum += v[i].v[e];
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
        const float d = v[i].v[e] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, red) / C + eps);
  const long long mrow = (row / rows_per_mod) * mod_stride;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VW;
    if (c < C) {
      if (shift != nullptr) {
        Vec<T, VW> sh, sc;
        sh.load(shift + mrow + c);
        sc.load(scale + mrow + c);
#pragma unroll
        for (int e = 0; e < VW; ++e)
          v[i].v[e] = (v[i].v[e] - mean) * rstd * (1.f + sc.v[e]) + sh.v[e];
      } else {
#pragma unroll
        for (int e = 0; e < VW; ++e) v[i].v[e] = (v[i].v[e] - mean) * rstd;
      }
      v[i].store(orow + c);
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

// One warp per (b, h, n) row of D elements; lane l handles the pairs l, l + 32, ... (D <= 256).
// x rows may be strided (sb, sh, sn in elements, the head dim contiguous); out is [B, H, N, D].
// With `norm`: n = round_T(x * rsqrt(mean(x^2) + eps) * w), then RoPE in f32 on n.
template <typename T>
__device__ __forceinline__ void rms_rope_impl(const T* __restrict__ x, const T* __restrict__ w,
                                              const float* __restrict__ cosv,
                                              const float* __restrict__ sinv, T* __restrict__ out,
                                              int H, int N, int D, long long sb, long long sh,
                                              long long sn, long long rows, float eps, int norm) {
  constexpr int MAXP = 4;
  const int lane = threadIdx.x & 31;
  const long long row = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int n = (int)(row % N);
  const long long bh = row / N;
  const int h = (int)(bh % H);
  const long long b = bh / H;
  const T* xr = x + b * sb + h * sh + n * sn;
  const int P = D / 2;
  float2 a[MAXP];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < MAXP; ++i) {
    const int p = lane + 32 * i;
    if (p < P) {
      a[i] = Pair<T>::ld(xr + 2 * p);
      ss += a[i].x * a[i].x + a[i].y * a[i].y;
    }
  }
  float rstd = 1.f;
  if (norm) rstd = rsqrtf(warp_sum(ss) / D + eps);
  T* orow = out + row * D;
  const float* cr = cosv + (long long)n * P;
  const float* sr = sinv + (long long)n * P;
#pragma unroll
  for (int i = 0; i < MAXP; ++i) {
    const int p = lane + 32 * i;
    if (p < P) {
      float n0 = a[i].x, n1 = a[i].y;
      if (norm) {
        // The normed values are rounded to the activation dtype before RoPE (as diffusers does).
        const float2 wv = Pair<T>::ld(w + 2 * p);
        n0 = to_f(from_f<T>(n0 * rstd * wv.x));
        n1 = to_f(from_f<T>(n1 * rstd * wv.y));
      }
      const float c = __ldg(cr + p), s = __ldg(sr + p);
      Pair<T>::st(orow + 2 * p, n0 * c - n1 * s, n1 * c + n0 * s);
    }
  }
}

}  // namespace

#define LN_MOD(NAME, T, VW)                                                                    \
  extern "C" __global__ void NAME(const T* x, const T* shift, const T* scale, T* out, int C,   \
                                  int rows_per_mod, long long mod_stride, float eps) {         \
    ln_mod_impl<T, VW, 4>(x, shift, scale, out, C, rows_per_mod, mod_stride, eps);             \
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
#define RMS_ROPE(NAME, T)                                                                      \
  extern "C" __global__ void NAME(const T* x, const T* w, const float* cosv, const float* sinv, \
                                  T* out, int H, int N, int D, long long sb, long long sh,     \
                                  long long sn, long long rows, float eps, int norm) {         \
    rms_rope_impl<T>(x, w, cosv, sinv, out, H, N, D, sb, sh, sn, rows, eps, norm);             \
  }

#define ALL_OPS(SUF, T)                       \
  LN_MOD(ln_mod_v_##SUF, T, 16 / sizeof(T))   \
  LN_MOD(ln_mod_s_##SUF, T, 1)                \
  GATED_RES(gated_res_v_##SUF, T, 16 / sizeof(T)) \
  GATED_RES(gated_res_s_##SUF, T, 1)          \
  BIAS_GELU(bias_gelu_v_##SUF, T, 16 / sizeof(T)) \
  BIAS_GELU(bias_gelu_s_##SUF, T, 1)          \
  RMS_ROPE(rms_rope_##SUF, T)

ALL_OPS(f32, float)
ALL_OPS(f16, __half)
#ifdef PAW_SM80
ALL_OPS(bf16, __nv_bfloat16)
#endif
