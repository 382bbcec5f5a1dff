// Autocast kernels of the tlkernels ops (the pattern of torchvision/csrc/ops/autocast/): under
// torch.autocast the dispatcher reaches these first; each casts its floating-point tensor arguments and calls
// the op again below the autocast key, so autograd records the casts and gradients come back in the
// arguments' own dtypes.
//   gated_conv2d                 -> the autocast dtype (bf16 / fp16), as aten::conv2d: oneDNN / cuDNN and our
//                                   kernels accumulate in float32 and round the result once.
//   cross_entropy, joint_cross_entropy, filterbank_histogram, l2sp_penalty, l2sp_value_and_grad
//                                -> float32, as aten::cross_entropy / log_softmax / norm: sums over many terms.
// The optimizer and other in-place ops get no autocast kernel: they run in their tensors' own dtypes
// (parameters and optimizer state stay float32 under autocast, as with torch.optim).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/gated_conv2d.h"

#include <tuple>
#include <vector>

namespace tlkernels {
namespace {

using at::Tensor;
using at::TensorList;
using c10::IntArrayRef;
using OptT = const std::optional<Tensor>&;

// The op itself, through the dispatcher (the wrapper below has already excluded the autocast key).
template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using CESig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, OptT, int64_t, int64_t, double, bool);
std::tuple<Tensor, Tensor> cross_entropy(const Tensor& logits, const Tensor& target, OptT w, int64_t ignore_index,
                                         int64_t reduction, double scale, bool compute_grad) {
  static auto op = handle<CESig>("tlkernels::cross_entropy");
  return op.call(logits, target, w, ignore_index, reduction, scale, compute_grad);
}

using JointSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, OptT, const Tensor&, const Tensor&,
                                                    OptT, int64_t, int64_t, double, double, bool);
std::tuple<Tensor, Tensor, Tensor> joint_cross_entropy(const Tensor& tl, const Tensor& ty, OptT tw, const Tensor& sl,
                                                       const Tensor& sy, OptT sw, int64_t ignore_index,
                                                       int64_t reduction, double target_weight, double source_weight,
                                                       bool compute_grad) {
  static auto op = handle<JointSig>("tlkernels::joint_cross_entropy");
  return op.call(tl, ty, tw, sl, sy, sw, ignore_index, reduction, target_weight, source_weight, compute_grad);
}

using HistSig = Tensor(const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef);
Tensor filterbank_histogram(const Tensor& images, const Tensor& filters, const Tensor& edges, IntArrayRef stride,
                            IntArrayRef padding) {
  static auto op = handle<HistSig>("tlkernels::filterbank_histogram");
  return op.call(images, filters, edges, stride, padding);
}

// Per-element weights (Tensor?[]) are not among the lists ATen's wrapper casts: each follows its parameter's
// (already cast) dtype here, as the kernels need.
using Weights = c10::List<std::optional<Tensor>>;
Weights weights_like_params(TensorList params, const Weights& weights) {
  Weights out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto w = weights.get(i);
    out.push_back(w.has_value() && i < params.size() ? std::optional<Tensor>(w->to(params[i].scalar_type())) : w);
  }
  return out;
}

using PenaltySig = Tensor(TensorList, TensorList, const Weights&, double, TensorList, double);
Tensor l2sp_penalty(TensorList params, TensorList refs, const Weights& weights, double alpha, TensorList new_params,
                    double beta) {
  static auto op = handle<PenaltySig>("tlkernels::l2sp_penalty");
  return op.call(params, refs, weights_like_params(params, weights), alpha, new_params, beta);
}

using ValueGradSig = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>(TensorList, TensorList,
                                                                                  const Weights&, double, TensorList,
                                                                                  double);
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> l2sp_value_and_grad(TensorList params, TensorList refs,
                                                                                 const Weights& weights, double alpha,
                                                                                 TensorList new_params, double beta) {
  static auto op = handle<ValueGradSig>("tlkernels::l2sp_value_and_grad");
  return op.call(params, refs, weights_like_params(params, weights), alpha, new_params, beta);
}

// ATen's own autocast wrapper: excludes the device's autocast key, casts every eligible (floating, on that
// device) tensor argument, tensor lists included, and calls F.
template <at::autocast::CastPolicy policy, c10::DeviceType device, class Sig, Sig* F>
constexpr auto wrap() {
  return &at::autocast::WrapFunction<policy, device, Sig, Sig, F>::type::call;
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  using at::autocast::CastPolicy;
  m.impl("gated_conv2d", wrap<CastPolicy::lower_precision_fp, device, decltype(tlkernels::gated_conv2d),
                              &tlkernels::gated_conv2d>());
  m.impl("cross_entropy", wrap<CastPolicy::fp32, device, CESig, &cross_entropy>());
  m.impl("joint_cross_entropy", wrap<CastPolicy::fp32, device, JointSig, &joint_cross_entropy>());
  m.impl("filterbank_histogram", wrap<CastPolicy::fp32, device, HistSig, &filterbank_histogram>());
  m.impl("l2sp_penalty", wrap<CastPolicy::fp32, device, PenaltySig, &l2sp_penalty>());
  m.impl("l2sp_value_and_grad", wrap<CastPolicy::fp32, device, ValueGradSig, &l2sp_value_and_grad>());
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(tlkernels, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace tlkernels
