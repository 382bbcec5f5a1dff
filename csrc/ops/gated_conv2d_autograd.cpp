// Autograd of the public gated_conv2d op, in C++ for every device, and its kernel below autograd. The
// forward decides whether to keep diff = y_f - y_p for the backward's dL/dg (gated_conv2d_keeps_diff, beside
// the strategy choice) and runs gated_conv2d_forward; the backward runs gated_conv2d_backward with the
// gradient mask autograd asks for (a frozen weight_pre costs no weight-gradient work).
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/gated_conv2d.h"
#include "ops/gated_conv2d_common.h"

namespace tlkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using gconv::has;

class GatedConv2dFn : public torch::autograd::Function<GatedConv2dFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight_pre,
                               const at::Tensor& weight_ft, const at::Tensor& gate,
                               const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool hard, bool save_diff) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, diff] = gated_conv2d_forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding,
                                          dilation, groups, hard, save_diff);
    ctx->save_for_backward({input, weight_pre, weight_ft, gate, has(bias_pre) ? *bias_pre : at::Tensor(),
                            has(bias_ft) ? *bias_ft : at::Tensor(), diff});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["hard"] = hard;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &input = s[0], &bias_pre = s[4], &bias_ft = s[5];
    // needs_input_grad counts the tensor arguments that were given (an absent bias is none); the returned
    // list has one entry per argument.
    c10::List<bool> mask;
    int64_t edge = 0;
    for (int i = 0; i < 6; ++i) {
      const bool given = i < 4 || s[i].defined();
      mask.push_back(given && ctx->needs_input_grad(edge));
      edge += given;
    }
    variable_list out(12);
    bool any = false;
    for (bool m : mask) any = any || m;
    if (!any || !grads[0].defined()) return out;
    const auto r = gated_conv2d_backward(
        grads[0].contiguous(input.suggest_memory_format()), input, s[1], s[2], s[3],
        bias_pre.defined() ? c10::optional<at::Tensor>(bias_pre) : c10::nullopt,
        bias_ft.defined() ? c10::optional<at::Tensor>(bias_ft) : c10::nullopt, s[6],
        ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt(), ctx->saved_data["hard"].toBool(),
        mask);
    const at::Tensor g[6] = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
                             std::get<5>(r)};
    for (int i = 0; i < 6; ++i)
      if (mask.get(i)) out[i] = g[i];
    return out;
  }
};

at::Tensor gated_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                                 const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                                 const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool hard) {
  const bool save_diff = at::GradMode::is_enabled() && gate.requires_grad() &&
                         gated_conv2d_keeps_diff(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride,
                                                 padding, dilation, groups, hard);
  return GatedConv2dFn::apply(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                              groups, hard, save_diff)[0];
}

// Below autograd (inference mode, or no tensor that needs a gradient): the forward alone.
at::Tensor gated_conv2d_plain(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                              const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                              const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool hard) {
  return std::get<0>(gated_conv2d_forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding,
                                          dilation, groups, hard, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, Autograd, m) { m.impl("gated_conv2d", &gated_conv2d_autograd); }

TORCH_LIBRARY_IMPL(tlkernels, CompositeExplicitAutograd, m) { m.impl("gated_conv2d", &gated_conv2d_plain); }

}  // namespace tlkernels
