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

#include "ops/check.h"
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

void check_cross_entropy_args(const char* op, const HeadNames& names, const at::Tensor& logits,
                              const at::Tensor& target, const c10::optional<at::Tensor>& sample_weight) {
  const auto& x = names.logits;
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": ", x, " must be 2-D (N, C), got ", logits.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op, ": ", x, " must be a floating-point tensor, got ",
                   dtype_str(logits.scalar_type()));
  TORCH_CHECK_VALUE(target.device() == logits.device(), op, ": ", names.target, " must be on the device of ", x, " (",
                    logits.device(), "), got ", target.device());
  if (target.is_floating_point()) {
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), op, ": ", names.target, " (soft labels) must have the shape of ",
                      x, " ", shape_str(logits.sizes()), ", got ", shape_str(target.sizes()));
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": ", names.target, " must be int64 labels or a float "
                     "probability matrix, got ", dtype_str(target.scalar_type()));
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0), op, ": ", names.target,
                      " must have shape (", logits.size(0), ",), got ", shape_str(target.sizes()));
  }
  if (sample_weight.has_value() && sample_weight->defined()) {
    const auto& w = *sample_weight;
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), op, ": ", names.sample_weight, " must be a floating-point "
                     "tensor, got ", dtype_str(w.scalar_type()));
    TORCH_CHECK_VALUE(w.device() == logits.device(), op, ": ", names.sample_weight, " must be on the device of ", x,
                      " (", logits.device(), "), got ", w.device());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == logits.size(0), op, ": ", names.sample_weight,
                      " must have shape (", logits.size(0), ",), got ", shape_str(w.sizes()));
  }
}

void label_out_of_range(const char* op, const HeadNames& names, int64_t i, int64_t label, int64_t C,
                        int64_t ignore_index) {
  TORCH_CHECK(false, op, ": ", names.target, "[", i, "] = ", label, " is out of range [0, ", C,
              ") (and is not ignore_index = ", ignore_index, ")");
}

namespace {
// Every check of one head, for the Python front ends (before the dispatcher picks a kernel by the tensors'
// devices) and the references: the arguments, then the hard labels' range (read in place for CPU labels, an
// asynchronous device assertion for GPU ones: no host sync).
void check_only(c10::string_view op_view, c10::string_view head, const at::Tensor& logits, const at::Tensor& target,
                const c10::optional<at::Tensor>& sample_weight, int64_t ignore_index) {
  const std::string op(op_view);
  const HeadNames names{std::string(head)};
  check_cross_entropy_args(op.c_str(), names, logits, target, sample_weight);
  if (target.is_floating_point() || target.is_meta() || target.numel() == 0) return;
  const int64_t C = logits.size(1);
  if (target.is_cpu()) {  // (read through a pointer: no ATen read op, none counted where CUDA is emulated)
    const at::Tensor t = target.contiguous();
    const int64_t* y = t.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      if (y[i] != ignore_index && (y[i] < 0 || y[i] >= C)) label_out_of_range(op.c_str(), names, i, y[i], C,
                                                                              ignore_index);
  } else {
    const at::Tensor bad = ((target < 0) | (target >= C)) & (target != ignore_index);
    at::_assert_async(bad.any().logical_not(), op + ": " + names.target + " has a label out of range [0, " +
                                                  std::to_string(C) + ")");
  }
}
}  // namespace

}  // namespace tlkernels

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? sample_weight, int ignore_index, int reduction, "
      "float scale, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "joint_cross_entropy(Tensor target_logits, Tensor target_labels, Tensor? target_sample_weight, "
      "Tensor source_logits, Tensor source_labels, Tensor? source_sample_weight, int ignore_index, int reduction, "
      "float target_weight, float source_weight, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_cross_entropy_check(str op, str head, Tensor logits, Tensor target, Tensor? sample_weight, int ignore_index) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(tlkernels, CompositeExplicitAutograd, m) {
  m.impl("_cross_entropy_check", &tlkernels::check_only);
}
