#pragma once
// Argument checks of the L2-SP ops, shared by the CPU and CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include "ops/check.h"

namespace tlkernels {

inline void check_pair(const char* op, const at::Tensor& p, const at::Tensor& r, size_t i, const char* pname,
                const char* rname) {
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": ", pname, "[", i, "] must be floating point, got ",
              p.scalar_type());
  if (!r.defined()) return;
  TORCH_CHECK(r.sizes() == p.sizes(), op, ": ", rname, "[", i, "] must have the shape of ", pname, "[", i, "] ",
              shape_str(p.sizes()), ", got ", shape_str(r.sizes()));
  TORCH_CHECK(r.scalar_type() == p.scalar_type(), op, ": ", rname, "[", i, "] must have the dtype of ", pname,
              "[", i, "] (", p.scalar_type(), "), got ", r.scalar_type());
  TORCH_CHECK(r.device() == p.device(), op, ": ", rname, "[", i, "] must be on the device of ", pname, "[", i,
              "] (", p.device(), "), got ", r.device());
}

inline void check_penalty_args(const char* op, at::TensorList params, at::TensorList refs, at::TensorList new_params) {
  TORCH_CHECK(params.size() == refs.size(), op, ": refs must have one tensor per param (", params.size(),
              "), got ", refs.size());
  for (size_t i = 0; i < params.size(); ++i) check_pair(op, params[i], refs[i], i, "params", "refs");
  for (size_t i = 0; i < new_params.size(); ++i) check_pair(op, new_params[i], at::Tensor(), i, "new_params", "");
}

// Gradients that the penalty's gradient is added into, in place: one per tensor, same shape, dtype and
// device, contiguous (written through a flat pointer).
inline void check_accumulate_args(const char* op, at::TensorList params, at::TensorList grads,
                                  const char* pname, const char* gname) {
  TORCH_CHECK(grads.size() == params.size(), op, ": ", gname, " must have one tensor per ", pname, " (",
              params.size(), "), got ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_pair(op, params[i], grads[i], i, pname, gname);
    TORCH_CHECK(grads[i].is_contiguous(), op, ": ", gname, "[", i, "] must be contiguous (it is written in place)");
  }
}

inline void check_step_args(const char* op, at::TensorList params, at::TensorList grads,
                     const std::vector<at::TensorList>& states, const std::vector<const char*>& state_names,
                     const c10::List<std::optional<at::Tensor>>& refs, at::ArrayRef<double> coeffs) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": grads must have one tensor per param (", n, "), got ", grads.size());
  TORCH_CHECK(refs.size() == n, op, ": refs must have one entry per param (", n, "), got ", refs.size());
  TORCH_CHECK(coeffs.size() == n, op, ": coeffs must have one value per param (", n, "), got ", coeffs.size());
  for (size_t s = 0; s < states.size(); ++s)
    TORCH_CHECK(states[s].size() == n, op, ": ", state_names[s], " must have one tensor per param (", n,
                "), got ", states[s].size());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].is_contiguous(), op, ": params[", i, "] must be contiguous");
    check_pair(op, params[i], grads[i].contiguous(), i, "params", "grads");
    for (size_t s = 0; s < states.size(); ++s) {
      check_pair(op, params[i], states[s][i], i, "params", state_names[s]);
      TORCH_CHECK(states[s][i].is_contiguous(), op, ": ", state_names[s], "[", i, "] must be contiguous");
    }
    const auto r = refs.get(i);
    if (r.has_value()) check_pair(op, params[i], *r, i, "params", "refs");
  }
}

}  // namespace tlkernels
