// A CPU emulator for the subset of CUDA that csrc/cuda/*.cu uses, for tests only.
//
// csrc/cuda compiles against this header instead of the CUDA toolkit when
// HS_CUDA_EMULATION is defined (g++ -x c++). Each block runs as one fiber per
// thread on a single OS thread; __syncthreads, __syncwarp and the warp
// shuffles are barriers between fibers. The scheduler runs every runnable
// fiber up to its next barrier, in a fresh pseudo-random order each round, so a
// missing barrier reads stale or poisoned (NaN-filled) shared memory instead
// of passing by luck. WMMA is emulated with the documented semantics and none
// of the hardware's data layout: every lane holds the whole tile, a store
// writes only the elements notionally owned by the storing lane (so a lane
// that reads another lane's part without __syncwarp sees stale data), and
// loads check the 256-bit pointer alignment and ldm rules. Launches check the
// grid limits, the dynamic shared-memory opt-in and a guard zone after the
// shared memory. Partial warp masks and divergent barriers are reported as
// errors, never emulated loosely.
//
// What it cannot show: timing, real register or shared-memory pressure, bank
// conflicts, races between blocks, and tensor-core rounding. Those need a GPU.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <math.h>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Only dynamic shared memory (HS_DYNAMIC_SMEM) is emulated, poisoned and guarded; a static
// __shared__ array would silently start as zeros and keep the previous block's data.
#define __shared__ static_assert(false, "static __shared__ is not emulated: use HS_DYNAMIC_SMEM");

// ---------------------------------------------------------------- runtime types

typedef int cudaError_t;
typedef void* cudaStream_t;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------- 16-bit floats

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

// fp16 <-> fp32 in integer arithmetic (g++ < 12 and aarch64 C++ lack _Float16); round to nearest even,
// NaN kept quiet. Bit-exact against _Float16 for all 2^32 floats.
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  __half h;
  if (a > 0x7f800000u) {  // NaN, quiet
    h.bits = sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);
  } else if (a >= 0x477ff000u) {  // rounds to inf (>= 65520) or is inf
    h.bits = sign | 0x7c00u;
  } else if (a >= 0x38800000u) {  // normal half: rebias the exponent 127 -> 15 and round
    const uint32_t m = a - 0x38000000u;
    h.bits = sign | static_cast<uint16_t>((m + 0xfffu + ((m >> 13) & 1u)) >> 13);
  } else if (a < 0x33000001u) {  // <= 2^-25 rounds to zero
    h.bits = sign;
  } else {  // subnormal half: units of 2^-24
    const uint32_t e = a >> 23, man = (a & 0x7fffffu) | 0x800000u;
    const uint32_t sh = 126u - e;
    const uint32_t q = man >> sh, rem = man & ((1u << sh) - 1), half = 1u << (sh - 1);
    h.bits = sign | static_cast<uint16_t>(q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u));
  }
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = 0x7fc0;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

// CUDA's integer min/max overloads (by value: a decltype(a < b ? a : b) would be a dangling reference).
template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
  return b < a ? b : a;
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
  return a < b ? b : a;
}

// ---------------------------------------------------------------- fibers and barriers

namespace hs_emu {

struct Barrier {
  int arrived = 0;
  unsigned generation = 0;
};

// Fiber switch. swapcontext saves the signal mask with a system call on every
// switch, which made the shuffle-heavy kernels about 12x slower end to end; on
// x86-64 a six-register switch does the same job (other CPUs use ucontext).
#if defined(__x86_64__)
#define HS_EMU_FAST_SWITCH 1
// Saves the callee-saved registers on the current stack, stores its pointer in
// *save and continues on `next` (a stack made by this function or by new_stack).
__attribute__((naked, noinline)) inline void switch_stack(void** /*save*/, void* /*next*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
// A stack whose first switch_stack "returns" into entry with the ABI's alignment.
inline void* new_stack(char* base, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~static_cast<uintptr_t>(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                          // entry's return address: it never returns
  *--sp = reinterpret_cast<void*>(entry);   // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12-r15
  return sp;
}
#endif

struct Fiber {
  void* sp = nullptr;  // saved stack pointer (fast switch)
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  int linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  unsigned wait_generation = 0;
};

struct Device {
  int cc_major = 9, cc_minor = 0;
  int smem_optin = 232448;  // H100/H200 opt-in limit per block, bytes
  int binary_arch = 90;     // what cudaFuncGetAttributes reports as ptxVersion / binaryVersion
};

struct Launch {
  dim3 grid, block, block_idx;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  void* scheduler_sp = nullptr;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;  // one slot per thread for shuffles and votes
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  std::function<void()> body;
};

inline Device& device() {
  static Device d;
  return d;
}
inline Launch*& launch_state() {
  static Launch* s = nullptr;
  return s;
}
inline std::string& error_text() {
  static std::string e;
  return e;
}
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}
inline std::map<const void*, int>& smem_attributes() {
  static std::map<const void*, int> m;
  return m;
}

inline void fail(const std::string& what) {
  if (error_text().empty()) error_text() = what;
}

inline Fiber& cur() { return *launch_state()->current; }
inline int lane() { return cur().linear % 32; }
inline int warp_base() { return cur().linear - lane(); }

constexpr size_t kSmemAlign = 128;
constexpr size_t kGuardBytes = 256;  // before and after the shared memory
// Guard bytes: 0xFFC1 repeated is NaN in fp32, fp16 and bf16 (a stray read poisons the result) and
// differs from the 0xFF poison of the shared memory itself (a stray write is detected).
inline bool guard_intact(const unsigned char* g) {
  for (size_t i = 0; i < kGuardBytes; ++i)
    if (g[i] != ((i % 2) ? 0xFF : 0xC1)) return false;
  return true;
}
inline void fill_guard(unsigned char* g) {
  for (size_t i = 0; i < kGuardBytes; ++i) g[i] = (i % 2) ? 0xFF : 0xC1;
}

inline unsigned char* dynamic_smem() {
  Launch* L = launch_state();
  uintptr_t base = reinterpret_cast<uintptr_t>(L->smem.data()) + kGuardBytes;
  base = (base + kSmemAlign - 1) & ~(kSmemAlign - 1);
  return reinterpret_cast<unsigned char*>(base);
}

inline void to_scheduler() {
  Fiber& f = cur();
#ifdef HS_EMU_FAST_SWITCH
  switch_stack(&f.sp, launch_state()->scheduler_sp);
#else
  swapcontext(&f.ctx, &launch_state()->scheduler);
#endif
}

inline void arrive(Barrier& b, int size) {
  if (++b.arrived == size) {
    b.arrived = 0;
    ++b.generation;
    return;  // the last to arrive goes on at once
  }
  Fiber& f = cur();
  f.waiting = &b;
  f.wait_generation = b.generation;
  to_scheduler();
}

inline void syncthreads() { arrive(launch_state()->block_barrier, launch_state()->nthreads); }

inline void check_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + ": only full-warp masks are emulated");
}

inline void syncwarp() { arrive(launch_state()->warp_barriers[cur().linear / 32], 32); }

// Every lane publishes `v`, then reads lane `src`'s value.
inline uint64_t exchange(uint64_t v, int src) {
  Launch* L = launch_state();
  L->exchange[cur().linear] = v;
  syncwarp();
  const uint64_t r = L->exchange[warp_base() + (src & 31)];
  syncwarp();
  return r;
}

inline void trampoline() {
  launch_state()->body();
  cur().done = true;
#ifdef HS_EMU_FAST_SWITCH
  to_scheduler();  // never resumed
  std::abort();
#endif
  // ucontext: returning resumes uc_link (the scheduler)
}

template <class P>
cudaError_t launch(const char* name, void (*kernel)(P), dim3 grid, dim3 block, size_t smem, P arg) {
  launch_log().push_back(name);
  const long n = static_cast<long>(block.x) * block.y * block.z;
  if (n <= 0 || n > 1024 || n % 32 != 0) {
    fail(std::string(name) + ": block size must be a positive multiple of 32 up to 1024");
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    fail(std::string(name) + ": grid dimensions out of range");
    return cudaErrorInvalidConfiguration;
  }
  const auto it = smem_attributes().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = it == smem_attributes().end() ? 48 * 1024 : static_cast<size_t>(it->second);
  if (smem > allowed) {
    fail(std::string(name) + ": dynamic shared memory " + std::to_string(smem) + " B over the " +
         std::to_string(allowed) + " B allowed for this kernel");
    return cudaErrorInvalidValue;
  }
  Launch L;
  L.grid = grid;
  L.block = block;
  L.nthreads = static_cast<int>(n);
  L.smem_bytes = smem;
  L.warp_barriers.resize(n / 32);
  L.exchange.resize(n);
  L.smem.resize(kGuardBytes + kSmemAlign + smem + kGuardBytes);
  L.body = [&]() { kernel(arg); };
  launch_state() = &L;
  constexpr size_t kStack = 256 * 1024;
  L.fibers.assign(n, Fiber());
  for (auto& f : L.fibers) f.stack.resize(kStack);
  uint64_t rng = 0x9E3779B97F4A7C15ull;  // fixed seed: every run schedules the same way
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = t;
  for (unsigned bz = 0; bz < grid.z && error_text().empty(); ++bz)
    for (unsigned by = 0; by < grid.y && error_text().empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && error_text().empty(); ++bx) {
        L.block_idx = dim3(bx, by, bz);
        // Poison: 0xFF bytes are NaN in fp32, fp16 and bf16.
        std::memset(L.smem.data(), 0xFF, L.smem.size());
        unsigned char* guard = dynamic_smem() + smem;
        unsigned char* guard_before = dynamic_smem() - kGuardBytes;
        fill_guard(guard);
        fill_guard(guard_before);
        L.block_barrier = Barrier();
        for (auto& wb : L.warp_barriers) wb = Barrier();
        for (int t = 0; t < n; ++t) {
          Fiber& f = L.fibers[t];
          f.linear = t;
          f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.done = false;
          f.waiting = nullptr;
#ifdef HS_EMU_FAST_SWITCH
          f.sp = new_stack(f.stack.data(), kStack, trampoline);
#else
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &L.scheduler;
          makecontext(&f.ctx, trampoline, 0);
#endif
        }
        for (;;) {
          bool progressed = false, all_done = true;
          // A fresh pseudo-random order every round, so a missing barrier is seen in both directions in
          // every phase, a block's first one included.
          for (int k = n - 1; k > 0; --k) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::swap(order[k], order[rng % (k + 1)]);
          }
          for (int k = 0; k < n; ++k) {
            Fiber& f = L.fibers[order[k]];
            if (f.done) continue;
            all_done = false;
            if (f.waiting != nullptr) {
              if (f.waiting->generation == f.wait_generation) continue;  // still blocked
              f.waiting = nullptr;
            }
            L.current = &f;
            progressed = true;
#ifdef HS_EMU_FAST_SWITCH
            switch_stack(&L.scheduler_sp, f.sp);
#else
            swapcontext(&L.scheduler, &f.ctx);
#endif
          }
          if (all_done) break;
          if (!progressed) {
            fail(std::string(name) + ": barrier deadlock (divergent __syncthreads/__syncwarp, or a lane exited "
                 "before a warp collective)");
            break;
          }
        }
        if (!guard_intact(guard)) fail(std::string(name) + ": write past the end of dynamic shared memory");
        if (!guard_intact(guard_before)) fail(std::string(name) + ": write before the start of dynamic shared memory");
      }
  launch_state() = nullptr;
  return error_text().empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace hs_emu

// ---------------------------------------------------------------- CUDA names

#define threadIdx (::hs_emu::cur().tid)
#define blockIdx (::hs_emu::launch_state()->block_idx)
#define blockDim (::hs_emu::launch_state()->block)
#define gridDim (::hs_emu::launch_state()->grid)

inline void __syncthreads() { hs_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  hs_emu::check_mask(mask, "__syncwarp");
  hs_emu::syncwarp();
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  hs_emu::check_mask(mask, "__shfl_xor_sync");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = static_cast<uint32_t>(hs_emu::exchange(u, hs_emu::lane() ^ lane_mask));
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}
inline float __shfl_sync(unsigned mask, float v, int src_lane) {
  hs_emu::check_mask(mask, "__shfl_sync");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = static_cast<uint32_t>(hs_emu::exchange(u, src_lane));
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  hs_emu::check_mask(mask, "__ballot_sync");
  hs_emu::Launch* L = hs_emu::launch_state();
  L->exchange[hs_emu::cur().linear] = pred ? 1 : 0;
  hs_emu::syncwarp();
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (L->exchange[hs_emu::warp_base() + l] ? 1u : 0u) << l;
  hs_emu::syncwarp();
  return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }

// One OS thread runs every fiber, so plain read-modify-write is atomic here.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() {
  return hs_emu::error_text().empty() ? cudaSuccess : cudaErrorLaunchFailure;
}
inline const char* cudaGetErrorString(cudaError_t) { return hs_emu::error_text().c_str(); }
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = hs_emu::device().cc_major;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = hs_emu::device().cc_minor;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = hs_emu::device().smem_optin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
struct cudaFuncAttributes {
  int ptxVersion, binaryVersion;
};
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F*) {
  attr->ptxVersion = attr->binaryVersion = hs_emu::device().binary_arch;
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int value) {
  if (value > hs_emu::device().smem_optin) return cudaErrorInvalidValue;
  hs_emu::smem_attributes()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// Vector accesses must be aligned on the GPU; x86 would forgive them silently.
#define HS_CHECK_ALIGN(ptr, bytes)                                      \
  do {                                                                  \
    if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0)                \
      ::hs_emu::fail("misaligned " #bytes "-byte vector access");        \
  } while (0)
#define HS_DYNAMIC_SMEM(name) unsigned char* name = ::hs_emu::dynamic_smem()
#define HS_LAUNCH(kernel, grid, block, smem, stream, arg) \
  ::hs_emu::launch(#kernel, kernel, dim3(grid), dim3(block), static_cast<size_t>(smem), arg)

// ---------------------------------------------------------------- WMMA

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float elem_to_float(float x) { return x; }
inline float elem_to_float(__half x) { return __half2float(x); }
inline float elem_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Every emulated lane holds the whole 16x16 tile (as float); num_elements is
// therefore 256 here and 8 on hardware, so code may only use it in
// element-wise loops that do not depend on the layout.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256];
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
};

template <class T>
inline void check_pointer(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) hs_emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) hs_emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  check_pointer(p, ldm, "load_matrix_sync");
  const bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = elem_to_float(row ? p[r * ldm + c] : p[c * ldm + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  check_pointer(p, ldm, "load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

// A lane writes only the elements it owns, with the sm_80 mma.m16n8k16 accumulator ownership
// (row % 8, column pair): unlike a stride-32 map, this never matches a kernel's own lane-strided
// read-back loop, so a missing __syncwarp between the store and such a loop reads stale data.
inline int accumulator_owner(int r, int c) { return (r % 8) * 4 + (c % 8) / 2; }

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_pointer(p, ldm, "store_matrix_sync");
  const int l = hs_emu::lane();
  for (int e = 0; e < 256; ++e) {
    const int r = e / 16, c = e % 16;
    if (accumulator_owner(r, c) != l) continue;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

template <class F>
inline void fill_fragment(F& f, float v) {
  for (float& x : f.x) x = v;
}

template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) s += a.x[r * 16 + k] * b.x[k * 16 + n];
      out[r * 16 + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
