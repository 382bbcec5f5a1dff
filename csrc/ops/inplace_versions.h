#pragma once
// The ADInplaceOrView kernel of the ops that write arguments in place (their schema marks them `Tensor(a!)` or
// `Tensor(a!)[]`): it bumps the autograd version counter of every tensor written, as ATen's own in-place ops do.
// Our kernels write through data pointers and would leave `tensor._version` unchanged, so anything keyed on it
// would go stale silently: autograd's "modified by an inplace operation" check, and caches such as AdaFilter's
// folded eval weights (an in-place optimizer step would leave them stale). Each op's schema file registers it:
//   TORCH_LIBRARY_IMPL(tlkernels, ADInplaceOrView, m) { m.impl("op_", bump_written_versions_kernel()); }
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

namespace tlkernels {

inline void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensor()) {
      written.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      const auto list = v.toTensorList();
      for (size_t j = 0; j < list.size(); ++j) written.push_back(list.get(j));
    }
  }
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  for (const auto& t : written)
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

inline torch::CppFunction bump_written_versions_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>();
}

}  // namespace tlkernels
