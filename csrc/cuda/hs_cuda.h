// Torch-free interface of the headsparse CUDA kernels.
//
// Everything here is plain C++ on raw device pointers with explicit strides
// (in elements), so that each .cu file compiles standalone with nvcc and the
// torch glue lives only in csrc/bind.cpp. All launchers return the
// cudaError_t of their launch (cudaSuccess on success).
#pragma once

#include <cstdint>

#ifdef HS_CUDA_EMULATION
#include "hs_cuda_emu.h"  // tests/cuda_emu: runs these kernels on the CPU in the test suite
#else
#include <cuda_runtime.h>
#endif

namespace headsparse_cuda {

// Element type of q/k/v/o/do (and of X/G for the statistics).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Padding-mask element type. Bool: true = attend; float kinds are additive.
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kF32Mask = 2, kF16Mask = 3, kBF16Mask = 4, kF64Mask = 5 };

// A 4-d strided view (strides in elements; 0 = broadcast).
struct Strided4 {
  const void* data;
  int64_t s0, s1, s2, s3;
};

struct AttnFwdParams {
  Strided4 q;     // (B, Hq, Sq, D)
  Strided4 k, v;  // (B, Hkv, Skv, D)
  Strided4 out;   // (B, Hq, Sq, D); only heads[p] are written (data is written through)
  Strided4 mask;  // (B, Hq, Sq, Skv) view, mask_kind says the element type
  int mask_kind;
  const int64_t* heads;       // (P,) query head of program p
  const int64_t* kv_heads;    // (P,) KV head read by program p
  const int64_t* mask_heads;  // (P,) index into the mask's head dimension
  float* lse;                 // (B, P, Sq) contiguous; +inf for rows with nothing to attend
  int B, P, Sq, Skv, D;
  int causal;  // bottom-right aligned: query i sees key j iff j <= i + Skv - Sq
  float scale;
  int dtype;
};

struct AttnBwdParams {
  // Compact tensors: only the G heads that need a gradient and the R KV heads they read.
  Strided4 dout, q, o;  // (B, G, Sq, D)
  Strided4 k, v;        // (B, R, Skv, D)
  const float* lse;     // (B, G, Sq) with strides below
  int64_t lse_s0, lse_s1, lse_s2;
  Strided4 mask;
  int mask_kind;
  const int64_t* kv_pos;      // (G,) position in k/v (0..R-1) of head g's KV head
  const int64_t* mask_heads;  // (G,) index into the mask's head dimension
  float* stats;               // (B, G) contiguous or nullptr: += sum_i delta_i
  float* delta;               // (B, G, Sq) contiguous workspace
  float* dq_accum;            // (B, G, Sq, D) contiguous fp32 workspace, zeroed by the caller
  void* dk;                   // (B, R, Skv, D) contiguous, input dtype, fully written
  void* dv;                   // (B, R, Skv, D) contiguous, input dtype, fully written
  int B, G, R, Sq, Skv, D;
  int causal;
  float scale;
  int dtype;
};

// Maximum head dimension supported by the attention kernels.
constexpr int kMaxHeadDim = 256;

cudaError_t attn_forward(const AttnFwdParams& p, cudaStream_t stream);
// Whether attn_forward / attn_backward take the tensor-core kernels on the current device for this
// dtype and head dim (otherwise the CUDA-core ones). Honours HEADSPARSE_CUDA_TENSOR_CORES=0.
bool attn_forward_uses_tensor_cores(int dtype, int head_dim);
bool attn_backward_uses_tensor_cores(int dtype, int head_dim);
cudaError_t attn_backward(const AttnBwdParams& p, cudaStream_t stream);

// Head statistics over X (the o_proj input) and G = dL/dX, both (B, S, C) with
// C = H * Dh, and an optional token mask (B, S) (bool bytes, true = counted).
// Outputs (fp32, zeroed by the caller, accumulated into):
//   xg (B, H): sum_t <X_h, G_h>      xx (B, H): sum_t ||X_h||^2
//   gg (B, H): sum_t ||G_h||^2       abs_x, abs_g (C,): sum over b, t of |X|, |G|
// g may be nullptr (then xg, gg and abs_g are not touched).
struct HeadStatsParams {
  const void* x;
  int64_t xs0, xs1, xs2;
  const void* g;
  int64_t gs0, gs1, gs2;
  const unsigned char* token_mask;  // (B, S) or nullptr
  int64_t ms0, ms1;
  float *xg, *xx, *gg, *abs_x, *abs_g;
  int B, S, C, H;
  int dtype;
};
cudaError_t head_stats(const HeadStatsParams& p, cudaStream_t stream);

// Gram matrix out (C, C) fp32 = sum over (b, t) with token_mask of x[b,t,:]^T x[b,t,:]
// (out is overwritten).
struct GramParams {
  const void* x;
  int64_t xs0, xs1, xs2;
  const unsigned char* token_mask;
  int64_t ms0, ms1;
  float* out;
  int B, S, C;
  int dtype;
};
cudaError_t gram(const GramParams& p, cudaStream_t stream);

}  // namespace headsparse_cuda
