// Schema of the fused cross-entropy op.
//   cross_entropy(logits (N, C), target, sample_weight?, ignore_index, reduction, scale, compute_grad)
//     -> (loss, grad_logits)
// target: int64 labels (N,) with F.cross_entropy semantics (ignore_index; weighted mean divides by the
// summed weight of the rows that count), or a probability matrix (N, C) (soft labels). reduction:
// 0 none, 1 mean, 2 sum. The loss is multiplied by `scale`. With compute_grad the gradient of the
// returned (scaled) loss, as if its upstream gradient were 1, is written in the same row pass (online
// log-sum-exp); no softmax buffer exists besides it. Otherwise grad_logits is empty.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? sample_weight, int ignore_index, int reduction, "
      "float scale, bool compute_grad) -> (Tensor, Tensor)");
}
