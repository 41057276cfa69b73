// Head-sparse attention on tensor cores: fp16/bf16 inputs, fp32 accumulation,
// WMMA m16n16k16 tiles (sm_80 and newer). Same semantics and parameters as the
// CUDA-core kernels in attention.cu, which remain the path for fp32, for head
// dims that are not a multiple of 16 or exceed 128, and for older GPUs.
//
// Forward (one block = 64 query rows of one program p, 4 warps of 16 rows):
//   S = Q K^T on tensor cores, online softmax in fp32 through shared memory,
//   P rounded to the input dtype (as FlashAttention does), O += P V on tensor
//   cores. WMMA hides which row a lane's accumulator elements belong to, so a
//   rescale of O goes through shared memory (the consumed score tile), and only
//   when some row's max moved.
// Backward (one block = 64 keys of one compact KV head, 4 warps of 16 keys):
//   dK and dV stay in accumulator fragments for the whole pass (no atomics);
//   each warp owns its 16 key columns of P and dS, so only dQ = dS K needs the
//   whole block, and it is added to the fp32 dq workspace with atomics.
#include <type_traits>

#include "hs_common.cuh"

namespace headsparse_cuda {
namespace detail {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = kWarps * 16;  // forward: query rows per block
constexpr int kKeyTile = 64;                // forward: keys per K/V tile; backward: keys per block
constexpr int kQueryTile = 64;              // backward: query rows per step
constexpr int kPad16 = 8;                   // row padding of 16-bit tiles (ldm stays a multiple of 8)
constexpr int kPad32 = 4;                   // row padding of fp32 tiles (ldm stays a multiple of 4)

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) & ~static_cast<size_t>(127); }

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragAt = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;  // transposed read
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // transposed read
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Shared-memory layout of the forward kernel, byte offsets (16-bit elements are 2 bytes). The Q tile is
// dead once each warp holds its Q fragments, so the per-warp score/probability tiles reuse its space, and
// O goes through the score tile 64 columns at a time: 62 KiB at D = 128, three blocks per H100 SM.
template <int D>
struct FwdLayout {
  static constexpr int ld = D + kPad16;           // Q, K, V tiles
  static constexpr int ld_s = kKeyTile + kPad32;  // per-warp scores (and O staging), fp32
  static constexpr int ld_p = kKeyTile + kPad16;  // per-warp probabilities, 16-bit
  static constexpr size_t k = 0;
  static constexpr size_t v = align128(k + size_t(kKeyTile) * ld * 2);
  static constexpr size_t q = align128(v + size_t(kKeyTile) * ld * 2);
  static constexpr size_t warps = q;  // aliases the Q tile
  static constexpr size_t w_s = 0;
  static constexpr size_t w_p = align128(w_s + 16 * ld_s * 4);
  static constexpr size_t per_warp = align128(w_p + 16 * ld_p * 2);
  static constexpr size_t q_end = align128(q + size_t(kRowsPerBlock) * ld * 2);
  static constexpr size_t warps_end = warps + kWarps * per_warp;
  static constexpr size_t stats = q_end > warps_end ? q_end : warps_end;  // row max, sum, rescale per warp
  static constexpr size_t total = align128(stats + kWarps * 3 * 16 * 4);
};

// Shared-memory layout of the backward kernel.
template <int D>
struct BwdLayout {
  static constexpr int ld = D + kPad16;           // K, V, Q, dO tiles
  static constexpr int ld_p = kKeyTile + kPad16;  // P and dS (query rows x block keys), 16-bit
  static constexpr int ld_s = 16 + kPad32;        // per-warp scores and dP (16 query rows x 16 keys), fp32
  static constexpr int ld_stage = D + kPad32;     // fp32 staging of dQ / dK / dV rows
  static constexpr size_t k = 0;
  static constexpr size_t v = align128(k + size_t(kKeyTile) * ld * 2);
  static constexpr size_t q = align128(v + size_t(kKeyTile) * ld * 2);
  static constexpr size_t dout = align128(q + size_t(kQueryTile) * ld * 2);
  static constexpr size_t stage = q;  // aliases Q and dO, which are dead whenever it is used
  static constexpr size_t p = align128(dout + size_t(kQueryTile) * ld * 2);
  static constexpr size_t ds = align128(p + size_t(kQueryTile) * ld_p * 2);
  static constexpr size_t warps = align128(ds + size_t(kQueryTile) * ld_p * 2);
  static constexpr size_t w_s = 0;
  static constexpr size_t w_dp = align128(w_s + 16 * ld_s * 4);
  static constexpr size_t per_warp = align128(w_dp + 16 * ld_s * 4);
  static constexpr size_t rows = warps + kWarps * per_warp;  // lse and delta of the query tile
  static constexpr size_t total = align128(rows + 2 * kQueryTile * 4);
  static_assert(size_t(kQueryTile) * ld_stage * 4 <= p - q, "staging must fit in the Q and dO tiles");
};

// Rows [r0, r0 + n) of a strided (rows, D) matrix into shared memory [n][ld]; rows >= limit are zero.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int64_t s_row, int64_t s_col, int r0, int n,
                                          int limit) {
  const bool vec = s_col == 1 && s_row % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;  // block-uniform
  if (vec) {
    constexpr int kVecs = D / 8;
    for (int idx = threadIdx.x; idx < n * kVecs; idx += blockDim.x) {
      const int rr = idx / kVecs, c = (idx - rr * kVecs) * 8, r = r0 + rr;
      const uint4 val = r < limit ? load_vec16(src + static_cast<int64_t>(r) * s_row + c) : make_uint4(0, 0, 0, 0);
      store_vec16(dst + rr * ld + c, val);
    }
  } else {
    for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
      const int rr = idx / D, c = idx - rr * D, r = r0 + rr;
      dst[rr * ld + c] = r < limit ? src[static_cast<int64_t>(r) * s_row + c * s_col] : from_f<T>(0.f);
    }
  }
}

// A warp's 16 x D accumulator fragments times `scale` into rows [row0, row0 + 16) of a contiguous (rows, D)
// matrix in global memory (rows >= limit skipped), through the warp's fp32 staging rows (leading dim ld).
template <typename T, int D>
__device__ __forceinline__ void store_warp_rows(const FragC (&f)[D / 16], float* stage, int ld, T* dst, int row0,
                                                int limit, float scale) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 0; d < D / 16; ++d) wmma::store_matrix_sync(stage + d * 16, f[d], ld, wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < 16 * D; e += 32) {
    const int rr = e / D, c = e - rr * D, j = row0 + rr;
    if (j < limit) dst[static_cast<int64_t>(j) * D + c] = from_f<T>(stage[rr * ld + c] * scale);
  }
  __syncwarp();  // the staging is read before the caller reuses it
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_tc_kernel(const AttnFwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = FwdLayout<D>;
  constexpr int DF = D / 16;  // fragments across the head dim
  HS_DYNAMIC_SMEM(smem);
  T* qs = reinterpret_cast<T*>(smem + L::q);
  T* ks = reinterpret_cast<T*>(smem + L::k);
  T* vs = reinterpret_cast<T*>(smem + L::v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* wsm = smem + L::warps + warp * L::per_warp;
  float* sw = reinterpret_cast<float*>(wsm + L::w_s);
  T* pw = reinterpret_cast<T*>(wsm + L::w_p);
  float* row_max = reinterpret_cast<float*>(smem + L::stats) + warp * 3 * 16;
  float* row_sum = row_max + 16;
  float* row_alpha = row_sum + 16;

  const int prog = blockIdx.y, b = blockIdx.z;
  const int Sq = p.Sq, Skv = p.Skv, off = Skv - Sq;
  const int row0 = blockIdx.x * kRowsPerBlock, wrow0 = row0 + warp * 16;
  const int64_t h = p.heads[prog], hk = p.kv_heads[prog], hm = p.mask_heads[prog];
  const T* qp = static_cast<const T*>(p.q.data) + b * p.q.s0 + h * p.q.s1;
  const T* kp = static_cast<const T*>(p.k.data) + b * p.k.s0 + hk * p.k.s1;
  const T* vp = static_cast<const T*>(p.v.data) + b * p.v.s0 + hk * p.v.s1;

  load_rows<T, D>(qs, L::ld, qp, p.q.s2, p.q.s3, row0, kRowsPerBlock, Sq);
  if (lane < 16) {
    row_max[lane] = -INFINITY;
    row_sum[lane] = 0.f;
  }
  __syncthreads();
  FragA<T> qf[DF];
  FragC of[DF];
#pragma unroll
  for (int d = 0; d < DF; ++d) {
    wmma::load_matrix_sync(qf[d], qs + warp * 16 * L::ld + d * 16, L::ld);
    wmma::fill_fragment(of[d], 0.f);
  }
  __syncthreads();  // every warp holds its Q fragments before any warp reuses the Q tile as scratch

  // Keys the block, and this warp, may see (bottom-right causal alignment).
  int kend = Skv, warp_kend = wrow0 < Sq ? Skv : 0;
  if (p.causal) {
    kend = max(0, min(Skv, min(Sq - 1, row0 + kRowsPerBlock - 1) + off + 1));
    if (wrow0 < Sq) warp_kend = max(0, min(Skv, min(Sq - 1, wrow0 + 15) + off + 1));
  }

  for (int j0 = 0; j0 < kend; j0 += kKeyTile) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_rows<T, D>(ks, L::ld, kp, p.k.s2, p.k.s3, j0, kKeyTile, Skv);
    load_rows<T, D>(vs, L::ld, vp, p.v.s2, p.v.s3, j0, kKeyTile, Skv);
    __syncthreads();
    if (j0 >= warp_kend) continue;  // warp-uniform: no row of this warp sees these keys

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
#pragma unroll
    for (int n = 0; n < kKeyTile / 16; ++n) {
      FragC s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int d = 0; d < DF; ++d) {
        FragBt<T> kb;
        wmma::load_matrix_sync(kb, ks + n * 16 * L::ld + d * 16, L::ld);
        wmma::mma_sync(s, qf[d], kb, s);
      }
      wmma::store_matrix_sync(sw + n * 16, s, L::ld_s, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: lanes 2r and 2r+1 share row r, 32 keys each.
    bool rescale = false;
    {
      const int r = lane >> 1, c0 = (lane & 1) * 32, i = wrow0 + r;
      const int jlim = i < Sq ? (p.causal ? min(Skv, i + off + 1) : Skv) : 0;  // keys j < jlim are visible
      float* srow = sw + r * L::ld_s + c0;
      float tmax = -INFINITY;
      for (int c = 0; c < 32; ++c) {
        const int j = j0 + c0 + c;
        const float s = j < jlim ? srow[c] * p.scale + mask_bias(p.mask, p.mask_kind, b, hm, i, j) : -INFINITY;
        srow[c] = s;
        tmax = fmaxf(tmax, s);
      }
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
      const float m_old = row_max[r], l_old = row_sum[r];
      const float m_new = fmaxf(m_old, tmax);
      const bool live = m_new != -INFINITY;  // false: nothing visible in this row so far
      const float alpha = live ? expf(m_old - m_new) : 1.f;
      float sum = 0.f;
      T* prow = pw + r * L::ld_p + c0;
      for (int c = 0; c < 32; ++c) {
        const float pv = live ? expf(srow[c] - m_new) : 0.f;  // exp(-inf) = 0 for hidden keys
        prow[c] = from_f<T>(pv);
        sum += pv;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      rescale = alpha != 1.f && l_old > 0.f;
      if ((lane & 1) == 0) {
        row_max[r] = m_new;
        row_sum[r] = l_old * alpha + sum;
        row_alpha[r] = alpha;
      }
    }
    const bool any_rescale = __any_sync(0xffffffffu, rescale);
    __syncwarp();

    if (any_rescale) {  // O *= alpha per row, through the (consumed) score tile, 4 fragments at a time
#pragma unroll
      for (int d0 = 0; d0 < DF; d0 += 4) {
        const int nf = min(4, DF - d0);
#pragma unroll
        for (int f = 0; f < nf; ++f) wmma::store_matrix_sync(sw + f * 16, of[d0 + f], L::ld_s, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 16 * 16 * nf; e += 32) {
          const int r = e / (16 * nf), c = e - r * 16 * nf;
          sw[r * L::ld_s + c] *= row_alpha[r];
        }
        __syncwarp();
#pragma unroll
        for (int f = 0; f < nf; ++f) wmma::load_matrix_sync(of[d0 + f], sw + f * 16, L::ld_s, wmma::mem_row_major);
        __syncwarp();  // all lanes have read the tile before the next chunk overwrites it
      }
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      FragA<T> pa;
      wmma::load_matrix_sync(pa, pw + kk * 16, L::ld_p);
#pragma unroll
      for (int d = 0; d < DF; ++d) {
        FragB<T> vb;
        wmma::load_matrix_sync(vb, vs + kk * 16 * L::ld + d * 16, L::ld);
        wmma::mma_sync(of[d], pa, vb, of[d]);
      }
    }
  }

  // O / l into the output, 64 columns at a time through the score tile; lse = m + log l (+inf for rows
  // with nothing to attend).
  T* op = static_cast<T*>(const_cast<void*>(p.out.data)) + b * p.out.s0 + h * p.out.s1;
#pragma unroll
  for (int d0 = 0; d0 < DF; d0 += 4) {
    const int nf = min(4, DF - d0);
#pragma unroll
    for (int f = 0; f < nf; ++f) wmma::store_matrix_sync(sw + f * 16, of[d0 + f], L::ld_s, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * 16 * nf; e += 32) {
      const int r = e / (16 * nf), c = e - r * 16 * nf, i = wrow0 + r;
      if (i >= Sq) continue;
      const float l = row_sum[r];
      op[static_cast<int64_t>(i) * p.out.s2 + static_cast<int64_t>(d0 * 16 + c) * p.out.s3] =
          from_f<T>(l > 0.f ? sw[r * L::ld_s + c] / l : 0.f);
    }
    __syncwarp();
  }
  if (lane < 16 && wrow0 + lane < Sq) {
    const float l = row_sum[lane];
    p.lse[(static_cast<int64_t>(b) * p.P + prog) * Sq + wrow0 + lane] = l > 0.f ? row_max[lane] + logf(l) : INFINITY;
  }
#else
  __trap();  // built below sm_80: never dispatched (attn_tc_smem_limit), and loud if it ever is
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_tc_kernel(const AttnBwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = BwdLayout<D>;
  constexpr int DF = D / 16;
  HS_DYNAMIC_SMEM(smem);
  T* ks = reinterpret_cast<T*>(smem + L::k);
  T* vs = reinterpret_cast<T*>(smem + L::v);
  T* qs = reinterpret_cast<T*>(smem + L::q);
  T* dos = reinterpret_cast<T*>(smem + L::dout);
  float* stage = reinterpret_cast<float*>(smem + L::stage);
  T* ps = reinterpret_cast<T*>(smem + L::p);
  T* dss = reinterpret_cast<T*>(smem + L::ds);
  float* lse_s = reinterpret_cast<float*>(smem + L::rows);
  float* delta_s = lse_s + kQueryTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* wsm = smem + L::warps + warp * L::per_warp;
  float* sw = reinterpret_cast<float*>(wsm + L::w_s);
  float* dpw = reinterpret_cast<float*>(wsm + L::w_dp);

  const int r = blockIdx.y, b = blockIdx.z;
  const int Sq = p.Sq, Skv = p.Skv, off = Skv - Sq;
  const int j0 = blockIdx.x * kKeyTile, jw = j0 + warp * 16;  // first key of the block, of this warp
  const T* kp = static_cast<const T*>(p.k.data) + b * p.k.s0 + r * p.k.s1;
  const T* vp = static_cast<const T*>(p.v.data) + b * p.v.s0 + r * p.v.s1;
  load_rows<T, D>(ks, L::ld, kp, p.k.s2, p.k.s3, j0, kKeyTile, Skv);
  load_rows<T, D>(vs, L::ld, vp, p.v.s2, p.v.s3, j0, kKeyTile, Skv);

  FragC dkf[DF], dvf[DF];
#pragma unroll
  for (int d = 0; d < DF; ++d) {
    wmma::fill_fragment(dkf[d], 0.f);
    wmma::fill_fragment(dvf[d], 0.f);
  }

  for (int g = 0; g < p.G; ++g) {
    if (p.kv_pos[g] != r) continue;  // block-uniform
    const GradHead<T> gh = grad_head<T>(p, b, g);
    const int istart = p.causal ? max(0, j0 - off) : 0;  // earlier rows see none of the block's keys
    for (int i0 = istart; i0 < Sq; i0 += kQueryTile) {
      __syncthreads();  // staging (aliasing Q/dO) and P/dS of the previous step are consumed
      load_rows<T, D>(qs, L::ld, gh.q, p.q.s2, p.q.s3, i0, kQueryTile, Sq);
      load_rows<T, D>(dos, L::ld, gh.dout, p.dout.s2, p.dout.s3, i0, kQueryTile, Sq);
      for (int t = threadIdx.x; t < kQueryTile; t += blockDim.x) {
        const int i = i0 + t;
        lse_s[t] = i < Sq ? gh.lse[static_cast<int64_t>(i) * p.lse_s2] : INFINITY;
        delta_s[t] = i < Sq ? gh.delta[i] : 0.f;
      }
      __syncthreads();

      // Per 16-row block m: S = Q K_w^T and dP = dO V_w^T against this warp's 16 keys, then
      // P = exp(S * scale + bias - lse) and dS = P (dP - delta) into the warp's columns of the P/dS tiles.
#pragma unroll
      for (int m = 0; m < kQueryTile / 16; ++m) {
        FragC s, dp;
        wmma::fill_fragment(s, 0.f);
        wmma::fill_fragment(dp, 0.f);
#pragma unroll
        for (int d = 0; d < DF; ++d) {
          FragA<T> qa, doa;
          FragBt<T> kb, vb;
          wmma::load_matrix_sync(qa, qs + m * 16 * L::ld + d * 16, L::ld);
          wmma::load_matrix_sync(kb, ks + warp * 16 * L::ld + d * 16, L::ld);
          wmma::mma_sync(s, qa, kb, s);
          wmma::load_matrix_sync(doa, dos + m * 16 * L::ld + d * 16, L::ld);
          wmma::load_matrix_sync(vb, vs + warp * 16 * L::ld + d * 16, L::ld);
          wmma::mma_sync(dp, doa, vb, dp);
        }
        wmma::store_matrix_sync(sw, s, L::ld_s, wmma::mem_row_major);
        wmma::store_matrix_sync(dpw, dp, L::ld_s, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 16 * 16; e += 32) {
          const int rr = m * 16 + e / 16, c = e % 16, i = i0 + rr, j = jw + c;
          float pv = 0.f, ds = 0.f;
          const float lse_i = lse_s[rr];
          if (i < Sq && j < Skv && !(p.causal && j > i + off) && lse_i != INFINITY) {
            const float sv =
                sw[(e / 16) * L::ld_s + c] * p.scale + mask_bias(p.mask, p.mask_kind, b, gh.mask_head, i, j);
            pv = expf(sv - lse_i);
            ds = pv * (dpw[(e / 16) * L::ld_s + c] - delta_s[rr]);
          }
          ps[rr * L::ld_p + warp * 16 + c] = from_f<T>(pv);
          dss[rr * L::ld_p + warp * 16 + c] = from_f<T>(ds);
        }
        __syncwarp();  // the scratch is read before block m + 1 overwrites it; P/dS are visible to the warp
      }

      // dV_w += P_w^T dO and dK_w += dS_w^T Q.
#pragma unroll
      for (int kk = 0; kk < kQueryTile / 16; ++kk) {
        FragAt<T> pa, dsa;
        wmma::load_matrix_sync(pa, ps + kk * 16 * L::ld_p + warp * 16, L::ld_p);
        wmma::load_matrix_sync(dsa, dss + kk * 16 * L::ld_p + warp * 16, L::ld_p);
#pragma unroll
        for (int d = 0; d < DF; ++d) {
          FragB<T> dob, qb;
          wmma::load_matrix_sync(dob, dos + kk * 16 * L::ld + d * 16, L::ld);
          wmma::mma_sync(dvf[d], pa, dob, dvf[d]);
          wmma::load_matrix_sync(qb, qs + kk * 16 * L::ld + d * 16, L::ld);
          wmma::mma_sync(dkf[d], dsa, qb, dkf[d]);
        }
      }
      __syncthreads();  // dS is complete; Q and dO are dead, so the staging may overwrite them

      // dQ for the tile's rows 16w..16w+15: dS (16 x 64 keys) K (64 x D), added to the fp32 workspace.
#pragma unroll
      for (int d = 0; d < DF; ++d) {
        FragC dq;
        wmma::fill_fragment(dq, 0.f);
#pragma unroll
        for (int kk = 0; kk < kKeyTile / 16; ++kk) {
          FragA<T> dsa;
          FragB<T> kb;
          wmma::load_matrix_sync(dsa, dss + warp * 16 * L::ld_p + kk * 16, L::ld_p);
          wmma::load_matrix_sync(kb, ks + kk * 16 * L::ld + d * 16, L::ld);
          wmma::mma_sync(dq, dsa, kb, dq);
        }
        wmma::store_matrix_sync(stage + warp * 16 * L::ld_stage + d * 16, dq, L::ld_stage, wmma::mem_row_major);
      }
      __syncwarp();
      for (int e = lane; e < 16 * D; e += 32) {
        const int rr = e / D, c = e - rr * D, i = i0 + warp * 16 + rr;
        if (i < Sq)
          atomicAdd(gh.dq + static_cast<int64_t>(i) * D + c, stage[(warp * 16 + rr) * L::ld_stage + c] * p.scale);
      }
    }
  }

  // dK (scaled) and dV of this warp's keys, through its rows of the staging.
  __syncthreads();
  float* wstage = stage + warp * 16 * L::ld_stage;
  T* dkp = static_cast<T*>(p.dk) + ((static_cast<int64_t>(b) * p.R + r) * Skv) * D;
  T* dvp = static_cast<T*>(p.dv) + ((static_cast<int64_t>(b) * p.R + r) * Skv) * D;
  store_warp_rows<T, D>(dkf, wstage, L::ld_stage, dkp, jw, Skv, p.scale);
  store_warp_rows<T, D>(dvf, wstage, L::ld_stage, dvp, jw, Skv, 1.f);
#else
  __trap();
#endif
}

template <typename T, int D>
cudaError_t launch_fwd_tc(const AttnFwdParams& p, cudaStream_t stream) {
  constexpr size_t smem = FwdLayout<D>::total;
  auto* attn_fwd_tc = attn_fwd_tc_kernel<T, D>;
  const cudaError_t e = allow_dynamic_smem(attn_fwd_tc, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.Sq + kRowsPerBlock - 1) / kRowsPerBlock, p.P, p.B);
  return HS_LAUNCH(attn_fwd_tc, grid, kThreads, smem, stream, p);
}

template <typename T, int D>
cudaError_t launch_bwd_tc(const AttnBwdParams& p, cudaStream_t stream) {
  constexpr size_t smem = BwdLayout<D>::total;
  auto* attn_bwd_tc = attn_bwd_tc_kernel<T, D>;
  const cudaError_t e = allow_dynamic_smem(attn_bwd_tc, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.Skv + kKeyTile - 1) / kKeyTile, p.R, p.B);
  return HS_LAUNCH(attn_bwd_tc, grid, kThreads, smem, stream, p);
}

// f(std::integral_constant<int, D>{}) for the head dims with compiled kernels, `otherwise` for the rest.
template <typename R, typename F>
R with_head_dim(int d, R otherwise, F&& f) {
  switch (d) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 48: return f(std::integral_constant<int, 48>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 112: return f(std::integral_constant<int, 112>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return otherwise;
  }
}

template <typename T>
cudaError_t fwd_dim(const AttnFwdParams& p, cudaStream_t s) {
  return with_head_dim(p.D, cudaError_t(cudaErrorInvalidValue),
                       [&](auto dim) { return launch_fwd_tc<T, decltype(dim)::value>(p, s); });
}

template <typename T>
cudaError_t bwd_dim(const AttnBwdParams& p, cudaStream_t s) {
  return with_head_dim(p.D, cudaError_t(cudaErrorInvalidValue),
                       [&](auto dim) { return launch_bwd_tc<T, decltype(dim)::value>(p, s); });
}

}  // namespace

size_t attn_tc_smem_limit() {
  // Device properties do not change, so they are read once per device: per-call queries would sit on the
  // hot path of every attention call.
  constexpr int kMaxDevices = 64;
  struct Verdict {
    bool known;
    size_t limit;
  };
  static Verdict cache[kMaxDevices] = {};  // a benign race: every writer stores the same verdict
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 0;
#ifdef HS_CUDA_EMULATION
  cache[dev].known = false;  // the test emulator swaps its device between tests
#endif
  if (!cache[dev].known) {
    int major = 0, optin = 0;
    cudaFuncAttributes attr;
    // The driver may run a binary or JIT-compiled PTX built for an older architecture than the device (say
    // TORCH_CUDA_ARCH_LIST="7.5+PTX" on an H100); there the kernels are a trap.
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    major >= 8 &&
                    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
                    cudaFuncGetAttributes(&attr, attn_fwd_tc_kernel<__half, 64>) == cudaSuccess &&
                    attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
    cache[dev].limit = ok ? static_cast<size_t>(optin) : 0;
    cache[dev].known = true;
  }
  return cache[dev].limit;
}

size_t attn_forward_tc_smem(int head_dim) {
  return with_head_dim(head_dim, size_t(0), [](auto dim) { return FwdLayout<decltype(dim)::value>::total; });
}
size_t attn_backward_tc_smem(int head_dim) {
  return with_head_dim(head_dim, size_t(0), [](auto dim) { return BwdLayout<decltype(dim)::value>::total; });
}

cudaError_t attn_forward_tc(const AttnFwdParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kF16: return fwd_dim<__half>(p, stream);
    case kBF16: return fwd_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attn_backward_tc(const AttnBwdParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kF16: return bwd_dim<__half>(p, stream);
    case kBF16: return bwd_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace headsparse_cuda
