// Schemas of the L2-SP ops.
//  l2sp_penalty: alpha/2 * sum w (p - p0)^2 + beta/2 * sum ||q||^2 over lists of tensors (any float dtypes),
//                one multi-tensor pass, deterministic (fixed chunking, ordered final sum). weights: empty
//                (w = 1 everywhere) or one entry per param, None (w = 1) or per-element weights of the param's
//                shape and dtype (L2-SP-Fisher: the source task's Fisher diagonal).
//  l2sp_penalty_backward: grad * alpha * w * (p - p0) and grad * beta * q.
//  l2sp_value_and_grad: both in one pass (reads p and p0 once, writes the gradient).
//  l2sp_value_and_grad_: the same, adding the gradient into existing tensors (p.grad after the task
//                loss's backward) instead of returning new ones: no allocation, one pass over p, p0, g.
//  sgd_l2sp_step_ / adamw_l2sp_step_: torch.optim.SGD / AdamW steps with the L2-SP gradient
//                coeff * w * (p - ref) (ref absent: coeff * w * p; weights as above) folded in, one pass over
//                p, g, ref, w and state.
#include <torch/library.h>

#include "ops/dispatch.h"
#include "ops/inplace_versions.h"
#include "ops/l2sp.h"
#include "ops/l2sp_checks.h"

namespace tlkernels {
at::Tensor l2sp_penalty(at::TensorList params, at::TensorList refs, const OptionalTensorList& weights, double alpha,
                        at::TensorList new_params, double beta) {
  static auto op = op_handle<decltype(l2sp_penalty)>("tlkernels::l2sp_penalty");
  return op.call(params, refs, weights, alpha, new_params, beta);
}

TensorVectors l2sp_penalty_backward(const at::Tensor& grad, at::TensorList params, at::TensorList refs,
                                    const OptionalTensorList& weights, double alpha, at::TensorList new_params,
                                    double beta) {
  static auto op = op_handle<decltype(l2sp_penalty_backward)>("tlkernels::l2sp_penalty_backward");
  return op.call(grad, params, refs, weights, alpha, new_params, beta);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> l2sp_value_and_grad(
    at::TensorList params, at::TensorList refs, const OptionalTensorList& weights, double alpha,
    at::TensorList new_params, double beta) {
  static auto op = op_handle<decltype(l2sp_value_and_grad)>("tlkernels::l2sp_value_and_grad");
  return op.call(params, refs, weights, alpha, new_params, beta);
}

at::Tensor l2sp_value_and_grad_(at::TensorList params, at::TensorList refs, const OptionalTensorList& weights,
                                double alpha, at::TensorList new_params, double beta, at::TensorList grads,
                                at::TensorList new_grads) {
  static auto op = op_handle<decltype(l2sp_value_and_grad_)>("tlkernels::l2sp_value_and_grad_");
  return op.call(params, refs, weights, alpha, new_params, beta, grads, new_grads);
}

void sgd_l2sp_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const OptionalTensorList& refs, const OptionalTensorList& weights, at::ArrayRef<double> coeffs,
                    double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                    bool first_step) {
  static auto op = op_handle<decltype(sgd_l2sp_step_)>("tlkernels::sgd_l2sp_step_");
  op.call(params, grads, momentum_buffers, refs, weights, coeffs, lr, momentum, dampening, weight_decay, nesterov,
          maximize, first_step);
}

void adamw_l2sp_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const OptionalTensorList& refs,
                      const OptionalTensorList& weights, at::ArrayRef<double> coeffs, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step, bool maximize) {
  static auto op = op_handle<decltype(adamw_l2sp_step_)>("tlkernels::adamw_l2sp_step_");
  op.call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, refs, weights, coeffs, lr, beta1, beta2, eps,
          weight_decay, step, maximize);
}

namespace {
// The checks alone, for the Python front ends (before the dispatcher picks a kernel by the tensors' devices) and
// the references: `op` names the front end; accumulate: grads / new_grads are the tensors' .grad, updated in place.
void check_only(c10::string_view op, at::TensorList params, at::TensorList refs, const OptionalTensorList& weights,
                at::TensorList new_params, bool accumulate, at::TensorList grads, at::TensorList new_grads) {
  const std::string name(op);
  if (accumulate)
    check_inplace_args(name.c_str(), params, refs, weights, new_params, grads, new_grads, /*dot_grad=*/true);
  else
    check_penalty_args(name.c_str(), params, refs, weights, new_params);
}
}  // namespace

}  // namespace tlkernels

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def(
      "l2sp_penalty(Tensor[] params, Tensor[] refs, Tensor?[] weights, float alpha, Tensor[] new_params, "
      "float beta) -> Tensor");
  m.def(
      "l2sp_penalty_backward(Tensor grad, Tensor[] params, Tensor[] refs, Tensor?[] weights, float alpha, "
      "Tensor[] new_params, float beta) -> (Tensor[], Tensor[])");
  m.def(
      "l2sp_value_and_grad(Tensor[] params, Tensor[] refs, Tensor?[] weights, float alpha, Tensor[] new_params, "
      "float beta) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "l2sp_value_and_grad_(Tensor[] params, Tensor[] refs, Tensor?[] weights, float alpha, Tensor[] new_params, "
      "float beta, Tensor(a!)[] grads, Tensor(b!)[] new_grads) -> Tensor");
  m.def(
      "sgd_l2sp_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] refs, "
      "Tensor?[] weights, float[] coeffs, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_step) -> ()");
  m.def(
      "adamw_l2sp_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] refs, Tensor?[] weights, float[] coeffs, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, bool maximize) -> ()");
  m.def(
      "_l2sp_check(str op, Tensor[] params, Tensor[] refs, Tensor?[] weights, Tensor[] new_params, bool accumulate, "
      "Tensor[] grads, Tensor[] new_grads) -> ()");
}

TORCH_LIBRARY_IMPL(tlkernels, CompositeExplicitAutograd, m) { m.impl("_l2sp_check", &tlkernels::check_only); }

TORCH_LIBRARY_IMPL(tlkernels, ADInplaceOrView, m) {
  for (const char* name : {"l2sp_value_and_grad_", "sgd_l2sp_step_", "adamw_l2sp_step_"})
    m.impl(name, tlkernels::bump_written_versions_kernel());
}
