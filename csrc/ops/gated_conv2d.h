#pragma once
// The gated convolution's ops. Each op's C++ signature is declared here once: the functions below call the op
// through the dispatcher (ops/gated_conv2d.cpp, `typed<decltype(gated_conv2d)>()`), and every kernel
// (autograd, autocast, CPU/CUDA) is a function of the same type.
//   gated_conv2d           the public op: y. Its autograd (ops/gated_conv2d_autograd.cpp) decides whether
//                          the forward keeps diff for the backward (gated_conv2d_keeps_diff).
//   gated_conv2d_forward   (y, diff): diff = conv(x, Wf) - conv(x, Wp) (bias included) when save_diff, else
//                          empty; it lets the backward produce dL/dg without another convolution.
//   gated_conv2d_backward  the six gradients of output_mask (masked-out ones empty).
#include <ATen/ATen.h>
#include <tuple>
#include <vector>

namespace tlkernels {

using GatedConv2dGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor gated_conv2d(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                        const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                        const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool hard);

std::tuple<at::Tensor, at::Tensor> gated_conv2d_forward(
    const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft, const at::Tensor& gate,
    const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool hard, bool save_diff);

GatedConv2dGrads gated_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                       const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                                       const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                                       const c10::optional<at::Tensor>& bias_ft, const at::Tensor& diff,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, bool hard, c10::List<bool> output_mask);

// Whether a forward whose gate needs a gradient keeps diff: measured on CPU tensors, or where the chosen path
// computes both branches anyway (ops/gated_conv2d_aten.cpp, beside the strategy choice).
bool gated_conv2d_keeps_diff(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                             const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                             const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, bool hard);

// Validates the arguments of gated_conv2d (every kernel, and the reference through _gated_conv2d_check):
// ValueError / TypeError in Python, naming the op, the argument, what was expected and what came. same_dtype:
// every floating argument in input's dtype (false only where autocast's casts are still to come).
void check_gated_conv2d_args(const at::Tensor& input, const at::Tensor& weight_pre,
                             const at::Tensor& weight_ft, const at::Tensor& gate,
                             const c10::optional<at::Tensor>& bias_pre,
                             const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             bool same_dtype = true);

}  // namespace tlkernels
