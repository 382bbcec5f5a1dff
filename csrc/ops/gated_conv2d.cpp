// Schemas of the gated convolution ops, their dispatcher entry points and their argument checks:
//   y = (1 - g) * conv2d(x, weight_pre, bias_pre) + g * conv2d(x, weight_ft, bias_ft)
// gate g has shape (N,) (one gate per image, SpotTune) or (N, C_out) (one per image and output
// filter, AdaFilter); g = 1 selects the fine-tuned filter. `hard` treats the gate as binary
// (g >= 0.5) in the forward pass; gradients still flow to g as for the blend (straight-through).
// ops/gated_conv2d.h says what each op returns.
#include <torch/library.h>

#include "ops/dispatch.h"
#include "ops/check.h"
#include "ops/gated_conv2d.h"

namespace tlkernels {

at::Tensor gated_conv2d(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                        const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                        const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool hard) {
  static auto op = op_handle<decltype(gated_conv2d)>("tlkernels::gated_conv2d");
  return op.call(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard);
}

std::tuple<at::Tensor, at::Tensor> gated_conv2d_forward(
    const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft, const at::Tensor& gate,
    const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool hard, bool save_diff) {
  static auto op = op_handle<decltype(gated_conv2d_forward)>("tlkernels::gated_conv2d_forward");
  return op.call(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard,
                 save_diff);
}

GatedConv2dGrads gated_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                       const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                                       const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                                       const c10::optional<at::Tensor>& bias_ft, const at::Tensor& diff,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, bool hard, c10::List<bool> output_mask) {
  static auto op = op_handle<decltype(gated_conv2d_backward)>("tlkernels::gated_conv2d_backward");
  return op.call(grad_output, input, weight_pre, weight_ft, gate, bias_pre, bias_ft, diff, stride, padding, dilation,
                 groups, hard, output_mask);
}

void check_gated_conv2d_args(const at::Tensor& input, const at::Tensor& weight_pre,
                             const at::Tensor& weight_ft, const at::Tensor& gate,
                             const c10::optional<at::Tensor>& bias_pre,
                             const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool same_dtype) {
  const char* op = "gated_conv2d";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D (N, C_in, H, W), got ", input.dim(),
                    "-D with shape ", shape_str(input.sizes()));
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(dt), op, ": input must be a floating-point tensor, got ", dtype_str(dt));
  // dtypes: one for all (autocast's kernel casts them first); devices: input's
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                     dtype_str(t.scalar_type()));
    TORCH_CHECK_TYPE(!same_dtype || t.scalar_type() == dt, op, ": ", name, " must have dtype ", dtype_str(dt),
                     " (the dtype of the first input), got ", dtype_str(t.scalar_type()));
    TORCH_CHECK_VALUE(t.device() == input.device(), op, ": ", name, " must be on device ", input.device(),
                      " (the device of the first input), got ", t.device());
  };
  TORCH_CHECK_VALUE(weight_pre.dim() == 4, op, ": weight_pre must be 4-D (C_out, C_in / groups, kH, kW), got ",
                    weight_pre.dim(), "-D with shape ", shape_str(weight_pre.sizes()));
  same(weight_pre, "weight_pre");
  same(weight_ft, "weight_ft");
  // F.conv2d rejects weights without output filters; without input channels or taps the convolution is only
  // its bias, which no caller means: both are errors rather than empty kernels.
  TORCH_CHECK_VALUE(weight_pre.size(0) >= 1 && weight_pre.size(1) >= 1 && weight_pre.size(2) >= 1 &&
                        weight_pre.size(3) >= 1,
                    op, ": weight_pre must have at least one output filter, input channel and kernel tap, got shape ",
                    shape_str(weight_pre.sizes()));
  TORCH_CHECK_VALUE(weight_ft.sizes() == weight_pre.sizes(), op, ": weight_ft must have the shape of weight_pre ",
                    shape_str(weight_pre.sizes()), ", got ", shape_str(weight_ft.sizes()));
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must have 2 values each");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", shape_str(stride));
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", shape_str(padding));
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ",
                    shape_str(dilation));
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be a positive int, got ", groups);
  const int64_t N = input.size(0), C_out = weight_pre.size(0);
  TORCH_CHECK_VALUE(input.size(1) == weight_pre.size(1) * groups, op,
                    ": input must have C_in = weight_pre.size(1) * groups = ", weight_pre.size(1) * groups,
                    " channels, got ", input.size(1), " (input shape ", shape_str(input.sizes()), ")");
  TORCH_CHECK_VALUE(C_out % groups == 0, op, ": weight_pre.size(0) = ", C_out, " must be divisible by groups = ",
                    groups);
  same(gate, "gate");
  TORCH_CHECK_VALUE((gate.dim() == 1 && gate.size(0) == N) ||
                        (gate.dim() == 2 && gate.size(0) == N && gate.size(1) == C_out),
                    op, ": gate must have shape (N,) or (N, C_out) = (", N, ", ", C_out, "), got ",
                    shape_str(gate.sizes()));
  auto bias = [&](const c10::optional<at::Tensor>& b, const char* name) {
    if (!b.has_value() || !b->defined()) return;
    same(*b, name);
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == C_out, op, ": ", name, " must have shape (", C_out,
                      ",), got ", shape_str(b->sizes()));
  };
  bias(bias_pre, "bias_pre");
  bias(bias_ft, "bias_ft");
  for (int d = 0; d < 2; ++d) {
    const int64_t k = dilation[d] * (weight_pre.size(d + 2) - 1) + 1;
    TORCH_CHECK_VALUE(input.size(d + 2) + 2 * padding[d] >= k, op, ": input spatial size ",
                      shape_str(input.sizes().slice(2)), " with padding ", shape_str(padding),
                      " is smaller than the dilated kernel size ", k);
  }
}

namespace {
// The checks alone, for the reference (tlkernels/ops/gated_conv2d.py), which computes with PyTorch's ops:
// same_dtype false under autocast, whose casts the reference's convolutions make themselves.
void check_only(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, int64_t groups, bool same_dtype) {
  check_gated_conv2d_args(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups,
                          same_dtype);
}
}  // namespace

}  // namespace tlkernels

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def(
      "gated_conv2d(Tensor input, Tensor weight_pre, Tensor weight_ft, Tensor gate, Tensor? bias_pre, "
      "Tensor? bias_ft, int[2] stride, int[2] padding, int[2] dilation, int groups, bool hard) -> Tensor");
  m.def(
      "gated_conv2d_forward(Tensor input, Tensor weight_pre, Tensor weight_ft, Tensor gate, Tensor? bias_pre, "
      "Tensor? bias_ft, int[2] stride, int[2] padding, int[2] dilation, int groups, bool hard, bool save_diff) "
      "-> (Tensor, Tensor)");
  m.def(
      "gated_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight_pre, Tensor weight_ft, "
      "Tensor gate, Tensor? bias_pre, Tensor? bias_ft, Tensor diff, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool hard, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_gated_conv2d_check(Tensor input, Tensor weight_pre, Tensor weight_ft, Tensor gate, Tensor? bias_pre, "
      "Tensor? bias_ft, int[2] stride, int[2] padding, int[2] dilation, int groups, bool same_dtype) -> ()");
}

TORCH_LIBRARY_IMPL(tlkernels, CompositeExplicitAutograd, m) {
  m.impl("_gated_conv2d_check", &tlkernels::check_only);
}
