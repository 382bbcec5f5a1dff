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

inline bool has(const c10::optional<at::Tensor>& b) { return b.has_value() && b->defined(); }

inline at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& b, const at::Tensor& w) {
  return has(b) ? *b : at::zeros({w.size(0)}, w.options());
}

}  // namespace gconv
}  // namespace tlkernels
