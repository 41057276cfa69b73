// C entry points of the emulated CUDA kernels, for tests/_cuda_emu.py (ctypes).
#include "cuda/hs_cuda.h"

namespace hc = headsparse_cuda;

extern "C" {

int hs_emu_attn_forward(const hc::AttnFwdParams* p) { return hc::attn_forward(*p, nullptr); }
int hs_emu_attn_backward(const hc::AttnBwdParams* p) { return hc::attn_backward(*p, nullptr); }
int hs_emu_head_stats(const hc::HeadStatsParams* p) { return hc::head_stats(*p, nullptr); }
int hs_emu_gram(const hc::GramParams* p) { return hc::gram(*p, nullptr); }

// The emulated device: compute capability, the opt-in shared-memory limit per block, and the
// architecture of the kernel binary the driver would run (ptxVersion/binaryVersion).
void hs_emu_configure(int cc_major, int cc_minor, int smem_optin, int binary_arch) {
  hs_emu::device().cc_major = cc_major;
  hs_emu::device().cc_minor = cc_minor;
  hs_emu::device().smem_optin = smem_optin;
  hs_emu::device().binary_arch = binary_arch;
  hs_emu::smem_attributes().clear();
}

int hs_emu_uses_tensor_cores(int dtype, int head_dim, int backward) {
  return backward ? hc::attn_backward_uses_tensor_cores(dtype, head_dim)
                  : hc::attn_forward_uses_tensor_cores(dtype, head_dim);
}

// First error since the last reset ("" if none), and the kernels launched since then.
const char* hs_emu_error() { return hs_emu::error_text().c_str(); }
int hs_emu_launch_count() { return static_cast<int>(hs_emu::launch_log().size()); }
const char* hs_emu_launch_name(int i) { return hs_emu::launch_log().at(i).c_str(); }
void hs_emu_reset() {
  hs_emu::error_text().clear();
  hs_emu::launch_log().clear();
}

// Struct sizes, so the ctypes mirrors can be checked against the compiler's layout.
size_t hs_emu_sizeof(int which) {
  switch (which) {
    case 0:
      return sizeof(hc::AttnFwdParams);
    case 1:
      return sizeof(hc::AttnBwdParams);
    case 2:
      return sizeof(hc::HeadStatsParams);
    case 3:
      return sizeof(hc::GramParams);
  }
  return 0;
}
}
