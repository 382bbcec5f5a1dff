// l2sp_penalty and l2sp_value_and_grad under torch.autocast: float32 (ops/autocast/wrap.h).
#include "ops/autocast/wrap.h"
#include "ops/l2sp.h"

#include <tuple>
#include <vector>

namespace tlkernels {
namespace {

using at::Tensor;
using at::TensorList;

// Per-element weights (Tensor?[]) are not among the lists ATen's wrapper casts: each follows its parameter's
// (already cast) dtype here, as the kernels need.
OptionalTensorList weights_like_params(TensorList params, const OptionalTensorList& weights) {
  OptionalTensorList out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto w = weights.get(i);
    out.push_back(w.has_value() && i < params.size() ? std::optional<Tensor>(w->to(params[i].scalar_type())) : w);
  }
  return out;
}

Tensor penalty_cast(TensorList params, TensorList refs, const OptionalTensorList& weights, double alpha,
                    TensorList new_params, double beta) {
  return l2sp_penalty(params, refs, weights_like_params(params, weights), alpha, new_params, beta);
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> value_and_grad_cast(
    TensorList params, TensorList refs, const OptionalTensorList& weights, double alpha, TensorList new_params,
    double beta) {
  return l2sp_value_and_grad(params, refs, weights_like_params(params, weights), alpha, new_params, beta);
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  using at::autocast::CastPolicy;
  m.impl("l2sp_penalty", autocast::wrap<CastPolicy::fp32, device, decltype(l2sp_penalty), &penalty_cast>());
  m.impl("l2sp_value_and_grad",
         autocast::wrap<CastPolicy::fp32, device, decltype(l2sp_value_and_grad), &value_and_grad_cast>());
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(tlkernels, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace tlkernels
