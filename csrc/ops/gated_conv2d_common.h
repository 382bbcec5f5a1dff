#pragma once
// Pieces shared by the gated convolution's device-generic strategies (gated_conv2d_aten.cpp) and the CPU
// small-map engine (cpu/gated_conv2d_mix.cpp).
#include <ATen/ATen.h>

namespace tlkernels {
namespace gconv {

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

inline at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       const ConvArgs& a, int64_t groups = -1) {
  return at::conv2d(x, w, b, a.stride, a.padding, a.dilation, groups < 0 ? a.groups : groups);
}

// Set by the op's autograd kernel while it runs the forward of a call made with grad mode off (autograd records
// nothing for it): eval and serving. The CPU engine then keeps packed weight panels across calls even for weights
// that require a gradient (cpu/gated_conv2d_mix.cpp, PanelCache).
class NoGradCall {
 public:
  explicit NoGradCall(bool on) : prev_(flag()) { flag() = on; }
  ~NoGradCall() { flag() = prev_; }
  NoGradCall(const NoGradCall&) = delete;
  NoGradCall& operator=(const NoGradCall&) = delete;
  static bool active() { return flag(); }

 private:
  static bool& flag() {
    static thread_local bool on = false;
    return on;
  }
  bool prev_;
};

inline bool has(const c10::optional<at::Tensor>& b) { return b.has_value() && b->defined(); }

inline at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& b, const at::Tensor& w) {
  return has(b) ? *b : at::zeros({w.size(0)}, w.options());
}

}  // namespace gconv
}  // namespace tlkernels
