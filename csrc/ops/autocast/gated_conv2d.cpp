// gated_conv2d under torch.autocast: the autocast dtype (ops/autocast/wrap.h).
#include "ops/autocast/wrap.h"
#include "ops/gated_conv2d.h"

namespace tlkernels {
namespace {

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  using at::autocast::CastPolicy;
  m.impl("gated_conv2d", autocast::wrap<CastPolicy::lower_precision_fp, device, decltype(gated_conv2d),
                                        &gated_conv2d>());
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(tlkernels, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace tlkernels
