// C++ (CPU) implementations of the headsparse ops; torch glue in csrc/bind.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

namespace headsparse_cpu {

// Contract of headsparse.ops.torch_backend.forward: writes out[:, heads[p]] and
// returns the log-sum-exp (B, P, Sq) (float32, float64 for float64 inputs).
at::Tensor attn_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& heads,
                        const at::Tensor& kv_heads, const at::Tensor& mask_heads, const c10::optional<at::Tensor>& mask,
                        bool causal, double scale, at::Tensor& out);

// Contract of headsparse.ops.torch_backend.backward (compact tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const at::Tensor& kv_pos, const at::Tensor& mask_heads, const c10::optional<at::Tensor>& mask,
    bool causal, double scale, const c10::optional<at::Tensor>& stats);

// (xg, xx, gg, abs_x, abs_g); see headsparse.ops.head_stats for the definitions.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_stats(
    const at::Tensor& x, const c10::optional<at::Tensor>& g, int64_t num_heads,
    const c10::optional<at::Tensor>& token_mask);

at::Tensor gram(const at::Tensor& x, const c10::optional<at::Tensor>& token_mask);

}  // namespace headsparse_cpu
