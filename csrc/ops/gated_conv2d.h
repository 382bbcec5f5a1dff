#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace tlkernels {

// Validates the arguments of gated_conv2d (shared by every backend).
void check_gated_conv2d_args(const at::Tensor& input, const at::Tensor& weight_pre,
                             const at::Tensor& weight_ft, const at::Tensor& gate,
                             const c10::optional<at::Tensor>& bias_pre,
                             const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

std::vector<int64_t> gated_conv2d_output_size(const at::Tensor& input, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation);

}  // namespace tlkernels
