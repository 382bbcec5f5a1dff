#pragma once
// Argument checks of the L2-SP ops, shared by the CPU and CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "ops/check.h"

namespace tlkernels {

// The kernels walk a parameter and its companions (gradient, reference, optimizer state) with one flat
// element index, so all of them need one memory layout; any dense layout works (contiguous, channels_last).
inline at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }
// t's values in the layout of `like` (dense): t itself when it already has it, else a copy.
inline at::Tensor layout_like(const at::Tensor& t, const at::Tensor& like) {
  return t.strides() == like.strides() && t.is_non_overlapping_and_dense() ? t : at::empty_like(like).copy_(t);
}

// Errors say ValueError for counts, shapes, devices and layouts, TypeError for dtypes (as the Python front ends,
// which only convert argument types and run these checks through _l2sp_check before the dispatcher picks a kernel).

// "params[3]" (an item of a list argument), or "params[3].grad" (the gradient of one, named as a user sees it).
inline std::string item(const char* list, size_t i, bool dot_grad = false) {
  return std::string(list) + "[" + std::to_string(i) + "]" + (dot_grad ? ".grad" : "");
}

// Tensors an op writes in place must not share memory: items of one tensor run in parallel with another's,
// so a tensor listed twice would lose one of its updates to a data race.
inline void check_disjoint_outputs(const char* op, const std::vector<std::pair<const char*, at::TensorList>>& lists,
                                   bool dot_grad = false) {
  struct Span {
    uintptr_t lo, hi;
    const char* name;
    size_t i;
  };
  std::vector<Span> spans;
  for (const auto& [name, ts] : lists)
    for (size_t i = 0; i < ts.size(); ++i)
      if (ts[i].defined() && ts[i].numel() > 0) {
        const auto lo = reinterpret_cast<uintptr_t>(ts[i].const_data_ptr());
        spans.push_back({lo, lo + ts[i].nbytes(), name, i});
      }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (size_t k = 1; k < spans.size(); ++k)
    TORCH_CHECK(spans[k].lo >= spans[k - 1].hi, op, ": ", item(spans[k - 1].name, spans[k - 1].i, dot_grad),
                " and ", item(spans[k].name, spans[k].i, dot_grad), " share memory (the same tensor listed twice?); "
                "each tensor updated in place must appear once");
}

inline void check_count(const char* op, const char* name, size_t got, size_t n, const char* what = "tensor",
                        const char* per = "param") {
  TORCH_CHECK_VALUE(got == n, op, ": ", name, " must have one ", what, " per ", per, " (", n, "), got ", got);
}

// p is floating point; r (when defined) has p's shape, dtype and device.
inline void check_pair(const char* op, const at::Tensor& p, const at::Tensor& r, const std::string& pname,
                       const std::string& rname) {
  TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), op, ": ", pname, " must be floating point, got ",
                   dtype_str(p.scalar_type()));
  if (!r.defined()) return;
  TORCH_CHECK_VALUE(r.sizes() == p.sizes(), op, ": ", rname, " must have the shape of ", pname, " ",
                    shape_str(p.sizes()), ", got ", shape_str(r.sizes()));
  TORCH_CHECK_TYPE(r.scalar_type() == p.scalar_type(), op, ": ", rname, " must have the dtype of ", pname, " (",
                   dtype_str(p.scalar_type()), "), got ", dtype_str(r.scalar_type()));
  TORCH_CHECK_VALUE(r.device() == p.device(), op, ": ", rname, " must be on the device of ", pname, " (",
                    p.device(), "), got ", r.device());
}

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// Per-element weights of the pull toward the reference (L2-SP-Fisher): an empty list (no weights) or one entry
// per param, None or a tensor of that param's shape, dtype and device.
inline void check_weights(const char* op, at::TensorList params, const OptionalTensors& weights) {
  TORCH_CHECK_VALUE(weights.empty() || weights.size() == params.size(), op,
                    ": weights must have one entry per param (", params.size(), "), got ", weights.size(),
                    " (an empty list: no weights)");
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto w = weights.get(i);
    if (w.has_value()) check_pair(op, params[i], *w, item("params", i), item("weights", i));
  }
}

// Optional companions of the (dense) params (references of the steps, weights) in their params' memory
// layout: one per param, undefined where a param has none (an empty list: none at all).
inline std::vector<at::Tensor> optional_like(const OptionalTensors& ts, at::TensorList P) {
  std::vector<at::Tensor> out(P.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto t = ts.get(i);
    if (t.has_value()) out[i] = layout_like(*t, P[i]);
  }
  return out;
}

inline void check_penalty_args(const char* op, at::TensorList params, at::TensorList refs,
                               const OptionalTensors& weights, at::TensorList new_params) {
  TORCH_CHECK_VALUE(!params.empty() || !new_params.empty(), op, ": needs at least one tensor in params or "
                    "new_params");
  check_count(op, "refs", refs.size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) check_pair(op, params[i], refs[i], item("params", i), item("refs", i));
  check_weights(op, params, weights);
  for (size_t i = 0; i < new_params.size(); ++i) check_pair(op, new_params[i], at::Tensor(), item("new_params", i), "");
}

// Gradients that the penalty's gradient is added into, in place: one per tensor, same shape, dtype, device
// and memory layout (written through a flat pointer). dot_grad: they are the tensors' .grad (named so).
inline void check_accumulate_args(const char* op, at::TensorList params, at::TensorList grads, const char* pname,
                                  const char* gname, bool dot_grad) {
  check_count(op, gname, grads.size(), params.size(), "tensor", pname);
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string g = dot_grad ? item(pname, i, true) : item(gname, i);
    check_pair(op, params[i], grads[i], item(pname, i), g);
    TORCH_CHECK_VALUE(grads[i].is_non_overlapping_and_dense() && grads[i].strides() == dense(params[i]).strides(),
                      op, ": ", g, " must have the memory layout of ", item(pname, i), " (strides ",
                      shape_str(dense(params[i]).strides()), "; it is updated in place), got strides ",
                      shape_str(grads[i].strides()));
  }
}

// Every check of l2sp_value_and_grad_ (the penalty's, the gradients', their disjointness).
inline void check_inplace_args(const char* op, at::TensorList params, at::TensorList refs,
                               const OptionalTensors& weights, at::TensorList new_params, at::TensorList grads,
                               at::TensorList new_grads, bool dot_grad = false) {
  check_penalty_args(op, params, refs, weights, new_params);
  check_accumulate_args(op, params, grads, "params", "grads", dot_grad);
  check_accumulate_args(op, new_params, new_grads, "new_params", "new_grads", dot_grad);
  if (dot_grad)
    check_disjoint_outputs(op, {{"params", grads}, {"new_params", new_grads}}, true);
  else
    check_disjoint_outputs(op, {{"grads", grads}, {"new_grads", new_grads}});
}

inline void check_adamw_step(const char* op, int64_t step) {
  TORCH_CHECK_VALUE(step >= 1, op, ": step must be >= 1, got ", step);
}

inline void check_step_args(const char* op, at::TensorList params, at::TensorList grads,
                     const std::vector<at::TensorList>& states, const std::vector<const char*>& state_names,
                     const OptionalTensors& refs, const OptionalTensors& weights, at::ArrayRef<double> coeffs) {
  const size_t n = params.size();
  check_count(op, "grads", grads.size(), n);
  check_count(op, "refs", refs.size(), n, "entry");
  check_count(op, "coeffs", coeffs.size(), n, "value");
  for (size_t s = 0; s < states.size(); ++s) check_count(op, state_names[s], states[s].size(), n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(params[i].is_non_overlapping_and_dense(), op, ": params[", i, "] must be dense (contiguous, "
                      "channels_last or another layout without gaps), got sizes ", shape_str(params[i].sizes()),
                      " strides ", shape_str(params[i].strides()));
    check_pair(op, params[i], grads[i], item("params", i), item("grads", i));
    for (size_t s = 0; s < states.size(); ++s) {
      check_pair(op, params[i], states[s][i], item("params", i), item(state_names[s], i));
      TORCH_CHECK_VALUE(states[s][i].strides() == params[i].strides(), op, ": ", item(state_names[s], i),
                        " must have the memory layout of ", item("params", i), " (strides ",
                        shape_str(params[i].strides()), "), got strides ", shape_str(states[s][i].strides()));
    }
    const auto r = refs.get(i);
    if (r.has_value()) check_pair(op, params[i], *r, item("params", i), item("refs", i));
  }
  check_weights(op, params, weights);
  std::vector<std::pair<const char*, at::TensorList>> written{{"params", params}};
  for (size_t s = 0; s < states.size(); ++s) written.push_back({state_names[s], states[s]});
  check_disjoint_outputs(op, written);
}

}  // namespace tlkernels
