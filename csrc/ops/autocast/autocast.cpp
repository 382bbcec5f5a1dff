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

#include "ops/cross_entropy.h"
#include "ops/gated_conv2d.h"
#include "ops/histogram.h"
#include "ops/l2sp.h"

#include <tuple>
#include <vector>

namespace tlkernels {
namespace {

using at::Tensor;
using at::TensorList;

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

Tensor l2sp_penalty_cast(TensorList params, TensorList refs, const Weights& weights, double alpha,
                         TensorList new_params, double beta) {
  return tlkernels::l2sp_penalty(params, refs, weights_like_params(params, weights), alpha, new_params, beta);
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> l2sp_value_and_grad_cast(
    TensorList params, TensorList refs, const Weights& weights, double alpha, TensorList new_params, double beta) {
  return tlkernels::l2sp_value_and_grad(params, refs, weights_like_params(params, weights), alpha, new_params, beta);
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
  m.impl("cross_entropy",
         wrap<CastPolicy::fp32, device, decltype(tlkernels::cross_entropy), &tlkernels::cross_entropy>());
  m.impl("joint_cross_entropy", wrap<CastPolicy::fp32, device, decltype(tlkernels::joint_cross_entropy),
                                     &tlkernels::joint_cross_entropy>());
  m.impl("filterbank_histogram", wrap<CastPolicy::fp32, device, decltype(tlkernels::filterbank_histogram),
                                      &tlkernels::filterbank_histogram>());
  m.impl("l2sp_penalty", wrap<CastPolicy::fp32, device, decltype(tlkernels::l2sp_penalty), &l2sp_penalty_cast>());
  m.impl("l2sp_value_and_grad",
         wrap<CastPolicy::fp32, device, decltype(tlkernels::l2sp_value_and_grad), &l2sp_value_and_grad_cast>());
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(tlkernels, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace tlkernels
