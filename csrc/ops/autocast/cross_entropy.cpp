// cross_entropy and joint_cross_entropy under torch.autocast: float32 (ops/autocast/wrap.h).
#include "ops/autocast/wrap.h"
#include "ops/cross_entropy.h"

namespace tlkernels {
namespace {

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  using at::autocast::CastPolicy;
  m.impl("cross_entropy", autocast::wrap<CastPolicy::fp32, device, decltype(cross_entropy), &cross_entropy>());
  m.impl("joint_cross_entropy",
         autocast::wrap<CastPolicy::fp32, device, decltype(joint_cross_entropy), &joint_cross_entropy>());
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(tlkernels, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace tlkernels
