// Planted bugs for the emulator's own tests: each entry runs a tiny kernel and
// returns 0 when the emulator flags the bug (wrong result or reported error),
// 1 when the bug went unnoticed. Entry 0 is the bug-free control (0 = correct).
#include "hs_cuda_emu.h"

namespace {
struct Args {
  float* out;
  int variant;
};

// Thread t writes t to shared memory and reads thread t+1's slot; with the
// barrier the result is t+1, without it a thread may read poison or stale data.
void neighbour_kernel(const Args a) {
  HS_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (a.variant == 0) __syncthreads();
  a.out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Stores a WMMA accumulator, then each lane reads an element another lane stored.
void fragment_kernel(const Args a) {
  HS_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
  nvcuda::wmma::fill_fragment(f, 2.f);
  nvcuda::wmma::store_matrix_sync(s + (a.variant == 2 ? 1 : 0), f, 16, nvcuda::wmma::mem_row_major);
  if (a.variant == 0) __syncwarp();
  a.out[threadIdx.x] = s[(threadIdx.x * 7 + 3) % 256];
}

// Stores a WMMA accumulator and reads it back with a lane-strided loop (the kernels' idiom).
void readback_kernel(const Args a) {
  HS_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
  nvcuda::wmma::fill_fragment(f, 2.f);
  nvcuda::wmma::store_matrix_sync(s, f, 16, nvcuda::wmma::mem_row_major);
  if (a.variant == 0) __syncwarp();
  float sum = 0.f;
  for (int e = threadIdx.x % 32; e < 256; e += 32) sum += s[e];
  a.out[threadIdx.x] = sum / 8.f;  // 2 when every element was visible
}

void divergent_kernel(const Args a) {
  if (threadIdx.x < 32) __syncthreads();
  a.out[threadIdx.x] = 1.f;
}

void overflow_kernel(const Args a) {
  HS_DYNAMIC_SMEM(smem);
  reinterpret_cast<float*>(smem)[threadIdx.x + (a.variant ? 64 : 0)] = 1.f;  // 64 floats allocated
  a.out[threadIdx.x] = 1.f;
}

// 1 if out differs from what the kernel computes when correct.
int wrong(const float* out, int n, bool all_twos) {
  for (int t = 0; t < n; ++t)
    if (out[t] != (all_twos ? 2.f : static_cast<float>((t + 1) % n))) return 1;
  return 0;
}
}  // namespace

extern "C" int hs_emu_selftest(int which) {
  hs_emu::error_text().clear();
  float out[128];
  Args a{out, 1};
  auto* neighbour = neighbour_kernel;
  auto* fragment = fragment_kernel;
  auto* divergent = divergent_kernel;
  auto* readback = readback_kernel;
  auto* overflow = overflow_kernel;
  switch (which) {
    case 0: {  // controls: every kernel right when written right
      a.variant = 0;
      int bad = 0;
      bad |= HS_LAUNCH(neighbour, 2, 128, 128 * 4, nullptr, a) != cudaSuccess || wrong(out, 128, false);
      bad |= HS_LAUNCH(fragment, 1, 32, 256 * 4 + 64, nullptr, a) != cudaSuccess || wrong(out, 32, true);
      bad |= HS_LAUNCH(overflow, 1, 64, 64 * 4, nullptr, a) != cudaSuccess;
      bad |= HS_LAUNCH(readback, 1, 32, 256 * 4, nullptr, a) != cudaSuccess || wrong(out, 32, true);
      return bad || !hs_emu::error_text().empty();
    }
    case 1:  // missing __syncthreads
      return HS_LAUNCH(neighbour, 2, 128, 128 * 4, nullptr, a) == cudaSuccess && !wrong(out, 128, false);
    case 2:  // missing __syncwarp after store_matrix_sync
      return HS_LAUNCH(fragment, 1, 32, 256 * 4 + 64, nullptr, a) == cudaSuccess && !wrong(out, 32, true);
    case 3:  // misaligned WMMA pointer
      a.variant = 2;
      HS_LAUNCH(fragment, 1, 32, 256 * 4 + 64, nullptr, a);
      return hs_emu::error_text().find("aligned") == std::string::npos;
    case 4:  // __syncthreads reached by only some threads
      HS_LAUNCH(divergent, 1, 64, 0, nullptr, a);
      return hs_emu::error_text().find("deadlock") == std::string::npos;
    case 5:  // write past the dynamic shared memory
      HS_LAUNCH(overflow, 1, 64, 64 * 4, nullptr, a);
      return hs_emu::error_text().find("past the end") == std::string::npos;
    case 7:  // missing __syncwarp between a fragment store and a lane-strided read-back
      return HS_LAUNCH(readback, 1, 32, 256 * 4, nullptr, a) == cudaSuccess && !wrong(out, 32, true);
    case 6:  // more than 48 KiB of dynamic shared memory without the opt-in attribute
      a.variant = 0;
      HS_LAUNCH(overflow, 1, 64, 64 * 1024, nullptr, a);
      return hs_emu::error_text().find("allowed") == std::string::npos;
  }
  return 1;
}
