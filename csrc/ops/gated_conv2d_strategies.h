#pragma once
// The gated convolution's exact strategies on ATen ops (gated_conv2d_forward.cpp, gated_conv2d_backward.cpp),
// shared by the choice among them (gated_conv2d_aten.cpp) and the CPU small-map engine (cpu/gated_conv2d_mix.cpp).
#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <tuple>

#include "ops/gated_conv2d_common.h"

namespace tlkernels {
namespace gconv {

enum class Strategy { Routed, Mix, Blended, Grouped, Concat, Brgemm, Bmm, TwoConv, Triton };

// Which gradients the backward computes: the op's `bool[6] output_mask`, by name.
struct GradMask {
  bool input = false, weight_pre = false, weight_ft = false, gate = false, bias_pre = false, bias_ft = false;
  static GradMask of(const c10::List<bool>& m) {
    return {m.get(0), m.get(1), m.get(2), m.get(3), m.get(4), m.get(5)};
  }
  // In the op's output order (input, weight_pre, weight_ft, gate, bias_pre, bias_ft).
  bool operator[](int i) const {
    const bool v[6] = {input, weight_pre, weight_ft, gate, bias_pre, bias_ft};
    return v[i];
  }
};

// (dx, dWp, dWf, dL/dg, dbp, dbf): the op's outputs.
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = c10::optional<at::Tensor>;

// Gates and weights, the pieces every strategy uses (gated_conv2d_forward.cpp).
at::Tensor effective_gate(const at::Tensor& gate, int64_t C_out, bool hard);
bool gate_is_binary(const at::Tensor& gate, bool hard);
at::Tensor concat_per_group(const at::Tensor& p, const at::Tensor& f, int64_t groups);
// The routed strategy's batch split: the images whose binary per-image gate is 0 (idx0) and 1 (idx1).
struct Route {
  at::Tensor idx0, idx1;
};
// Splits the batch by the (N,) per-image gate (g >= 0.5) with one device-to-host read (the parts' sizes); false,
// with `r` untouched, when a gate is NaN (a NaN gate gives NaN outputs, which routing cannot).
bool route(const at::Tensor& g1d, Route& r);
at::Tensor blended_weights(const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g);
// True for the 1x1 unpadded convolutions the bmm strategy runs (NCHW with any groups, channels_last with one).
bool bmm_applicable(const at::Tensor& x, const at::Tensor& w, const ConvArgs& a);

// Forward strategies: write the gated convolution into `out` (gated_conv2d_forward.cpp). `r` of forward_routed
// is the batch split of route(), `g` of the others the effective (N, C_out) gate.
void forward_routed(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const Route& r,
                    const OptTensor& bp, const OptTensor& bf, const ConvArgs& a, at::Tensor& out);
void forward_blended(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                     const OptTensor& bp, const OptTensor& bf, const ConvArgs& a, at::Tensor& out);
// (diff: when not null, also y_f - y_p, free on this path)
void forward_concat(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                    const OptTensor& bp, const OptTensor& bf, const ConvArgs& a, at::Tensor& out, at::Tensor* diff);
// (diff: as forward_concat's)
void forward_twoconv(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                     const OptTensor& bp, const OptTensor& bf, const ConvArgs& a, at::Tensor& out, at::Tensor* diff);
void forward_bmm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                 const OptTensor& bp, const OptTensor& bf, const ConvArgs& a, at::Tensor& out);
// dx of the bmm strategy: per image the blended weights' transpose times dy.
at::Tensor input_grad_bmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                          const at::Tensor& g, const ConvArgs& a);
void forward_grouped(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                     const OptTensor& bp, const OptTensor& bf, const ConvArgs& a, at::Tensor& out);

// Backward strategies (gated_conv2d_backward.cpp); biases' and the per-image gate's reductions are the caller's.
at::Tensor gate_grad_bias(const at::Tensor& dy_sum, const OptTensor& bp, const OptTensor& bf, const at::Tensor& wp);
Grads backward_routed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                      const Route& r, const OptTensor& bp, const OptTensor& bf, const ConvArgs& a,
                      const GradMask& m, bool per_filter);
Grads backward_twoconv(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const OptTensor& bp, const OptTensor& bf, const at::Tensor& diff,
                       const ConvArgs& a, const GradMask& m);
Grads backward_grouped(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const ConvArgs& a, const GradMask& m);
// Blended, Mix, Brgemm, Bmm or Concat `st`; weights_by_mix: the engine's weight pass gives dWp, dWf and dL/dg together;
// binary: every gate is 0 or 1 (the engine's input gradient then picks weight rows instead of blending).
Grads backward_general(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const OptTensor& bp, const OptTensor& bf, const at::Tensor& diff,
                       const ConvArgs& a, const GradMask& m, Strategy st, bool weights_by_mix, bool binary);

}  // namespace gconv
}  // namespace tlkernels
