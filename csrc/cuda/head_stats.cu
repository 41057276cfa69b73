// Head statistics over the o_proj input X and its gradient G, and the Gram
// matrix X^T X, CUDA, on raw pointers. fp32 accumulation.
#include "hs_common.cuh"

namespace headsparse_cuda {
namespace {

using detail::to_f;

constexpr int kStatsThreads = 128;  // channels per block
constexpr int kStatsTokens = 64;    // tokens per block (grid.z splits the sequence)

// Thread = channel c; loops over a chunk of tokens of sample b.
template <typename T>
__global__ void __launch_bounds__(kStatsThreads) head_stats_kernel(const HeadStatsParams p) {
  const int c = blockIdx.x * kStatsThreads + threadIdx.x;
  const int b = blockIdx.y;
  const int t0 = blockIdx.z * kStatsTokens;
  if (c >= p.C) return;
  const int t1 = min(p.S, t0 + kStatsTokens);
  const T* xp = static_cast<const T*>(p.x) + b * p.xs0 + c * p.xs2;
  const T* gp = p.g ? static_cast<const T*>(p.g) + b * p.gs0 + c * p.gs2 : nullptr;
  float xg = 0.f, xx = 0.f, gg = 0.f, ax = 0.f, ag = 0.f;
  for (int t = t0; t < t1; ++t) {
    if (p.token_mask && !p.token_mask[b * p.ms0 + t * p.ms1]) continue;
    const float x = to_f(xp[t * p.xs1]);
    xx += x * x;
    ax += fabsf(x);
    if (gp) {
      const float g = to_f(gp[t * p.gs1]);
      xg += x * g;
      gg += g * g;
      ag += fabsf(g);
    }
  }
  const int dh = p.C / p.H;
  const int h = c / dh;
  atomicAdd(p.xx + b * p.H + h, xx);
  atomicAdd(p.abs_x + c, ax);
  if (gp) {
    atomicAdd(p.xg + b * p.H + h, xg);
    atomicAdd(p.gg + b * p.H + h, gg);
    atomicAdd(p.abs_g + c, ag);
  }
}

constexpr int kGramTile = 32;   // output tile kGramTile x kGramTile per block
constexpr int kGramRows = 8;    // thread rows; each thread computes kGramTile / kGramRows outputs
constexpr int kGramTokens = 32; // tokens staged per step

template <typename T>
__global__ void __launch_bounds__(kGramTile * kGramRows) gram_kernel(const GramParams p) {
  HS_DYNAMIC_SMEM(smem);  // dynamic rather than static, so the test emulator poisons it
  auto* xa = reinterpret_cast<float(*)[kGramTile + 1]>(smem);
  auto* xb = xa + kGramTokens;
  const int ca0 = blockIdx.y * kGramTile, cb0 = blockIdx.x * kGramTile;
  const int tx = threadIdx.x, ty = threadIdx.y;  // tx: column in tile, ty: row group
  constexpr int kPer = kGramTile / kGramRows;
  float acc[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) acc[u] = 0.f;
  const int64_t n_tokens = static_cast<int64_t>(p.B) * p.S;
  const T* x = static_cast<const T*>(p.x);
  for (int64_t n0 = 0; n0 < n_tokens; n0 += kGramTokens) {
    __syncthreads();
    for (int rr = ty; rr < kGramTokens; rr += kGramRows) {
      const int64_t n = n0 + rr;
      float va = 0.f, vb = 0.f;
      if (n < n_tokens) {
        const int64_t b = n / p.S, t = n - b * p.S;
        const bool keep = p.token_mask == nullptr || p.token_mask[b * p.ms0 + t * p.ms1];
        if (keep) {
          const T* row = x + b * p.xs0 + t * p.xs1;
          if (ca0 + tx < p.C) va = to_f(row[(ca0 + tx) * p.xs2]);
          if (cb0 + tx < p.C) vb = to_f(row[(cb0 + tx) * p.xs2]);
        }
      }
      xa[rr][tx] = va;
      xb[rr][tx] = vb;
    }
    __syncthreads();
#pragma unroll 4
    for (int rr = 0; rr < kGramTokens; ++rr) {
      const float bv = xb[rr][tx];
#pragma unroll
      for (int u = 0; u < kPer; ++u) acc[u] += xa[rr][ty + u * kGramRows] * bv;
    }
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int ca = ca0 + ty + u * kGramRows, cb = cb0 + tx;
    if (ca < p.C && cb < p.C) p.out[static_cast<int64_t>(ca) * p.C + cb] = acc[u];
  }
}

template <typename T>
cudaError_t launch_head_stats(const HeadStatsParams& p, cudaStream_t stream) {
  const dim3 grid((p.C + kStatsThreads - 1) / kStatsThreads, p.B, (p.S + kStatsTokens - 1) / kStatsTokens);
  auto* head_stats_simt = head_stats_kernel<T>;
  return HS_LAUNCH(head_stats_simt, grid, kStatsThreads, 0, stream, p);
}

template <typename T>
cudaError_t launch_gram(const GramParams& p, cudaStream_t stream) {
  const int tiles = (p.C + kGramTile - 1) / kGramTile;
  const dim3 grid(tiles, tiles);
  auto* gram_simt = gram_kernel<T>;
  constexpr size_t smem = 2 * kGramTokens * (kGramTile + 1) * sizeof(float);
  return HS_LAUNCH(gram_simt, grid, dim3(kGramTile, kGramRows), smem, stream, p);
}

}  // namespace

cudaError_t head_stats(const HeadStatsParams& p, cudaStream_t stream) {
  if (p.H <= 0 || p.C % p.H != 0) return cudaErrorInvalidValue;
  if (p.B == 0 || p.S == 0 || p.C == 0) return cudaSuccess;
  switch (p.dtype) {
    case kF32:
      return launch_head_stats<float>(p, stream);
    case kF16:
      return launch_head_stats<__half>(p, stream);
    case kBF16:
      return launch_head_stats<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t gram(const GramParams& p, cudaStream_t stream) {
  if (p.C == 0) return cudaSuccess;
  switch (p.dtype) {
    case kF32:
      return launch_gram<float>(p, stream);
    case kF16:
      return launch_gram<__half>(p, stream);
    case kBF16:
      return launch_gram<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace headsparse_cuda
