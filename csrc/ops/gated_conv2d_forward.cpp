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

bool route(const at::Tensor& g1d, Route& r) {
  const int64_t N = g1d.size(0);
  const at::Tensor sel = g1d.ge(0.5);
  // The one device-to-host read: the number of images routed to the fine-tuned weights, plus N + 1 per NaN gate.
  const int64_t v = (sel.sum() + at::isnan(g1d).sum() * (N + 1)).item<int64_t>();
  if (v > N) return false;
  r.idx1 = at::nonzero_static(sel, v).squeeze(1);  // (sizes known: no further read)
  r.idx0 = at::nonzero_static(sel.logical_not(), N - v).squeeze(1);
  return true;
}

// Per-image blended weights (N*C_out, C_in/G, kH, kW) for the grouped formulation.
at::Tensor blended_weights(const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g) {
  const int64_t N = g.size(0), C = wp.size(0);
  auto w = at::addcmul(wp.unsqueeze(0), g.view({N, C, 1, 1, 1}), (wf - wp).unsqueeze(0));
  return w.view({N * C, wp.size(1), wp.size(2), wp.size(3)});
}

void forward_routed(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const Route& r,
                    const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                    at::Tensor& out) {
  const at::Tensor &idx0 = r.idx0, &idx1 = r.idx1;
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

// The naive way's work as a strategy: both branches as two library convolutions and one lerp (diff free).
void forward_twoconv(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                     const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                     at::Tensor& out, at::Tensor* diff) {
  const at::Tensor yp = conv(x, wp, bp, a), yf = conv(x, wf, bf, a);
  at::lerp_out(out, yp, yf, g.view({g.size(0), g.size(1), 1, 1}));
  if (diff) *diff = (yf - yp).contiguous(out.suggest_memory_format());
}

// The bmm strategy: a 1x1 unpadded convolution is, per image, the GEMM W (C_out x C_in) @ x (C_in x pixels) on
// the input at the output pixels, so per-image blended weights make the gated convolution one batched GEMM
// with exactly one convolution's FLOPs (N*C_out*C_in blended values, small next to the GEMM).
namespace {

// Laid out channels_last and not also contiguous (a tensor with one channel or one pixel is both: the NCHW
// views below serve it, with any groups).
bool nhwc(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast && !t.is_contiguous();
}

}  // namespace

bool bmm_applicable(const at::Tensor& x, const at::Tensor& w, const ConvArgs& a) {
  return w.size(2) == 1 && w.size(3) == 1 && a.padding[0] == 0 && a.padding[1] == 0 && (!nhwc(x) || a.groups == 1);
}

namespace {

// The input at the output pixels of a 1x1 unpadded convolution (a strided view for stride > 1).
at::Tensor at_output_pixels(const at::Tensor& x, const ConvArgs& a) {
  if (a.stride[0] == 1 && a.stride[1] == 1) return x;
  return x.slice(2, 0, c10::nullopt, a.stride[0]).slice(3, 0, c10::nullopt, a.stride[1]);
}

// Per-image blended weights (N, C_out, C_in/G): row c of image n is Wp[c] + g[n,c] (Wf[c] - Wp[c]) (exactly
// Wp[c] or Wf[c] for a 0/1 gate: lerp's two-sided formula).
at::Tensor blended_rows(const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g) {
  const int64_t N = g.size(0), C = wp.size(0), K = wp.size(1);
  return at::lerp(wp.view({1, C, K}), wf.view({1, C, K}), g.view({N, C, 1}));
}

}  // namespace

void forward_bmm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                 const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                 at::Tensor& out) {
  const int64_t N = x.size(0), C = wp.size(0), G = a.groups, K = wp.size(1);
  const int64_t P = out.size(2) * out.size(3);
  const at::Tensor xs = at_output_pixels(x, a), wb = blended_rows(wp, wf, g);
  if (nhwc(out)) {  // (groups == 1)
    // (N, P, C_in) @ (N, C_in, C_out) -> (N, P, C_out): the channels_last output in place.
    at::Tensor y = out.permute({0, 2, 3, 1}).view({N, P, C});
    at::bmm_out(y, xs.permute({0, 2, 3, 1}).contiguous().view({N, P, K}), wb.transpose(1, 2));
  } else {
    at::Tensor y = out.view({N * G, C / G, P});
    at::bmm_out(y, wb.view({N * G, C / G, K}), xs.contiguous().view({N * G, K, P}));
  }
  if (has(bp) || has(bf)) {
    const at::Tensor b0 = bias_or_zeros(bp, wp);
    out.add_(at::lerp(b0.unsqueeze(0), bias_or_zeros(bf, wp).unsqueeze(0), g).view({N, C, 1, 1}));
  }
}

at::Tensor input_grad_bmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                          const at::Tensor& g, const ConvArgs& a) {
  const int64_t N = x.size(0), C = wp.size(0), G = a.groups, K = wp.size(1);
  const int64_t OH = dy.size(2), OW = dy.size(3), P = OH * OW;
  const at::Tensor wb = blended_rows(wp, wf, g);
  const bool strided = a.stride[0] != 1 || a.stride[1] != 1;
  at::Tensor dx = strided ? at::zeros_like(x) : at::empty_like(x);
  at::Tensor dxs = at_output_pixels(dx, a);
  if (nhwc(x)) {  // (groups == 1)
    // (N, P, C_out) @ (N, C_out, C_in) -> (N, P, C_in)
    const at::Tensor r = at::bmm(dy.permute({0, 2, 3, 1}).contiguous().view({N, P, C}), wb);
    dxs.permute({0, 2, 3, 1}).copy_(r.view({N, OH, OW, K}));
  } else {
    const at::Tensor r = at::bmm(wb.view({N * G, C / G, K}).transpose(1, 2), dy.contiguous().view({N * G, C / G, P}));
    dxs.copy_(r.view({N, G * K, OH, OW}));
  }
  return dx;
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
