// filterbank_histogram under torch.autocast: float32 (ops/autocast/wrap.h).
#include "ops/autocast/wrap.h"
#include "ops/histogram.h"

namespace tlkernels {
namespace {

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  using at::autocast::CastPolicy;
  m.impl("filterbank_histogram",
         autocast::wrap<CastPolicy::fp32, device, decltype(filterbank_histogram), &filterbank_histogram>());
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(tlkernels, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace tlkernels
