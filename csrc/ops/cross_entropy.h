#pragma once
// The cross-entropy ops' C++ signatures, declared once: these functions call the ops through the dispatcher
// (ops/cross_entropy.cpp, `typed<decltype(cross_entropy)>()`), and every kernel is a function of the same type.
//   cross_entropy        (loss, d loss / d logits for an upstream gradient of 1, or empty without compute_grad)
//   joint_cross_entropy  (loss, d loss / d target_logits, d loss / d source_logits)
#include <ATen/ATen.h>
#include <tuple>

namespace tlkernels {

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                 const c10::optional<at::Tensor>& sample_weight, int64_t ignore_index,
                                                 int64_t reduction, double scale, bool compute_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_cross_entropy(
    const at::Tensor& target_logits, const at::Tensor& target_labels,
    const c10::optional<at::Tensor>& target_sample_weight, const at::Tensor& source_logits,
    const at::Tensor& source_labels, const c10::optional<at::Tensor>& source_sample_weight, int64_t ignore_index,
    int64_t reduction, double target_weight, double source_weight, bool compute_grad);

}  // namespace tlkernels
