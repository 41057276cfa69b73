// Head-sparse attention forward and backward, CUDA, on raw pointers.
//
// These are the CUDA-core kernels (fp32 accumulation, any head dim up to 256,
// any dtype); fp16/bf16 calls with a head dim that is a multiple of 16 up to
// 128 go to the tensor-core kernels of attention_tc.cu on sm_80 and newer (see
// use_tensor_cores). Semantics are those of headsparse.ops.torch_backend:
//   forward: one grid row per program p (query head heads[p], KV head
//     kv_heads[p]); pruned heads are simply not in the list.
//   backward: compact tensors; one block per (key tile, compact KV head, batch)
//     owns dK/dV of its keys (no atomics) and loops over the grad heads that
//     read that KV head; dQ is accumulated in fp32 with atomics.
//
// Layout of work inside a warp: lane l holds head-dim elements d = l + 32 t,
// t < DPL (so DPL = ceil(D / 32) registers per row).
#include <cstdlib>

#include "hs_common.cuh"

namespace headsparse_cuda {
namespace {

using detail::from_f;
using detail::mask_bias;
using detail::to_f;
using detail::warp_max;
using detail::warp_sum;

constexpr int kFwdWarps = 4;
constexpr int kFwdRowsPerWarp = 4;
constexpr int kFwdRows = kFwdWarps * kFwdRowsPerWarp;  // query rows per block
constexpr int kKeyTile = 32;                           // keys per shared-memory tile (one per lane)

template <typename T, int DPL>
__global__ void __launch_bounds__(kFwdWarps * 32) attn_fwd_kernel(const AttnFwdParams p) {
  HS_DYNAMIC_SMEM(smem_raw);
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + kKeyTile * p.D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int prog = blockIdx.y, b = blockIdx.z;
  const int row0 = blockIdx.x * kFwdRows;
  const int D = p.D, Sq = p.Sq, Skv = p.Skv;
  const int off = Skv - Sq;
  const int64_t h = p.heads[prog], hk = p.kv_heads[prog], hm = p.mask_heads[prog];

  const T* qp = static_cast<const T*>(p.q.data) + b * p.q.s0 + h * p.q.s1;
  const T* kp = static_cast<const T*>(p.k.data) + b * p.k.s0 + hk * p.k.s1;
  const T* vp = static_cast<const T*>(p.v.data) + b * p.v.s0 + hk * p.v.s1;

  float qr[kFwdRowsPerWarp][DPL], acc[kFwdRowsPerWarp][DPL], m[kFwdRowsPerWarp], l[kFwdRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kFwdRowsPerWarp; ++r) {
    const int i = row0 + warp * kFwdRowsPerWarp + r;
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      qr[r][t] = (i < Sq && d < D) ? to_f(qp[i * p.q.s2 + d * p.q.s3]) * p.scale : 0.f;
      acc[r][t] = 0.f;
    }
  }

  // Keys any row of this block may see.
  int kend = Skv;
  if (p.causal) {
    const int last_row = min(Sq - 1, row0 + kFwdRows - 1);
    kend = max(0, min(Skv, last_row + off + 1));
  }

  for (int j0 = 0; j0 < kend; j0 += kKeyTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kKeyTile * D; idx += blockDim.x) {
      const int jj = idx / D, d = idx - jj * D, j = j0 + jj;
      ks[idx] = j < Skv ? kp[j * p.k.s2 + d * p.k.s3] : from_f<T>(0.f);
      vs[idx] = j < Skv ? vp[j * p.v.s2 + d * p.v.s3] : from_f<T>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kFwdRowsPerWarp; ++r) {
      const int i = row0 + warp * kFwdRowsPerWarp + r;
      if (i >= Sq) continue;  // warp-uniform
      const int jlim = p.causal ? min(Skv, i + off + 1) : Skv;
      if (j0 >= jlim) continue;
      const int nj = min(kKeyTile, jlim - j0);
      float my_s = -INFINITY;  // lane jj ends up with the score of key j0 + jj
      for (int jj = 0; jj < nj; ++jj) {
        float part = 0.f;
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
          const int d = lane + 32 * t;
          if (d < D) part += qr[r][t] * to_f(ks[jj * D + d]);
        }
        const float s = warp_sum(part);
        if (lane == jj) my_s = s;
      }
      if (lane < nj) my_s += mask_bias(p.mask, p.mask_kind, b, hm, i, j0 + lane);
      const float tmax = warp_max(my_s);
      if (tmax == -INFINITY) continue;  // nothing visible in this tile
      const float m_new = fmaxf(m[r], tmax);
      const float alpha = expf(m[r] - m_new);  // 0 when m[r] = -inf
      const float pl = expf(my_s - m_new);     // 0 for masked keys
      l[r] = l[r] * alpha + warp_sum(pl);
#pragma unroll
      for (int t = 0; t < DPL; ++t) acc[r][t] *= alpha;
      for (int jj = 0; jj < nj; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, pl, jj);
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
          const int d = lane + 32 * t;
          if (d < D) acc[r][t] += pj * to_f(vs[jj * D + d]);
        }
      }
      m[r] = m_new;
    }
  }

  T* op = static_cast<T*>(const_cast<void*>(p.out.data)) + b * p.out.s0 + h * p.out.s1;
#pragma unroll
  for (int r = 0; r < kFwdRowsPerWarp; ++r) {
    const int i = row0 + warp * kFwdRowsPerWarp + r;
    if (i >= Sq) continue;
    const bool empty = !(l[r] > 0.f);
    const float inv = empty ? 0.f : 1.f / l[r];
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) op[i * p.out.s2 + d * p.out.s3] = from_f<T>(acc[r][t] * inv);
    }
    if (lane == 0) p.lse[(static_cast<int64_t>(b) * p.P + prog) * Sq + i] = empty ? INFINITY : m[r] + logf(l[r]);
  }
}

// delta[b, g, i] = sum_d o * do; stats[b, g] += sum_i delta. One warp per row.
template <typename T, int DPL>
__global__ void attn_bwd_preprocess_kernel(const AttnBwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * (blockDim.x / 32) + warp;
  const int g = blockIdx.y, b = blockIdx.z;
  if (i >= p.Sq) return;
  const T* op = static_cast<const T*>(p.o.data) + b * p.o.s0 + g * p.o.s1 + i * p.o.s2;
  const T* dop = static_cast<const T*>(p.dout.data) + b * p.dout.s0 + g * p.dout.s1 + i * p.dout.s2;
  float part = 0.f;
#pragma unroll
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < p.D) part += to_f(op[d * p.o.s3]) * to_f(dop[d * p.dout.s3]);
  }
  const float delta = warp_sum(part);
  if (lane == 0) {
    p.delta[(static_cast<int64_t>(b) * p.G + g) * p.Sq + i] = delta;
    if (p.stats != nullptr) atomicAdd(p.stats + static_cast<int64_t>(b) * p.G + g, delta);
  }
}

constexpr int kBwdWarps = 4;
constexpr int kBwdRowChunk = 8;  // query rows staged in shared memory at a time

// One block: keys [j0, j0 + kBwdWarps * KPW) of compact KV head r in batch b.
template <typename T, int DPL, int KPW>
__global__ void __launch_bounds__(kBwdWarps * 32) attn_bwd_kernel(const AttnBwdParams p) {
  HS_DYNAMIC_SMEM(smem_raw);
  float* qs = reinterpret_cast<float*>(smem_raw);  // [kBwdRowChunk][D]
  float* dos = qs + kBwdRowChunk * p.D;            // [kBwdRowChunk][D]
  float* lses = dos + kBwdRowChunk * p.D;          // [kBwdRowChunk]
  float* deltas = lses + kBwdRowChunk;             // [kBwdRowChunk]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = blockIdx.y, b = blockIdx.z;
  const int D = p.D, Sq = p.Sq, Skv = p.Skv;
  const int off = Skv - Sq;
  const int j0 = blockIdx.x * (kBwdWarps * KPW);
  const int jw = j0 + warp * KPW;  // first key of this warp

  const T* kp = static_cast<const T*>(p.k.data) + b * p.k.s0 + r * p.k.s1;
  const T* vp = static_cast<const T*>(p.v.data) + b * p.v.s0 + r * p.v.s1;
  float kr[KPW][DPL], vr[KPW][DPL], dk[KPW][DPL], dv[KPW][DPL];
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
    const int j = jw + kk;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      const bool ok = j < Skv && d < D;
      kr[kk][t] = ok ? to_f(kp[j * p.k.s2 + d * p.k.s3]) : 0.f;
      vr[kk][t] = ok ? to_f(vp[j * p.v.s2 + d * p.v.s3]) : 0.f;
      dk[kk][t] = 0.f;
      dv[kk][t] = 0.f;
    }
  }

  for (int g = 0; g < p.G; ++g) {
    if (p.kv_pos[g] != r) continue;  // block-uniform
    const detail::GradHead<T> gh = detail::grad_head<T>(p, b, g);
    const int istart = p.causal ? max(0, j0 - off) : 0;
    for (int i0 = istart; i0 < Sq; i0 += kBwdRowChunk) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < kBwdRowChunk * D; idx += blockDim.x) {
        const int ii = idx / D, d = idx - ii * D, i = i0 + ii;
        qs[idx] = i < Sq ? to_f(gh.q[i * p.q.s2 + d * p.q.s3]) : 0.f;
        dos[idx] = i < Sq ? to_f(gh.dout[i * p.dout.s2 + d * p.dout.s3]) : 0.f;
      }
      if (threadIdx.x < kBwdRowChunk) {
        const int i = i0 + threadIdx.x;
        lses[threadIdx.x] = i < Sq ? gh.lse[i * p.lse_s2] : INFINITY;
        deltas[threadIdx.x] = i < Sq ? gh.delta[i] : 0.f;
      }
      __syncthreads();
      const int nrows = min(kBwdRowChunk, Sq - i0);
      for (int ii = 0; ii < nrows; ++ii) {
        const int i = i0 + ii;
        const float lse_i = lses[ii], delta_i = deltas[ii];
        if (lse_i == INFINITY) continue;  // nothing attended: p = 0 everywhere
        float dq[DPL];
#pragma unroll
        for (int t = 0; t < DPL; ++t) dq[t] = 0.f;
        bool any = false;
#pragma unroll
        for (int kk = 0; kk < KPW; ++kk) {
          const int j = jw + kk;
          if (j >= Skv || (p.causal && j > i + off)) continue;  // warp-uniform
          float sp = 0.f, dpp = 0.f;
#pragma unroll
          for (int t = 0; t < DPL; ++t) {
            const int d = lane + 32 * t;
            if (d < D) {
              sp += qs[ii * D + d] * kr[kk][t];
              dpp += dos[ii * D + d] * vr[kk][t];
            }
          }
          const float s = warp_sum(sp) * p.scale + mask_bias(p.mask, p.mask_kind, b, gh.mask_head, i, j);
          const float dpv = warp_sum(dpp);
          const float pr = expf(s - lse_i);
          const float ds = pr * (dpv - delta_i);
          any = true;
#pragma unroll
          for (int t = 0; t < DPL; ++t) {
            const int d = lane + 32 * t;
            if (d < D) {
              dv[kk][t] += pr * dos[ii * D + d];
              dk[kk][t] += ds * qs[ii * D + d];
              dq[t] += ds * kr[kk][t];
            }
          }
        }
        if (any) {
#pragma unroll
          for (int t = 0; t < DPL; ++t) {
            const int d = lane + 32 * t;
            if (d < D) atomicAdd(gh.dq + static_cast<int64_t>(i) * D + d, dq[t] * p.scale);
          }
        }
      }
    }
  }

  T* dkp = static_cast<T*>(p.dk) + ((static_cast<int64_t>(b) * p.R + r) * Skv) * D;
  T* dvp = static_cast<T*>(p.dv) + ((static_cast<int64_t>(b) * p.R + r) * Skv) * D;
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
    const int j = jw + kk;
    if (j >= Skv) continue;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) {
        dkp[static_cast<int64_t>(j) * D + d] = from_f<T>(dk[kk][t] * p.scale);
        dvp[static_cast<int64_t>(j) * D + d] = from_f<T>(dv[kk][t]);
      }
    }
  }
}

template <typename T, int DPL>
cudaError_t launch_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  const dim3 grid((p.Sq + kFwdRows - 1) / kFwdRows, p.P, p.B);
  const size_t smem = 2 * static_cast<size_t>(kKeyTile) * p.D * sizeof(T);
  auto* attn_fwd_simt = attn_fwd_kernel<T, DPL>;
  const cudaError_t e = detail::allow_dynamic_smem(attn_fwd_simt, smem);
  if (e != cudaSuccess) return e;
  return HS_LAUNCH(attn_fwd_simt, grid, kFwdWarps * 32, smem, stream, p);
}

// Whether the current device can run the tensor-core kernels for this call:
// fp16/bf16, head dim a multiple of 16 up to 128, and a device that runs them
// with enough opt-in shared memory per block for `smem` (attn_tc_smem_limit).
// HEADSPARSE_CUDA_TENSOR_CORES=0 forces the CUDA-core kernels (for comparisons and tests).
bool use_tensor_cores(int dtype, int D, size_t smem) {
  const char* env = std::getenv("HEADSPARSE_CUDA_TENSOR_CORES");
  if (env != nullptr && env[0] == '0') return false;
  if ((dtype != kF16 && dtype != kBF16) || D % 16 != 0 || D > detail::kTcMaxHeadDim) return false;
  return smem <= detail::attn_tc_smem_limit();
}

template <typename T, int DPL, int KPW>
cudaError_t launch_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  if (p.Sq > 0) {
    const int rows_per_block = 4;
    const dim3 grid((p.Sq + rows_per_block - 1) / rows_per_block, p.G, p.B);
    auto* attn_bwd_preprocess = attn_bwd_preprocess_kernel<T, DPL>;
    const cudaError_t e = HS_LAUNCH(attn_bwd_preprocess, grid, rows_per_block * 32, 0, stream, p);
    if (e != cudaSuccess) return e;
  }
  if (attn_backward_uses_tensor_cores(p.dtype, p.D)) return detail::attn_backward_tc(p, stream);
  const int keys_per_block = kBwdWarps * KPW;
  const dim3 grid((p.Skv + keys_per_block - 1) / keys_per_block, p.R, p.B);
  const size_t smem = (2 * static_cast<size_t>(kBwdRowChunk) * p.D + 2 * kBwdRowChunk) * sizeof(float);
  auto* attn_bwd_simt = attn_bwd_kernel<T, DPL, KPW>;
  return HS_LAUNCH(attn_bwd_simt, grid, kBwdWarps * 32, smem, stream, p);
}

template <typename T>
cudaError_t fwd_dispatch_dim(const AttnFwdParams& p, cudaStream_t s) {
  if (p.D <= 32) return launch_fwd<T, 1>(p, s);
  if (p.D <= 64) return launch_fwd<T, 2>(p, s);
  if (p.D <= 96) return launch_fwd<T, 3>(p, s);
  if (p.D <= 128) return launch_fwd<T, 4>(p, s);
  return launch_fwd<T, 8>(p, s);
}

template <typename T>
cudaError_t bwd_dispatch_dim(const AttnBwdParams& p, cudaStream_t s) {
  if (p.D <= 32) return launch_bwd<T, 1, 8>(p, s);
  if (p.D <= 64) return launch_bwd<T, 2, 8>(p, s);
  if (p.D <= 96) return launch_bwd<T, 3, 4>(p, s);
  if (p.D <= 128) return launch_bwd<T, 4, 4>(p, s);
  return launch_bwd<T, 8, 2>(p, s);
}

}  // namespace

bool attn_forward_uses_tensor_cores(int dtype, int head_dim) {
  return use_tensor_cores(dtype, head_dim, detail::attn_forward_tc_smem(head_dim));
}

bool attn_backward_uses_tensor_cores(int dtype, int head_dim) {
  return use_tensor_cores(dtype, head_dim, detail::attn_backward_tc_smem(head_dim));
}

cudaError_t attn_forward(const AttnFwdParams& p, cudaStream_t stream) {
  if (p.D < 1 || p.D > kMaxHeadDim) return cudaErrorInvalidValue;
  if (p.B == 0 || p.P == 0 || p.Sq == 0) return cudaSuccess;
  if (attn_forward_uses_tensor_cores(p.dtype, p.D)) return detail::attn_forward_tc(p, stream);
  switch (p.dtype) {
    case kF32:
      return fwd_dispatch_dim<float>(p, stream);
    case kF16:
      return fwd_dispatch_dim<__half>(p, stream);
    case kBF16:
      return fwd_dispatch_dim<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t attn_backward(const AttnBwdParams& p, cudaStream_t stream) {
  if (p.D < 1 || p.D > kMaxHeadDim) return cudaErrorInvalidValue;
  if (p.B == 0 || p.G == 0 || p.R == 0 || p.Skv == 0) return cudaSuccess;
  switch (p.dtype) {
    case kF32:
      return bwd_dispatch_dim<float>(p, stream);
    case kF16:
      return bwd_dispatch_dim<__half>(p, stream);
    case kBF16:
      return bwd_dispatch_dim<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace headsparse_cuda
