// Autograd of cross_entropy and joint_cross_entropy, in C++ for every device.
// The forward kernels already write d(loss)/d(logits) for an upstream gradient of 1 (the row pass has
// the softmax in registers), so backward only scales it. These ops are small, so a Python-level autograd
// (torch.library.register_autograd) would cost about as much per call as the kernels themselves
// (benchmarks/test_bench_losses.py, joint cross-entropy); a C++ node costs a few microseconds.
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/ops/mul.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/cross_entropy.h"
#include "ops/emulate_cuda.h"

namespace tlkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// True when `g` is a plain CPU tensor holding the value 1: the usual `loss.backward()`. Then the saved
// gradient is the answer and no N x C pass is needed. Never read under tracing (fake/functional
// tensors have no data) or on GPUs (reading would synchronise).
bool is_eager_cpu_one(const at::Tensor& g) {
  if (!g.defined() || !cpu_path(g)) return false;
  if (g.unsafeGetTensorImpl()->is_python_dispatch() || at::functionalization::impl::isFunctionalTensor(g)) {
    return false;
  }
  return g.numel() == 1 && g.item<double>() == 1.0;
}

at::Tensor scaled(const at::Tensor& saved, const at::Tensor& grad, bool per_row) {
  if (!per_row && is_eager_cpu_one(grad)) return saved;
  return at::mul(saved, (per_row ? grad.unsqueeze(1) : grad).to(saved.scalar_type()));
}

void require_saved(AutogradContext* ctx, bool needed, const char* op) {
  TORCH_CHECK(!needed || ctx->saved_data["compute_grad"].toBool(), op, ": the forward ran without compute_grad; call it with the logits "
              "requiring grad and grad mode enabled");
}

class CrossEntropyFn : public torch::autograd::Function<CrossEntropyFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const c10::optional<at::Tensor>& sample_weight, int64_t ignore_index,
                               int64_t reduction, double scale, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = cross_entropy(logits, target, sample_weight, ignore_index, reduction, scale, compute_grad);
    // The gradient outputs are non-differentiable: without this, backward would first receive an
    // N x C tensor of zeros for each of them (a fill as costly as the op itself).
    ctx->set_materialize_grads(false);
    ctx->saved_data["none"] = reduction == 0;
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    return {loss, grad};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor g = ctx->get_saved_variables()[0];
    require_saved(ctx, ctx->needs_input_grad(0), "cross_entropy");
    at::Tensor dx;
    if (ctx->needs_input_grad(0) && grads[0].defined()) dx = scaled(g, grads[0], ctx->saved_data["none"].toBool());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class JointCrossEntropyFn : public torch::autograd::Function<JointCrossEntropyFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tl, const at::Tensor& ty,
                               const c10::optional<at::Tensor>& tw, const at::Tensor& sl, const at::Tensor& sy,
                               const c10::optional<at::Tensor>& sw, int64_t ignore_index, int64_t reduction,
                               double target_weight, double source_weight, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, gt, gs] = joint_cross_entropy(tl, ty, tw, sl, sy, sw, ignore_index, reduction, target_weight,
                                              source_weight, compute_grad);
    ctx->set_materialize_grads(false);  // see CrossEntropyFn
    // needs_input_grad counts tensor inputs only (an absent optional weight is not one); the returned
    // gradient list counts every argument.
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["source_edge"] = static_cast<int64_t>(tw.has_value() && tw->defined() ? 3 : 2);
    ctx->save_for_backward({gt, gs});
    ctx->mark_non_differentiable({gt, gs});
    return {loss, gt, gs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    require_saved(ctx, ctx->needs_input_grad(0), "joint_cross_entropy");
    const bool source_needed = ctx->needs_input_grad(ctx->saved_data["source_edge"].toInt());
    require_saved(ctx, source_needed, "joint_cross_entropy");
    variable_list out(11);
    if (grads[0].defined()) {
      if (ctx->needs_input_grad(0)) out[0] = scaled(saved[0], grads[0], false);
      if (source_needed) out[3] = scaled(saved[1], grads[0], false);
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                          const c10::optional<at::Tensor>& sample_weight,
                                                          int64_t ignore_index, int64_t reduction, double scale,
                                                          bool compute_grad) {
  auto r = CrossEntropyFn::apply(logits, target, sample_weight, ignore_index, reduction, scale, compute_grad);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_cross_entropy_autograd(
    const at::Tensor& tl, const at::Tensor& ty, const c10::optional<at::Tensor>& tw, const at::Tensor& sl,
    const at::Tensor& sy, const c10::optional<at::Tensor>& sw, int64_t ignore_index, int64_t reduction,
    double target_weight, double source_weight, bool compute_grad) {
  auto r = JointCrossEntropyFn::apply(tl, ty, tw, sl, sy, sw, ignore_index, reduction, target_weight,
                                      source_weight, compute_grad);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("joint_cross_entropy", &joint_cross_entropy_autograd);
}

}  // namespace tlkernels
