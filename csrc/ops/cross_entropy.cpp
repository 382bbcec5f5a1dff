// Schema of the fused cross-entropy op.
//   cross_entropy(logits (N, C), target, sample_weight?, ignore_index, reduction, scale, compute_grad)
//     -> (loss, grad_logits)
// target: int64 labels (N,) with F.cross_entropy semantics (ignore_index; weighted mean divides by the
// summed weight of the rows that count), or a probability matrix (N, C) (soft labels). reduction:
// 0 none, 1 mean, 2 sum. The loss is multiplied by `scale`. With compute_grad the gradient of the
// returned (scaled) loss, as if its upstream gradient were 1, is written in the same row pass (online
// log-sum-exp); no softmax buffer exists besides it. Otherwise grad_logits is empty.
// joint_cross_entropy(target head..., source head..., ignore_index, reduction, target_weight, source_weight,
//                     compute_grad) -> (loss, grad_target_logits, grad_source_logits)
//   target_weight * CE(target head) + source_weight * CE(source head) as one op (one autograd node);
//   reduction 1 (mean, per head) or 2 (sum).
#include <torch/library.h>

#include "ops/dispatch.h"
#include "ops/cross_entropy.h"

namespace tlkernels {

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                 const c10::optional<at::Tensor>& sample_weight, int64_t ignore_index,
                                                 int64_t reduction, double scale, bool compute_grad) {
  static auto op = op_handle<decltype(cross_entropy)>("tlkernels::cross_entropy");
  return op.call(logits, target, sample_weight, ignore_index, reduction, scale, compute_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_cross_entropy(
    const at::Tensor& target_logits, const at::Tensor& target_labels,
    const c10::optional<at::Tensor>& target_sample_weight, const at::Tensor& source_logits,
    const at::Tensor& source_labels, const c10::optional<at::Tensor>& source_sample_weight, int64_t ignore_index,
    int64_t reduction, double target_weight, double source_weight, bool compute_grad) {
  static auto op = op_handle<decltype(joint_cross_entropy)>("tlkernels::joint_cross_entropy");
  return op.call(target_logits, target_labels, target_sample_weight, source_logits, source_labels,
                 source_sample_weight, ignore_index, reduction, target_weight, source_weight, compute_grad);
}

}  // namespace tlkernels

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? sample_weight, int ignore_index, int reduction, "
      "float scale, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "joint_cross_entropy(Tensor target_logits, Tensor target_labels, Tensor? target_sample_weight, "
      "Tensor source_logits, Tensor source_labels, Tensor? source_sample_weight, int ignore_index, int reduction, "
      "float target_weight, float source_weight, bool compute_grad) -> (Tensor, Tensor, Tensor)");
}
