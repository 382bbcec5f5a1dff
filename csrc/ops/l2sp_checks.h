#pragma once
// Argument checks of the L2-SP ops, shared by the CPU and CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <algorithm>
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

// Tensors an op writes in place must not share memory: items of one tensor run in parallel with another's,
// so a tensor listed twice would lose one of its updates to a data race.
inline void check_disjoint_outputs(const char* op, const std::vector<std::pair<const char*, at::TensorList>>& lists) {
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
    TORCH_CHECK(spans[k].lo >= spans[k - 1].hi, op, ": ", spans[k - 1].name, "[", spans[k - 1].i, "] and ",
                spans[k].name, "[", spans[k].i, "] share memory (the same tensor listed twice?); each tensor "
                "updated in place must appear once");
}

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

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// Per-element weights of the pull toward the reference (L2-SP-Fisher): an empty list (no weights) or one entry
// per param, None or a tensor of that param's shape, dtype and device.
inline void check_weights(const char* op, at::TensorList params, const OptionalTensors& weights) {
  TORCH_CHECK(weights.empty() || weights.size() == params.size(), op, ": weights must be empty or have one entry "
              "per param (", params.size(), "), got ", weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto w = weights.get(i);
    if (w.has_value()) check_pair(op, params[i], *w, i, "params", "weights");
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
  TORCH_CHECK(params.size() == refs.size(), op, ": refs must have one tensor per param (", params.size(),
              "), got ", refs.size());
  for (size_t i = 0; i < params.size(); ++i) check_pair(op, params[i], refs[i], i, "params", "refs");
  check_weights(op, params, weights);
  for (size_t i = 0; i < new_params.size(); ++i) check_pair(op, new_params[i], at::Tensor(), i, "new_params", "");
}

// Gradients that the penalty's gradient is added into, in place: one per tensor, same shape, dtype, device
// and memory layout (written through a flat pointer).
inline void check_accumulate_args(const char* op, at::TensorList params, at::TensorList grads,
                                  const char* pname, const char* gname) {
  TORCH_CHECK(grads.size() == params.size(), op, ": ", gname, " must have one tensor per ", pname, " (",
              params.size(), "), got ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_pair(op, params[i], grads[i], i, pname, gname);
    TORCH_CHECK(grads[i].is_non_overlapping_and_dense() && grads[i].strides() == dense(params[i]).strides(), op,
                ": ", gname, "[", i, "] must have the memory layout of ", pname, "[", i, "] (strides ",
                shape_str(dense(params[i]).strides()), ", it is written in place), got strides ",
                shape_str(grads[i].strides()));
  }
}

inline void check_step_args(const char* op, at::TensorList params, at::TensorList grads,
                     const std::vector<at::TensorList>& states, const std::vector<const char*>& state_names,
                     const OptionalTensors& refs, const OptionalTensors& weights, at::ArrayRef<double> coeffs) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": grads must have one tensor per param (", n, "), got ", grads.size());
  TORCH_CHECK(refs.size() == n, op, ": refs must have one entry per param (", n, "), got ", refs.size());
  TORCH_CHECK(coeffs.size() == n, op, ": coeffs must have one value per param (", n, "), got ", coeffs.size());
  for (size_t s = 0; s < states.size(); ++s)
    TORCH_CHECK(states[s].size() == n, op, ": ", state_names[s], " must have one tensor per param (", n,
                "), got ", states[s].size());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].is_non_overlapping_and_dense(), op, ": params[", i, "] must be dense (contiguous, "
                "channels_last or another layout without gaps), got sizes ", shape_str(params[i].sizes()),
                " strides ", shape_str(params[i].strides()));
    check_pair(op, params[i], grads[i], i, "params", "grads");
    for (size_t s = 0; s < states.size(); ++s) {
      check_pair(op, params[i], states[s][i], i, "params", state_names[s]);
      TORCH_CHECK(states[s][i].strides() == params[i].strides(), op, ": ", state_names[s], "[", i,
                  "] must have the memory layout of params[", i, "] (strides ", shape_str(params[i].strides()),
                  "), got strides ", shape_str(states[s][i].strides()));
    }
    const auto r = refs.get(i);
    if (r.has_value()) check_pair(op, params[i], *r, i, "params", "refs");
  }
  check_weights(op, params, weights);
  std::vector<std::pair<const char*, at::TensorList>> written{{"params", params}};
  for (size_t s = 0; s < states.size(); ++s) written.push_back({state_names[s], states[s]});
  check_disjoint_outputs(op, written);
}

}  // namespace tlkernels
