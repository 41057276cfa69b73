// Head statistics over the o_proj input X (B, S, H*Dh) and its gradient G, and
// the Gram matrix X^T X, on the CPU. Accumulation in float32 (float64 for
// float64 inputs). head_stats is split over heads with at::parallel_for (each
// task owns its heads' outputs and channels: no races); gram accumulates
// X_chunk^T X_chunk over blocks of masked tokens with addmm (BLAS).
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "hs_cpu.h"

namespace headsparse_cpu {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename scalar_t>
void head_stats_impl(const at::Tensor& x, const at::Tensor* g, int64_t H, const bool* mask, int64_t ms0, int64_t ms1,
                     at::Tensor& xg, at::Tensor& xx, at::Tensor& gg, at::Tensor& abs_x, at::Tensor& abs_g) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2), Dh = C / H;
  const scalar_t* xd = x.data_ptr<scalar_t>();
  const scalar_t* gd = g ? g->data_ptr<scalar_t>() : nullptr;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t gs0 = g ? g->stride(0) : 0, gs1 = g ? g->stride(1) : 0, gs2 = g ? g->stride(2) : 0;
  acc_t* xgd = xg.data_ptr<acc_t>();
  acc_t* xxd = xx.data_ptr<acc_t>();
  acc_t* ggd = gg.data_ptr<acc_t>();
  acc_t* axd = abs_x.data_ptr<acc_t>();
  acc_t* agd = abs_g.data_ptr<acc_t>();
  at::parallel_for(0, H, 1, [&](int64_t hb, int64_t he) {
    std::vector<acc_t> ax(Dh), ag(Dh), xr(Dh), gr(Dh);
    for (int64_t h = hb; h < he; ++h) {
      std::fill(ax.begin(), ax.end(), acc_t(0));
      std::fill(ag.begin(), ag.end(), acc_t(0));
      const int64_t c0 = h * Dh;
      for (int64_t b = 0; b < B; ++b) {
        acc_t sxg = 0, sxx = 0, sgg = 0;
        for (int64_t t = 0; t < S; ++t) {
          if (mask && !mask[b * ms0 + t * ms1]) continue;
          const scalar_t* xrow = xd + b * xs0 + t * xs1 + c0 * xs2;
          for (int64_t d = 0; d < Dh; ++d) xr[d] = static_cast<acc_t>(xrow[d * xs2]);
          for (int64_t d = 0; d < Dh; ++d) {
            sxx += xr[d] * xr[d];
            ax[d] += std::abs(xr[d]);
          }
          if (gd) {
            const scalar_t* grow = gd + b * gs0 + t * gs1 + c0 * gs2;
            for (int64_t d = 0; d < Dh; ++d) gr[d] = static_cast<acc_t>(grow[d * gs2]);
            for (int64_t d = 0; d < Dh; ++d) {
              sxg += xr[d] * gr[d];
              sgg += gr[d] * gr[d];
              ag[d] += std::abs(gr[d]);
            }
          }
        }
        xgd[b * H + h] = sxg;
        xxd[b * H + h] = sxx;
        ggd[b * H + h] = sgg;
      }
      for (int64_t d = 0; d < Dh; ++d) {
        axd[c0 + d] = ax[d];
        agd[c0 + d] = ag[d];
      }
    }
  });
}

const bool* mask_ptr(const c10::optional<at::Tensor>& token_mask, const at::Tensor& x, int64_t* ms0, int64_t* ms1) {
  *ms0 = *ms1 = 0;
  if (!token_mask.has_value() || !token_mask->defined()) return nullptr;
  const at::Tensor& m = *token_mask;
  TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == x.size(0) && m.size(1) == x.size(1),
              "headsparse: token_mask must be a bool (B, S) tensor matching x");
  TORCH_CHECK(m.device() == x.device(), "headsparse: token_mask must be on x's device");
  *ms0 = m.stride(0);
  *ms1 = m.stride(1);
  return m.data_ptr<bool>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_stats(
    const at::Tensor& x, const c10::optional<at::Tensor>& g, int64_t num_heads,
    const c10::optional<at::Tensor>& token_mask) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3, "headsparse (cpu): x must be a (B, S, C) CPU tensor");
  TORCH_CHECK(num_heads > 0 && x.size(2) % num_heads == 0, "headsparse: num_heads must divide the channel count");
  const at::Tensor* gp = nullptr;
  if (g.has_value() && g->defined()) {
    TORCH_CHECK(g->sizes() == x.sizes() && g->scalar_type() == x.scalar_type() && g->device() == x.device(),
                "headsparse: g must match x in shape, dtype and device");
    gp = &*g;
  }
  int64_t ms0, ms1;
  const bool* mp = mask_ptr(token_mask, x, &ms0, &ms1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opt = x.options().dtype(acc);
  const int64_t B = x.size(0), C = x.size(2);
  at::Tensor xg = at::zeros({B, num_heads}, opt), xx = at::zeros({B, num_heads}, opt);
  at::Tensor gg = at::zeros({B, num_heads}, opt);
  at::Tensor abs_x = at::zeros({C}, opt), abs_g = at::zeros({C}, opt);
  if (x.numel() == 0) return {xg, xx, gg, abs_x, abs_g};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "headsparse_head_stats_cpu", [&] {
    head_stats_impl<scalar_t>(x, gp, num_heads, mp, ms0, ms1, xg, xx, gg, abs_x, abs_g);
  });
  return {xg, xx, gg, abs_x, abs_g};
}

at::Tensor gram(const at::Tensor& x, const c10::optional<at::Tensor>& token_mask) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3, "headsparse (cpu): x must be a (B, S, C) CPU tensor");
  int64_t ms0, ms1;
  mask_ptr(token_mask, x, &ms0, &ms1);  // validates
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  at::Tensor out = at::zeros({C, C}, x.options().dtype(acc));
  at::Tensor flat = x.reshape({B * S, C});
  at::Tensor rows;
  if (token_mask.has_value() && token_mask->defined()) {
    rows = token_mask->reshape({B * S}).nonzero().squeeze(1);
  } else {
    rows = at::arange(B * S, x.options().dtype(at::kLong));
  }
  constexpr int64_t kChunk = 4096;  // tokens per block: bounds the converted copy
  const int64_t n = rows.numel();
  for (int64_t s = 0; s < n; s += kChunk) {
    at::Tensor blk = flat.index_select(0, rows.slice(0, s, std::min(n, s + kChunk))).to(acc);
    out.addmm_(blk.t(), blk);
  }
  return out;
}

}  // namespace headsparse_cpu
