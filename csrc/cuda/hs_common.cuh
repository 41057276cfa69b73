// Device helpers shared by the headsparse CUDA kernels (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "hs_cuda.h"

namespace headsparse_cuda {
namespace detail {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Additive bias of mask element (b, h, i, j): 0 / -inf for bool masks, the value for float masks.
__device__ __forceinline__ float mask_bias(const Strided4& m, int kind, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (kind == kNoMask) return 0.f;
  const int64_t off = b * m.s0 + h * m.s1 + i * m.s2 + j * m.s3;
  switch (kind) {
    case kBoolMask:
      return static_cast<const unsigned char*>(m.data)[off] ? 0.f : -INFINITY;
    case kF32Mask:
      return static_cast<const float*>(m.data)[off];
    case kF16Mask:
      return __half2float(static_cast<const __half*>(m.data)[off]);
    case kBF16Mask:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(m.data)[off]);
    case kF64Mask:
      return static_cast<float>(static_cast<const double*>(m.data)[off]);
    default:
      return 0.f;
  }
}

}  // namespace detail
}  // namespace headsparse_cuda
