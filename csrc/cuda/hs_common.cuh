// Device helpers shared by the headsparse CUDA kernels (no torch headers).
#pragma once

#include "hs_cuda.h"

#ifndef HS_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>

// Dynamic shared memory of a kernel, 128-byte aligned (WMMA tiles need 32).
#define HS_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
// Launch `kernel` (a function or function-pointer variable, so no template
// commas reach the macro) and return the launch's cudaError_t. The test suite
// swaps in an emulator with the same two macros (tests/cuda_emu).
#define HS_LAUNCH(kernel, grid, block, smem, stream, arg) \
  (kernel<<<grid, block, smem, stream>>>(arg), cudaGetLastError())
// The emulator checks vector-access alignment; the hardware faults instead.
#define HS_CHECK_ALIGN(ptr, bytes) ((void)0)
#endif

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

// Kernels asking for more than 48 KiB of dynamic shared memory must opt in first.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Inputs and dq workspace of compact grad head g of sample b in the backward pass.
template <typename T>
struct GradHead {
  const T* q;
  const T* dout;
  const float* lse;    // stride p.lse_s2 between rows
  const float* delta;  // contiguous rows
  float* dq;           // (Sq, D) contiguous fp32
  int64_t mask_head;
};

template <typename T>
__device__ __forceinline__ GradHead<T> grad_head(const AttnBwdParams& p, int b, int g) {
  GradHead<T> h;
  h.q = static_cast<const T*>(p.q.data) + b * p.q.s0 + g * p.q.s1;
  h.dout = static_cast<const T*>(p.dout.data) + b * p.dout.s0 + g * p.dout.s1;
  h.lse = p.lse + b * p.lse_s0 + g * p.lse_s1;
  h.delta = p.delta + (static_cast<int64_t>(b) * p.G + g) * p.Sq;
  h.dq = p.dq_accum + (static_cast<int64_t>(b) * p.G + g) * p.Sq * p.D;
  h.mask_head = p.mask_heads[g];
  return h;
}

// 16-byte vector load/store (8 fp16/bf16 elements); the caller guarantees alignment.
__device__ __forceinline__ uint4 load_vec16(const void* ptr) {
  HS_CHECK_ALIGN(ptr, 16);
  return *static_cast<const uint4*>(ptr);
}
__device__ __forceinline__ void store_vec16(void* ptr, uint4 v) {
  HS_CHECK_ALIGN(ptr, 16);
  *static_cast<uint4*>(ptr) = v;
}

// Tensor-core kernels (attention_tc.cu): fp16/bf16, head_dim a multiple of 16 up to
// kTcMaxHeadDim, compute capability 8.0 or newer. attention.cu decides when to use them.
constexpr int kTcMaxHeadDim = 128;
// Opt-in shared memory per block the tensor-core kernels may use on the current device, bytes: 0 if they
// cannot run there (compute capability below 8.0, or the binary the driver runs was built below sm_80).
size_t attn_tc_smem_limit();
size_t attn_forward_tc_smem(int head_dim);   // dynamic shared memory per block, bytes
size_t attn_backward_tc_smem(int head_dim);
cudaError_t attn_forward_tc(const AttnFwdParams& p, cudaStream_t stream);
// The main backward pass only: p.delta must already hold sum_d o * do (attention.cu's preprocess kernel).
cudaError_t attn_backward_tc(const AttnBwdParams& p, cudaStream_t stream);

}  // namespace detail
}  // namespace headsparse_cuda
