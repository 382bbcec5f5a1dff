// The gated convolution's forward strategies on ATen ops (device-generic: oneDNN on CPU tensors, cuDNN on CUDA
// tensors), and the gate and weight pieces the backward shares. What each strategy does and costs:
// gated_conv2d_aten.cpp.
#include <ATen/ATen.h>

#include <vector>

#include "ops/gated_conv2d_strategies.h"

namespace tlkernels {
namespace gconv {

// Effective forward gate, shape (N, C_out), dtype of the input. Hard gates are rounded (g >= 0.5); a NaN
// gate stays NaN, so its outputs are NaN as in the blend formula of the reference.
at::Tensor effective_gate(const at::Tensor& gate, int64_t C_out, bool hard) {
  at::Tensor g = hard ? at::where(at::isnan(gate), gate, gate.ge(0.5).to(gate.scalar_type())) : gate;
  if (g.dim() == 1) g = g.unsqueeze(1).expand({g.size(0), C_out});
  return g.contiguous();
}

// True when every forward gate value is 0 or 1 (the routed and row-selecting paths need that); a hard gate
// holding a NaN is not binary: it takes a blending path, which propagates the NaN.
bool gate_is_binary(const at::Tensor& gate, bool hard) {
  if (gate.numel() == 0) return true;
  if (hard) return !at::isnan(gate).any().item<bool>();
  return at::logical_or(gate.eq(0), gate.eq(1)).all().item<bool>();
}

// [Wp; Wf] arranged so that each group's output channels stay contiguous:
// (G, C_out/G, ...) x 2 -> (G, 2, C_out/G, ...) -> (2*C_out, ...).
at::Tensor concat_per_group(const at::Tensor& p, const at::Tensor& f, int64_t groups) {
  auto sp = p.sizes().vec();
  std::vector<int64_t> v{groups, 1, p.size(0) / groups};
  v.insert(v.end(), sp.begin() + 1, sp.end());
  auto out = at::cat({p.reshape(v), f.reshape(v)}, 1);
  sp[0] *= 2;
  return out.reshape(sp);
}

void routed_parts(const at::Tensor& g1d, at::Tensor& idx0, at::Tensor& idx1) {
  auto sel = g1d.ge(0.5);
  idx1 = at::nonzero(sel).squeeze(1);
  idx0 = at::nonzero(sel.logical_not()).squeeze(1);
}

// Per-image blended weights (N*C_out, C_in/G, kH, kW) for the grouped formulation.
at::Tensor blended_weights(const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g) {
  const int64_t N = g.size(0), C = wp.size(0);
  auto w = at::addcmul(wp.unsqueeze(0), g.view({N, C, 1, 1, 1}), (wf - wp).unsqueeze(0));
  return w.view({N * C, wp.size(1), wp.size(2), wp.size(3)});
}

void forward_routed(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& gate,
                    const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                    at::Tensor& out) {
  at::Tensor idx0, idx1;
  routed_parts(gate, idx0, idx1);
  if (idx1.numel() == x.size(0)) { out.copy_(conv(x, wf, bf, a)); return; }
  if (idx0.numel() == x.size(0)) { out.copy_(conv(x, wp, bp, a)); return; }
  out.index_copy_(0, idx0, conv(x.index_select(0, idx0), wp, bp, a));
  out.index_copy_(0, idx1, conv(x.index_select(0, idx1), wf, bf, a));
}

void forward_blended(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                     const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                     at::Tensor& out) {
  const bool any_bias = has(bp) || has(bf);
  at::Tensor b0, db, bb;
  if (any_bias) {
    b0 = bias_or_zeros(bp, wp);
    db = bias_or_zeros(bf, wp) - b0;
    bb = at::empty_like(b0);
  }
  const at::Tensor dw = wf - wp;
  at::Tensor wb = at::empty_like(wp);
  for (int64_t b = 0; b < x.size(0); ++b) {
    at::addcmul_out(wb, wp, g[b].view({wp.size(0), 1, 1, 1}), dw);
    c10::optional<at::Tensor> bias;
    if (any_bias) bias = at::addcmul_out(bb, b0, g[b], db);
    out[b].copy_(conv(x.narrow(0, b, 1), wb, bias, a)[0]);
  }
}

void forward_concat(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                    const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                    at::Tensor& out, at::Tensor* diff) {
  const int64_t G = a.groups, C = wp.size(0), N = x.size(0);
  c10::optional<at::Tensor> bias;
  if (has(bp) || has(bf)) bias = concat_per_group(bias_or_zeros(bp, wp), bias_or_zeros(bf, wp), G);
  auto y = conv(x, concat_per_group(wp, wf, G), bias, a);
  y = y.view({N, G, 2, C / G, y.size(2), y.size(3)});
  auto outv = out.view({N, G, C / G, out.size(2), out.size(3)});
  at::lerp_out(outv, y.select(2, 0), y.select(2, 1), g.view({N, G, C / G, 1, 1}));
  if (diff) {
    *diff = at::empty_like(out);
    auto dv = diff->view({N, G, C / G, out.size(2), out.size(3)});
    at::sub_out(dv, y.select(2, 1), y.select(2, 0));
  }
}

// Forward with the batch folded into groups: one grouped conv over per-image blended weights.
void forward_grouped(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                     const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                     at::Tensor& out) {
  const int64_t N = x.size(0), C = wp.size(0);
  c10::optional<at::Tensor> bias;
  if (has(bp) || has(bf)) {
    const at::Tensor b0 = bias_or_zeros(bp, wp);
    bias = at::addcmul(b0.unsqueeze(0), g, (bias_or_zeros(bf, wp) - b0).unsqueeze(0)).reshape({N * C});
  }
  auto y = conv(x.contiguous().view({1, N * x.size(1), x.size(2), x.size(3)}), blended_weights(wp, wf, g), bias, a,
                N * a.groups);
  out.copy_(y.view({N, C, y.size(2), y.size(3)}));
}

}  // namespace gconv
}  // namespace tlkernels
