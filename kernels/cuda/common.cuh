// Shared helpers for the pawfect-kernels CUDA sources.
//
// Every kernel accumulates in f32. bf16 code is compiled only for compute capability 8.0 and
// up (`PAW_SM80`); on older targets (the T4, sm_75) only the f16 and f32 kernels exist.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define PAW_SM80 1
#include <cuda_bf16.h>
#endif

namespace paw {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

#ifdef PAW_SM80
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// VW consecutive elements, one 16-byte access when VW * sizeof(T) == 16.
template <typename T, int VW> struct Vec {
  static_assert(VW * sizeof(T) == 16 || VW == 1, "vector width must be 16 bytes or 1 element");
  float v[VW];

  __device__ __forceinline__ void load(const T* __restrict__ p) {
    if constexpr (VW == 1) {
      v[0] = to_f(*p);
    } else {
      uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < VW; ++i) v[i] = to_f(e[i]);
    }
  }

  __device__ __forceinline__ void store(T* __restrict__ p) const {
    if constexpr (VW == 1) {
      *p = from_f<T>(v[0]);
    } else {
      uint4 u;
      T* e = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int i = 0; i < VW; ++i) e[i] = from_f<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = u;
    }
  }
};

// VW consecutive elements kept in their storage format (one 16-byte register group), converted
// on use: cheaper in registers than `Vec` for values loaded early and used late.
template <typename T, int VW> struct Raw {
  static_assert(VW * sizeof(T) == 16 || VW == 1, "vector width must be 16 bytes or 1 element");
  using Store = typename std::conditional<VW == 1, T, uint4>::type;
  Store u;

  __device__ __forceinline__ void load(const T* __restrict__ p) {
    if constexpr (VW == 1) {
      u = *p;
    } else {
      u = __ldg(reinterpret_cast<const uint4*>(p));
    }
  }
  __device__ __forceinline__ float get(int e) const {
    if constexpr (VW == 1) {
      return to_f(u);
    } else {
      return to_f(reinterpret_cast<const T*>(&u)[e]);
    }
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `red` holds at least 32 floats.
// Needs blockDim.x to be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return warp_sum(t);
}

}  // namespace paw
