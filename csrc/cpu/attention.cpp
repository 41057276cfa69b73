// Head-sparse attention forward and backward on the CPU.
//
// Same contract as headsparse.ops.torch_backend. Arithmetic is float32
// (float64 for float64 inputs). Work is split with at::parallel_for:
//   forward: over (batch, program, block of 64 query rows);
//   backward: over (batch, compact KV head); each task owns dK/dV of its KV
//     head and visits only the grad heads that read it, so there are no races.
// Rows of q/k/v/o are converted once into contiguous accumulator-type buffers;
// the inner loops are dot products and axpys over the head dimension.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "hs_cpu.h"

namespace headsparse_cpu {
namespace {

struct MaskView {
  bool present = false;
  const void* data = nullptr;
  at::ScalarType type = at::kBool;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

MaskView make_mask_view(const c10::optional<at::Tensor>& mask) {
  MaskView m;
  if (!mask.has_value() || !mask->defined()) return m;
  const at::Tensor& t = *mask;
  TORCH_CHECK(t.dim() == 4, "headsparse: mask must be 4-d (B, H, Sq, Skv), got ", t.dim(), " dims");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kBool || st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "headsparse: mask must be bool or floating point, got ", st);
  m.present = true;
  m.data = t.data_ptr();
  m.type = st;
  m.s0 = t.stride(0);
  m.s1 = t.stride(1);
  m.s2 = t.stride(2);
  m.s3 = t.stride(3);
  return m;
}

// out[j] = additive bias of mask (b, h, i, j) for j < n (0 / -inf for bool masks).
template <typename acc_t>
void fill_bias(const MaskView& m, int64_t b, int64_t h, int64_t i, int64_t n, acc_t* out) {
  if (!m.present) {
    std::fill(out, out + n, acc_t(0));
    return;
  }
  const int64_t base = b * m.s0 + h * m.s1 + i * m.s2;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  switch (m.type) {
    case at::kBool: {
      const bool* p = static_cast<const bool*>(m.data) + base;
      for (int64_t j = 0; j < n; ++j) out[j] = p[j * m.s3] ? acc_t(0) : ninf;
      break;
    }
    case at::kFloat: {
      const float* p = static_cast<const float*>(m.data) + base;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(p[j * m.s3]);
      break;
    }
    case at::kDouble: {
      const double* p = static_cast<const double*>(m.data) + base;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(p[j * m.s3]);
      break;
    }
    case at::kHalf: {
      const at::Half* p = static_cast<const at::Half*>(m.data) + base;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(static_cast<float>(p[j * m.s3]));
      break;
    }
    case at::kBFloat16: {
      const at::BFloat16* p = static_cast<const at::BFloat16*>(m.data) + base;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(static_cast<float>(p[j * m.s3]));
      break;
    }
    default:
      TORCH_CHECK(false, "headsparse: unsupported mask dtype");
  }
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename acc_t>
inline void axpy(acc_t a, const acc_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// dst[r * D + d] = src[r * rs + d * cs] * mul for r < n.
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* src, int64_t n, int64_t D, int64_t rs, int64_t cs, acc_t mul, acc_t* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* row = src + r * rs;
    acc_t* out = dst + r * D;
    if (cs == 1) {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(row[d]) * mul;
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(row[d * cs]) * mul;
    }
  }
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

inline int64_t visible_keys(bool causal, int64_t i, int64_t off, int64_t skv) {
  if (!causal) return skv;
  return std::max<int64_t>(0, std::min<int64_t>(skv, i + off + 1));
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* heads,
                  const int64_t* kv_heads, const int64_t* mask_heads, int64_t P, const MaskView& mask, bool causal,
                  double scale_d, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = q.size(0), Sq = q.size(2), D = q.size(3), Skv = k.size(2);
  const int64_t off = Skv - Sq;
  const acc_t scale = static_cast<acc_t>(scale_d);
  constexpr int64_t kRowBlock = 64;
  const int64_t nblk = (Sq + kRowBlock - 1) / kRowBlock;
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* kd = k.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  scalar_t* od = out.data_ptr<scalar_t>();
  acc_t* lsed = lse.data_ptr<acc_t>();
  const acc_t inf = std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * P * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kbuf(Skv * D), vbuf(Skv * D), qrow(D), orow(D), srow(std::max<int64_t>(Skv, 1));
    int64_t cached_b = -1, cached_hk = -1, cached_n = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nblk, pp = (task / nblk) % P, b = task / (nblk * P);
      const int64_t h = heads[pp], hk = kv_heads[pp], hm = mask_heads[pp];
      const int64_t i0 = blk * kRowBlock, i1 = std::min(Sq, i0 + kRowBlock);
      const int64_t need = visible_keys(causal, i1 - 1, off, Skv);
      if (b != cached_b || hk != cached_hk || need > cached_n) {
        load_rows(kd + b * k.stride(0) + hk * k.stride(1), need, D, k.stride(2), k.stride(3), acc_t(1), kbuf.data());
        load_rows(vd + b * v.stride(0) + hk * v.stride(1), need, D, v.stride(2), v.stride(3), acc_t(1), vbuf.data());
        cached_b = b;
        cached_hk = hk;
        cached_n = need;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t jlim = visible_keys(causal, i, off, Skv);
        load_rows(qd + b * q.stride(0) + h * q.stride(1) + i * q.stride(2), 1, D, 0, q.stride(3), scale, qrow.data());
        fill_bias(mask, b, hm, i, jlim, srow.data());
        acc_t mx = -inf;
        for (int64_t j = 0; j < jlim; ++j) {
          const acc_t bias = srow[j];
          if (bias == -inf) continue;
          const acc_t s = dot(qrow.data(), kbuf.data() + j * D, D) + bias;
          srow[j] = s;
          // std::max would skip a NaN score; a NaN must poison the row, as in the reference.
          mx = (s > mx || s != s) ? s : mx;
        }
        std::fill(orow.begin(), orow.end(), acc_t(0));
        acc_t row_lse = inf;
        if (mx != -inf) {
          acc_t sum = 0;
          for (int64_t j = 0; j < jlim; ++j) {
            if (srow[j] == -inf) continue;
            const acc_t p = std::exp(srow[j] - mx);
            sum += p;
            axpy(p, vbuf.data() + j * D, orow.data(), D);
          }
          const acc_t inv = acc_t(1) / sum;
          for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
          row_lse = mx + std::log(sum);
        }
        scalar_t* orow_out = od + b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
        for (int64_t d = 0; d < D; ++d) orow_out[d * out.stride(3)] = static_cast<scalar_t>(orow[d]);
        lsed[(b * P + pp) * Sq + i] = row_lse;
      }
    }
  });
}

// Two passes, each free of races and parallel over many tasks (FlashAttention-2's split):
//   A: over (batch, grad head, block of query rows): dQ of those rows;
//   B: over (batch, compact KV head, block of keys): dK/dV of those keys, visiting
//      only the grad heads that read that KV head.
// Both recompute P = exp(S - lse) from the saved log-sum-exp.
template <typename scalar_t>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& delta_t, const at::Tensor& lse, const int64_t* kv_pos, const int64_t* mask_heads,
                   const MaskView& mask, bool causal, double scale_d, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = q.size(0), G = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t R = k.size(1), Skv = k.size(2);
  const int64_t off = Skv - Sq;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  // q, k, v, dout: contiguous accumulator-type copies (made by the caller).
  const acc_t* qd = q.data_ptr<acc_t>();
  const acc_t* kd = k.data_ptr<acc_t>();
  const acc_t* vd = v.data_ptr<acc_t>();
  const acc_t* dod = dout.data_ptr<acc_t>();
  const acc_t* deltad = delta_t.data_ptr<acc_t>();  // (B, G, Sq) contiguous
  const acc_t* lsed = lse.data_ptr<acc_t>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  scalar_t* dqd = dq.data_ptr<scalar_t>();  // contiguous (B, G, Sq, D)
  scalar_t* dkd = dk.data_ptr<scalar_t>();  // contiguous (B, R, Skv, D)
  scalar_t* dvd = dv.data_ptr<scalar_t>();

  constexpr int64_t kRowBlock = 32;
  const int64_t nqb = (Sq + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, B * G * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dqrow(D), brow(std::max<int64_t>(Skv, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nqb, g = (task / nqb) % G, b = task / (nqb * G);
      const int64_t r = kv_pos[g], hm = mask_heads[g];
      const acc_t* kb = kd + (b * R + r) * Skv * D;
      const acc_t* vb = vd + (b * R + r) * Skv * D;
      for (int64_t i = blk * kRowBlock; i < std::min(Sq, (blk + 1) * kRowBlock); ++i) {
        const acc_t* qrow = qd + ((b * G + g) * Sq + i) * D;
        const acc_t* dorow = dod + ((b * G + g) * Sq + i) * D;
        const acc_t delta = deltad[(b * G + g) * Sq + i];
        const acc_t lse_i = lsed[b * ls0 + g * ls1 + i * ls2];
        std::fill(dqrow.begin(), dqrow.end(), acc_t(0));
        if (lse_i != inf) {
          const int64_t jlim = visible_keys(causal, i, off, Skv);
          fill_bias(mask, b, hm, i, jlim, brow.data());
          for (int64_t j = 0; j < jlim; ++j) {
            if (brow[j] == -inf) continue;
            const acc_t p = std::exp(dot(qrow, kb + j * D, D) * scale + brow[j] - lse_i);
            if (p == acc_t(0)) continue;
            const acc_t ds = p * (dot(dorow, vb + j * D, D) - delta);
            axpy(ds, kb + j * D, dqrow.data(), D);
          }
        }
        scalar_t* out = dqd + ((b * G + g) * Sq + i) * D;
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(dqrow[d] * scale);
      }
    }
  });

  constexpr int64_t kKeyBlock = 32;
  const int64_t nkb = (Skv + kKeyBlock - 1) / kKeyBlock;
  at::parallel_for(0, B * R * nkb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dkbuf(kKeyBlock * D), dvbuf(kKeyBlock * D), brow(kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nkb, r = (task / nkb) % R, b = task / (nkb * R);
      const int64_t j0 = blk * kKeyBlock, j1 = std::min(Skv, j0 + kKeyBlock), nj = j1 - j0;
      const acc_t* kb = kd + ((b * R + r) * Skv + j0) * D;
      const acc_t* vb = vd + ((b * R + r) * Skv + j0) * D;
      std::fill(dkbuf.begin(), dkbuf.end(), acc_t(0));
      std::fill(dvbuf.begin(), dvbuf.end(), acc_t(0));
      for (int64_t g = 0; g < G; ++g) {
        if (kv_pos[g] != r) continue;
        const int64_t hm = mask_heads[g];
        const int64_t istart = causal ? std::max<int64_t>(0, j0 - off) : 0;
        for (int64_t i = istart; i < Sq; ++i) {
          const acc_t lse_i = lsed[b * ls0 + g * ls1 + i * ls2];
          if (lse_i == inf) continue;
          const int64_t jend = std::min<int64_t>(nj, visible_keys(causal, i, off, Skv) - j0);
          if (jend <= 0) continue;
          const acc_t* qrow = qd + ((b * G + g) * Sq + i) * D;
          const acc_t* dorow = dod + ((b * G + g) * Sq + i) * D;
          const acc_t delta = deltad[(b * G + g) * Sq + i];
          if (mask.present) {
            // bias of keys j0 .. j0 + jend: shift the mask view by j0 keys
            MaskView shifted = mask;
            shifted.data = static_cast<const char*>(mask.data) + j0 * mask.s3 * at::elementSize(mask.type);
            fill_bias(shifted, b, hm, i, jend, brow.data());
          } else {
            std::fill(brow.begin(), brow.begin() + jend, acc_t(0));
          }
          for (int64_t jj = 0; jj < jend; ++jj) {
            if (brow[jj] == -inf) continue;
            const acc_t p = std::exp(dot(qrow, kb + jj * D, D) * scale + brow[jj] - lse_i);
            if (p == acc_t(0)) continue;
            const acc_t ds = p * (dot(dorow, vb + jj * D, D) - delta);
            axpy(ds * scale, qrow, dkbuf.data() + jj * D, D);
            axpy(p, dorow, dvbuf.data() + jj * D, D);
          }
        }
      }
      scalar_t* dk_out = dkd + ((b * R + r) * Skv + j0) * D;
      scalar_t* dv_out = dvd + ((b * R + r) * Skv + j0) * D;
      for (int64_t e = 0; e < nj * D; ++e) {
        dk_out[e] = static_cast<scalar_t>(dkbuf[e]);
        dv_out[e] = static_cast<scalar_t>(dvbuf[e]);
      }
    }
  });
}

void check_index(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == n &&
                  t.is_contiguous(),
              "headsparse: ", name, " must be a contiguous int64 CPU tensor of length ", n);
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "headsparse (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, "headsparse (cpu): ", name, " must be 4-d");
}

}  // namespace

at::Tensor attn_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& heads,
                        const at::Tensor& kv_heads, const at::Tensor& mask_heads, const c10::optional<at::Tensor>& mask,
                        bool causal, double scale, at::Tensor& out) {
  check_float_cpu(q, "q");
  check_float_cpu(k, "k");
  check_float_cpu(v, "v");
  check_float_cpu(out, "out");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "headsparse (cpu): q, k, v and out must share a dtype");
  const int64_t P = heads.numel();
  check_index(heads, "heads", P);
  check_index(kv_heads, "kv_heads", P);
  check_index(mask_heads, "mask_heads", P);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({q.size(0), P, q.size(2)}, q.options().dtype(acc));
  if (P == 0 || q.size(0) == 0 || q.size(2) == 0) return lse;
  const MaskView m = make_mask_view(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "headsparse_attn_forward_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, heads.data_ptr<int64_t>(), kv_heads.data_ptr<int64_t>(),
                           mask_heads.data_ptr<int64_t>(), P, m, causal, scale, out, lse);
  });
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const at::Tensor& kv_pos, const at::Tensor& mask_heads, const c10::optional<at::Tensor>& mask,
    bool causal, double scale, const c10::optional<at::Tensor>& stats) {
  for (auto* t : {&dout, &q, &k, &v, &o}) check_float_cpu(*t, "q/k/v/o/do");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  o.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(),
              "headsparse (cpu): do, q, k, v and o must share a dtype");
  const int64_t G = q.size(1);
  check_index(kv_pos, "kv_pos", G);
  check_index(mask_heads, "mask_heads", G);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 3, "headsparse (cpu): lse must be ", acc, " (B, G, Sq)");
  at::Tensor* stats_ptr = nullptr;
  at::Tensor stats_t;
  if (stats.has_value() && stats->defined()) {
    stats_t = *stats;
    TORCH_CHECK(stats_t.is_contiguous() && stats_t.dim() == 2 &&
                    (stats_t.scalar_type() == at::kFloat || stats_t.scalar_type() == at::kDouble),
                "headsparse (cpu): stats must be a contiguous float32/float64 (B, G) tensor");
    stats_ptr = &stats_t;
  }
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
  if (q.size(2) == 0 || G == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const MaskView m = make_mask_view(mask);
  // Preprocessing (FlashAttention's delta = rowsum(O * dO)) and accumulator-type copies, with ATen.
  at::Tensor qf = q.to(acc).contiguous(), kf = k.to(acc).contiguous(), vf = v.to(acc).contiguous();
  at::Tensor dof = dout.to(acc).contiguous();
  at::Tensor delta = (o.to(acc) * dof).sum(-1).contiguous();  // (B, G, Sq)
  if (stats_ptr != nullptr) stats_ptr->add_(delta.sum(-1).to(stats_ptr->scalar_type()));
  at::Tensor lse_acc = lse.to(acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "headsparse_attn_backward_cpu", [&] {
    backward_impl<scalar_t>(dof, qf, kf, vf, delta, lse_acc, kv_pos.data_ptr<int64_t>(), mask_heads.data_ptr<int64_t>(),
                            m, causal, scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace headsparse_cpu
