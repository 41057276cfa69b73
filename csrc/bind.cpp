// The one binding file of headsparse._C: torch glue + pybind11.
//
// Every op dispatches on the device of its first tensor: CPU tensors go to
// csrc/cpu/*.cpp; CUDA tensors go to the torch-free kernels in csrc/cuda/*.cu,
// which are compiled in only when the extension is built with CUDA
// (HEADSPARSE_WITH_CUDA). Python reaches these functions through
// headsparse/ops/extension.py, never directly.
#include <torch/extension.h>

#include "cpu/hs_cpu.h"

#ifdef HEADSPARSE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/hs_cuda.h"
#endif

namespace {

#ifdef HEADSPARSE_WITH_CUDA
namespace hc = headsparse_cuda;

int cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return hc::kF32;
    case at::kHalf:
      return hc::kF16;
    case at::kBFloat16:
      return hc::kBF16;
    default:
      TORCH_CHECK(false, "headsparse (cuda): supports float16, bfloat16 and float32, got ", t.scalar_type());
  }
  return -1;
}

hc::Strided4 strided4(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "headsparse (cuda): expected a 4-d tensor");
  return hc::Strided4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void mask_args(const c10::optional<at::Tensor>& mask, hc::Strided4* view, int* kind) {
  *view = hc::Strided4{nullptr, 0, 0, 0, 0};
  *kind = hc::kNoMask;
  if (!mask.has_value() || !mask->defined()) return;
  *view = strided4(*mask);
  switch (mask->scalar_type()) {
    case at::kBool:
      *kind = hc::kBoolMask;
      break;
    case at::kFloat:
      *kind = hc::kF32Mask;
      break;
    case at::kHalf:
      *kind = hc::kF16Mask;
      break;
    case at::kBFloat16:
      *kind = hc::kBF16Mask;
      break;
    case at::kDouble:
      *kind = hc::kF64Mask;
      break;
    default:
      TORCH_CHECK(false, "headsparse (cuda): unsupported mask dtype ", mask->scalar_type());
  }
}

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "headsparse (cuda): ", what, " failed: ", cudaGetErrorString(e));
}

// Head-index arrays are read by the kernels on the device of the data.
at::Tensor index_arg(const at::Tensor& t, const at::Device& dev) { return t.to(dev, at::kLong).contiguous(); }

at::Tensor cuda_attn_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& heads,
                             const at::Tensor& kv_heads, const at::Tensor& mask_heads,
                             const c10::optional<at::Tensor>& mask, bool causal, double scale, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "headsparse (cuda): q, k, v and out must share a dtype");
  TORCH_CHECK(q.size(3) <= hc::kMaxHeadDim, "headsparse (cuda): head_dim must be <= ", hc::kMaxHeadDim);
  const at::Tensor h = index_arg(heads, q.device()), hk = index_arg(kv_heads, q.device()),
                   hm = index_arg(mask_heads, q.device());
  const int64_t P = h.numel();
  at::Tensor lse = at::empty({q.size(0), P, q.size(2)}, q.options().dtype(at::kFloat));
  hc::AttnFwdParams p{};
  p.q = strided4(q);
  p.k = strided4(k);
  p.v = strided4(v);
  p.out = strided4(out);
  mask_args(mask, &p.mask, &p.mask_kind);
  p.heads = h.data_ptr<int64_t>();
  p.kv_heads = hk.data_ptr<int64_t>();
  p.mask_heads = hm.data_ptr<int64_t>();
  p.lse = lse.data_ptr<float>();
  p.B = q.size(0);
  p.P = P;
  p.Sq = q.size(2);
  p.Skv = k.size(2);
  p.D = q.size(3);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.dtype = cuda_dtype(q);
  check_cuda(hc::attn_forward(p, c10::cuda::getCurrentCUDAStream().stream()), "attention forward");
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_attn_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse_in, const at::Tensor& kv_pos, const at::Tensor& mask_heads,
    const c10::optional<at::Tensor>& mask, bool causal, double scale, const c10::optional<at::Tensor>& stats) {
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(q.size(3) <= hc::kMaxHeadDim, "headsparse (cuda): head_dim must be <= ", hc::kMaxHeadDim);
  const at::Tensor lse = lse_in.to(at::kFloat);
  const at::Tensor kp = index_arg(kv_pos, q.device()), hm = index_arg(mask_heads, q.device());
  const int64_t B = q.size(0), G = q.size(1), Sq = q.size(2), D = q.size(3), R = k.size(1), Skv = k.size(2);
  at::Tensor dq32 = at::zeros({B, G, Sq, D}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({B, G, Sq}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty({B, R, Skv, D}, q.options());
  at::Tensor dv = at::empty({B, R, Skv, D}, q.options());
  at::Tensor stats32;
  if (stats.has_value() && stats->defined()) {
    TORCH_CHECK(stats->dim() == 2 && stats->size(0) == B && stats->size(1) == G, "headsparse (cuda): stats must be (B, G)");
    stats32 = stats->scalar_type() == at::kFloat && stats->is_contiguous() ? *stats
                                                                            : at::zeros({B, G}, q.options().dtype(at::kFloat));
  }
  hc::AttnBwdParams p{};
  p.dout = strided4(dout);
  p.q = strided4(q);
  p.o = strided4(o);
  p.k = strided4(k);
  p.v = strided4(v);
  p.lse = lse.data_ptr<float>();
  p.lse_s0 = lse.stride(0);
  p.lse_s1 = lse.stride(1);
  p.lse_s2 = lse.stride(2);
  mask_args(mask, &p.mask, &p.mask_kind);
  p.kv_pos = kp.data_ptr<int64_t>();
  p.mask_heads = hm.data_ptr<int64_t>();
  p.stats = stats32.defined() ? stats32.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq32.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.B = B;
  p.G = G;
  p.R = R;
  p.Sq = Sq;
  p.Skv = Skv;
  p.D = D;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.dtype = cuda_dtype(q);
  check_cuda(hc::attn_backward(p, c10::cuda::getCurrentCUDAStream().stream()), "attention backward");
  if (stats32.defined() && !stats32.is_same(*stats)) stats->add_(stats32.to(stats->scalar_type()));
  return {dq32.to(q.scalar_type()), dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_head_stats(
    const at::Tensor& x, const c10::optional<at::Tensor>& g, int64_t num_heads,
    const c10::optional<at::Tensor>& token_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 3, "headsparse (cuda): x must be (B, S, C)");
  TORCH_CHECK(num_heads > 0 && x.size(2) % num_heads == 0, "headsparse: num_heads must divide the channel count");
  auto opt = x.options().dtype(at::kFloat);
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  at::Tensor xg = at::zeros({B, num_heads}, opt), xx = at::zeros({B, num_heads}, opt);
  at::Tensor gg = at::zeros({B, num_heads}, opt), abs_x = at::zeros({C}, opt), abs_g = at::zeros({C}, opt);
  hc::HeadStatsParams p{};
  p.x = x.data_ptr();
  p.xs0 = x.stride(0);
  p.xs1 = x.stride(1);
  p.xs2 = x.stride(2);
  const bool has_g = g.has_value() && g->defined();
  if (has_g) {
    TORCH_CHECK(g->sizes() == x.sizes() && g->scalar_type() == x.scalar_type() && g->device() == x.device(),
                "headsparse: g must match x in shape, dtype and device");
    p.g = g->data_ptr();
    p.gs0 = g->stride(0);
    p.gs1 = g->stride(1);
    p.gs2 = g->stride(2);
  }
  if (token_mask.has_value() && token_mask->defined()) {
    TORCH_CHECK(token_mask->scalar_type() == at::kBool && token_mask->dim() == 2, "headsparse: token_mask must be bool (B, S)");
    p.token_mask = reinterpret_cast<const unsigned char*>(token_mask->data_ptr<bool>());
    p.ms0 = token_mask->stride(0);
    p.ms1 = token_mask->stride(1);
  }
  p.xg = xg.data_ptr<float>();
  p.xx = xx.data_ptr<float>();
  p.gg = gg.data_ptr<float>();
  p.abs_x = abs_x.data_ptr<float>();
  p.abs_g = abs_g.data_ptr<float>();
  p.B = B;
  p.S = S;
  p.C = C;
  p.H = num_heads;
  p.dtype = cuda_dtype(x);
  check_cuda(hc::head_stats(p, c10::cuda::getCurrentCUDAStream().stream()), "head_stats");
  return {xg, xx, gg, abs_x, abs_g};
}

at::Tensor cuda_gram(const at::Tensor& x, const c10::optional<at::Tensor>& token_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 3, "headsparse (cuda): x must be (B, S, C)");
  const int64_t C = x.size(2);
  at::Tensor out = at::empty({C, C}, x.options().dtype(at::kFloat));
  hc::GramParams p{};
  p.x = x.data_ptr();
  p.xs0 = x.stride(0);
  p.xs1 = x.stride(1);
  p.xs2 = x.stride(2);
  if (token_mask.has_value() && token_mask->defined()) {
    TORCH_CHECK(token_mask->scalar_type() == at::kBool && token_mask->dim() == 2, "headsparse: token_mask must be bool (B, S)");
    p.token_mask = reinterpret_cast<const unsigned char*>(token_mask->data_ptr<bool>());
    p.ms0 = token_mask->stride(0);
    p.ms1 = token_mask->stride(1);
  }
  p.out = out.data_ptr<float>();
  p.B = x.size(0);
  p.S = x.size(1);
  p.C = C;
  p.dtype = cuda_dtype(x);
  check_cuda(hc::gram(p, c10::cuda::getCurrentCUDAStream().stream()), "gram");
  return out;
}
#endif  // HEADSPARSE_WITH_CUDA

#ifndef HEADSPARSE_WITH_CUDA
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "headsparse._C was built without CUDA; rebuild with a CUDA torch and nvcc (see docs/extension.md)");
  throw;  // unreachable
}
#endif

at::Tensor attn_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& heads,
                        const at::Tensor& kv_heads, const at::Tensor& mask_heads, const c10::optional<at::Tensor>& mask,
                        bool causal, double scale, at::Tensor out) {
  if (q.is_cuda()) {
#ifdef HEADSPARSE_WITH_CUDA
    return cuda_attn_forward(q, k, v, heads, kv_heads, mask_heads, mask, causal, scale, out);
#else
    no_cuda();
#endif
  }
  return headsparse_cpu::attn_forward(q, k, v, heads, kv_heads, mask_heads, mask, causal, scale, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const at::Tensor& kv_pos, const at::Tensor& mask_heads, const c10::optional<at::Tensor>& mask,
    bool causal, double scale, const c10::optional<at::Tensor>& stats) {
  if (q.is_cuda()) {
#ifdef HEADSPARSE_WITH_CUDA
    return cuda_attn_backward(dout, q, k, v, o, lse, kv_pos, mask_heads, mask, causal, scale, stats);
#else
    no_cuda();
#endif
  }
  return headsparse_cpu::attn_backward(dout, q, k, v, o, lse, kv_pos, mask_heads, mask, causal, scale, stats);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_stats(
    const at::Tensor& x, const c10::optional<at::Tensor>& g, int64_t num_heads,
    const c10::optional<at::Tensor>& token_mask) {
  if (x.is_cuda()) {
#ifdef HEADSPARSE_WITH_CUDA
    return cuda_head_stats(x, g, num_heads, token_mask);
#else
    no_cuda();
#endif
  }
  return headsparse_cpu::head_stats(x, g, num_heads, token_mask);
}

at::Tensor gram(const at::Tensor& x, const c10::optional<at::Tensor>& token_mask) {
  if (x.is_cuda()) {
#ifdef HEADSPARSE_WITH_CUDA
    return cuda_gram(x, token_mask);
#else
    no_cuda();
#endif
  }
  return headsparse_cpu::gram(x, token_mask);
}

// (forward, backward): whether the cuda backend runs tensor-core kernels for tensors like `like` with this
// head dim on like's device (false, false for dtypes or shapes that take the CUDA-core kernels).
std::tuple<bool, bool> cuda_uses_tensor_cores(const at::Tensor& like, int64_t head_dim) {
  TORCH_CHECK(like.is_cuda(), "headsparse (cuda): cuda_uses_tensor_cores needs a CUDA tensor");
#ifdef HEADSPARSE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(like.device());
  const int dtype = cuda_dtype(like);
  return {hc::attn_forward_uses_tensor_cores(dtype, static_cast<int>(head_dim)),
          hc::attn_backward_uses_tensor_cores(dtype, static_cast<int>(head_dim))};
#else
  no_cuda();
#endif
}

bool with_cuda() {
#ifdef HEADSPARSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// Bumped whenever the Python <-> C++ signatures change, so that a stale build is detected.
#define HEADSPARSE_ABI_VERSION 2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "headsparse compiled kernels (CPU always; CUDA when built with it)";
  m.attr("ABI_VERSION") = HEADSPARSE_ABI_VERSION;
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("attn_forward", &attn_forward, "head-sparse attention forward (torch_backend.forward contract)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("heads"), py::arg("kv_heads"), py::arg("mask_heads"),
        py::arg("mask"), py::arg("causal"), py::arg("scale"), py::arg("out"));
  m.def("attn_backward", &attn_backward, "head-sparse attention backward (torch_backend.backward contract)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("kv_pos"),
        py::arg("mask_heads"), py::arg("mask"), py::arg("causal"), py::arg("scale"), py::arg("stats"));
  m.def("head_stats", &head_stats, "(xg, xx, gg, abs_x, abs_g) over X and G", py::arg("x"), py::arg("g"),
        py::arg("num_heads"), py::arg("token_mask"));
  m.def("gram", &gram, "X^T X over masked tokens", py::arg("x"), py::arg("token_mask"));
  m.def("cuda_uses_tensor_cores", &cuda_uses_tensor_cores,
        "(forward, backward): whether the CUDA attention kernels for this dtype/head dim use tensor cores",
        py::arg("like"), py::arg("head_dim"));
}
