// CPU kernels of the gated convolution.
//
// The blend y = (1-g)*conv(x,Wp) + g*conv(x,Wf) is linear in the weights, so three exact
// strategies exist; we pick per call (thresholds measured on 2 CPU cores, see benchmarks/README.md):
//  * routed   - per-image binary gates: split the batch by gate and run each part with one weight
//               set. Exactly one convolution's work.
//  * blended  - per image, blend the weights once (C_out*K values, tiny next to the conv at large
//               H*W) and run one conv on that image with oneDNN. One convolution's FLOPs; at >= 14x14
//               this measured as fast as, or faster than, one batched conv.
//  * concat   - small spatial size: one conv over [Wp; Wf] (x read once, a single large GEMM) and a
//               fused lerp epilogue. Two convs' FLOPs but full GEMM efficiency; per-image calls are
//               dominated by overhead at 7x7.
// No strategy keeps per-branch full-size outputs beyond the one conv output of the concat path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/gated_conv2d.h"

namespace tlkernels {
namespace {

// Below this many output pixels per image the per-image calls cost more than the saved FLOPs.
constexpr int64_t kBlendMinPixels = 100;

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                const ConvArgs& a) {
  return at::conv2d(x, w, b, a.stride, a.padding, a.dilation, a.groups);
}

// Effective forward gate, shape (N, C_out), dtype of the input.
at::Tensor effective_gate(const at::Tensor& gate, int64_t C_out, bool binary) {
  at::Tensor g = binary ? gate.ge(0.5).to(gate.scalar_type()) : gate;
  if (g.dim() == 1) g = g.unsqueeze(1).expand({g.size(0), C_out});
  return g.contiguous();
}

bool gate_is_binary(const at::Tensor& gate, bool hard) {
  if (hard) return true;
  if (gate.numel() == 0) return true;
  return at::logical_or(gate.eq(0), gate.eq(1)).all().item<bool>();
}

at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& b, const at::Tensor& w) {
  if (b.has_value() && b->defined()) return *b;
  return at::zeros({w.size(0)}, w.options());
}

bool has(const c10::optional<at::Tensor>& b) { return b.has_value() && b->defined(); }

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

// View (N, 2*C_out, H, W) laid out per group as (N, G, 2, C_out/G, H, W).
at::Tensor split_view(const at::Tensor& y, int64_t groups) {
  return y.view({y.size(0), groups, 2, y.size(1) / (2 * groups), y.size(2), y.size(3)});
}

void routed_parts(const at::Tensor& g1d, at::Tensor& idx0, at::Tensor& idx1) {
  auto sel = g1d.ge(0.5);
  idx1 = at::nonzero(sel).squeeze(1);
  idx0 = at::nonzero(sel.logical_not()).squeeze(1);
}

at::Tensor forward_routed(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                          const at::Tensor& gate, const c10::optional<at::Tensor>& bp,
                          const c10::optional<at::Tensor>& bf, const ConvArgs& a, at::Tensor out) {
  at::Tensor idx0, idx1;
  routed_parts(gate, idx0, idx1);
  if (idx1.numel() == x.size(0)) return out.copy_(conv(x, wf, bf, a));
  if (idx0.numel() == x.size(0)) return out.copy_(conv(x, wp, bp, a));
  out.index_copy_(0, idx0, conv(x.index_select(0, idx0), wp, bp, a));
  out.index_copy_(0, idx1, conv(x.index_select(0, idx1), wf, bf, a));
  return out;
}

at::Tensor forward_blended(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                           const at::Tensor& g, const c10::optional<at::Tensor>& bp,
                           const c10::optional<at::Tensor>& bf, const ConvArgs& a, at::Tensor out) {
  const int64_t N = x.size(0);
  const bool any_bias = has(bp) || has(bf);
  at::Tensor b0, db;
  if (any_bias) {
    b0 = bias_or_zeros(bp, wp);
    db = bias_or_zeros(bf, wp) - b0;
  }
  const at::Tensor dw = wf - wp;
  at::Tensor wb = at::empty_like(wp);
  at::Tensor bb = any_bias ? at::empty_like(b0) : at::Tensor();
  std::vector<int64_t> gshape{wp.size(0), 1, 1, 1};
  for (int64_t b = 0; b < N; ++b) {
    const at::Tensor gb = g[b];
    at::addcmul_out(wb, wp, gb.view(gshape), dw);
    c10::optional<at::Tensor> bias;
    if (any_bias) bias = at::addcmul_out(bb, b0, gb, db);
    out[b].copy_(conv(x.narrow(0, b, 1), wb, bias, a)[0]);
  }
  return out;
}

at::Tensor forward_concat(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                          const at::Tensor& g, const c10::optional<at::Tensor>& bp,
                          const c10::optional<at::Tensor>& bf, const ConvArgs& a, at::Tensor out) {
  const int64_t G = a.groups, C = wp.size(0), N = x.size(0);
  c10::optional<at::Tensor> bias;
  if (has(bp) || has(bf)) bias = concat_per_group(bias_or_zeros(bp, wp), bias_or_zeros(bf, wp), G);
  auto y = split_view(conv(x, concat_per_group(wp, wf, G), bias, a), G);
  auto outv = out.view({N, G, C / G, out.size(2), out.size(3)});
  at::lerp_out(outv, y.select(2, 0), y.select(2, 1), g.view({N, G, C / G, 1, 1}));
  return out;
}

at::Tensor gated_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                            const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                            const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool hard) {
  check_gated_conv2d_args(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                          groups);
  const ConvArgs a{stride, padding, dilation, groups};
  const auto mf = input.suggest_memory_format();
  auto sizes = gated_conv2d_output_size(input, weight_pre, stride, padding, dilation);
  at::Tensor out = at::empty(sizes, input.options().memory_format(mf));
  if (input.size(0) == 0) return out;
  const bool binary = gate_is_binary(gate, hard);
  if (gate.dim() == 1 && binary)
    return forward_routed(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, a, out);
  const at::Tensor g = effective_gate(gate, weight_pre.size(0), binary);
  if (sizes[2] * sizes[3] >= kBlendMinPixels)
    return forward_blended(input, weight_pre, weight_ft, g, bias_pre, bias_ft, a, out);
  return forward_concat(input, weight_pre, weight_ft, g, bias_pre, bias_ft, a, out);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// dL/dg[b, c] = sum_hw dy * (conv(x, Wf - Wp) + bf - bp): one conv with the weight difference and a
// batched dot product (no elementwise temporary), instead of keeping both branch outputs.
at::Tensor gate_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                     const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf,
                     const ConvArgs& a, int64_t gate_dim) {
  c10::optional<at::Tensor> db;
  if (has(bp) || has(bf)) db = bias_or_zeros(bf, wp) - bias_or_zeros(bp, wp);
  const at::Tensor z = conv(x, wf - wp, db, a).contiguous();
  const int64_t N = dy.size(0), C = dy.size(1), P = dy.size(2) * dy.size(3);
  const at::Tensor dyc = dy.contiguous();
  at::Tensor dg = at::bmm(dyc.view({N * C, 1, P}), z.view({N * C, P, 1})).view({N, C});
  return gate_dim == 1 ? dg.sum(1) : dg;
}

Grads backward_routed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                      const at::Tensor& gate, const c10::optional<at::Tensor>& bp,
                      const c10::optional<at::Tensor>& bf, const ConvArgs& a, std::array<bool, 6> m) {
  at::Tensor idx0, idx1;
  routed_parts(gate, idx0, idx1);
  at::Tensor dx = m[0] ? at::zeros_like(x) : at::Tensor();
  at::Tensor dW[2] = {at::zeros_like(wp), at::zeros_like(wf)};
  at::Tensor dB[2] = {at::zeros({wp.size(0)}, wp.options()), at::zeros({wp.size(0)}, wp.options())};
  const at::Tensor* W[2] = {&wp, &wf};
  const at::Tensor* idx[2] = {&idx0, &idx1};
  const bool need_w[2] = {m[1], m[2]}, need_b[2] = {m[4], m[5]};
  for (int s = 0; s < 2; ++s) {
    const int64_t n = idx[s]->numel();
    if (n == 0 || !(m[0] || need_w[s] || need_b[s])) continue;
    const bool all = n == x.size(0);
    at::Tensor xs = all ? x : x.index_select(0, *idx[s]);
    at::Tensor dys = all ? dy : dy.index_select(0, *idx[s]);
    auto r = at::convolution_backward(dys, xs, *W[s], c10::nullopt, a.stride, a.padding, a.dilation, false,
                                      {0, 0}, a.groups, {m[0], need_w[s], false});
    if (m[0]) {
      if (all) dx = std::get<0>(r);
      else dx.index_copy_(0, *idx[s], std::get<0>(r));
    }
    if (need_w[s]) dW[s] = std::get<1>(r);
    if (need_b[s]) dB[s] = dys.sum({0, 2, 3});
  }
  at::Tensor dg = m[3] ? gate_grad(dy, x, wp, wf, bp, bf, a, 1) : at::Tensor();
  return {dx, dW[0], dW[1], dg, dB[0], dB[1]};
}

Grads gated_conv2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight_pre, const at::Tensor& weight_ft, const at::Tensor& gate,
                                const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, bool hard, std::array<bool, 6> m) {
  check_gated_conv2d_args(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                          groups);
  const ConvArgs a{stride, padding, dilation, groups};
  const auto& x = input;
  const auto& wp = weight_pre;
  const auto& wf = weight_ft;
  const int64_t N = x.size(0), C = wp.size(0), G = groups;
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  auto finish = [&](Grads r) {
    // Masked-out gradients come back as empty tensors (the schema has no optional outputs).
    at::Tensor* t[6] = {&std::get<0>(r), &std::get<1>(r), &std::get<2>(r),
                        &std::get<3>(r), &std::get<4>(r), &std::get<5>(r)};
    for (int i = 0; i < 6; ++i)
      if (!m[i] || !t[i]->defined()) *t[i] = empty(x);
    return r;
  };
  if (N == 0) {
    return finish({m[0] ? at::zeros_like(x) : at::Tensor(), m[1] ? at::zeros_like(wp) : at::Tensor(),
                   m[2] ? at::zeros_like(wf) : at::Tensor(), m[3] ? at::zeros_like(gate) : at::Tensor(),
                   m[4] ? at::zeros({C}, wp.options()) : at::Tensor(),
                   m[5] ? at::zeros({C}, wp.options()) : at::Tensor()});
  }
  const bool binary = gate_is_binary(gate, hard);
  if (gate.dim() == 1 && binary) return finish(backward_routed(grad_output, x, wp, wf, gate, bias_pre, bias_ft, a, m));

  const at::Tensor g = effective_gate(gate, C, binary);
  const at::Tensor& dy = grad_output;
  const bool large = dy.size(2) * dy.size(3) >= kBlendMinPixels;
  at::Tensor dx, dwp, dwf, dg, dbp, dbf;
  const at::Tensor g4 = g.view({N, C, 1, 1});
  // (1-g)*dy and g*dy interleaved per group: the gradient of the concatenated conv.
  auto dy_cat = [&]() {
    auto dyv = dy.reshape({N, G, 1, C / G, dy.size(2), dy.size(3)});
    auto gv = g.view({N, G, 1, C / G, 1, 1});
    return (dyv * at::cat({1 - gv, gv}, 2)).reshape({N, 2 * C, dy.size(2), dy.size(3)});
  };
  at::Tensor dyc;
  if (m[0] && large) {
    dx = at::empty_like(x);
    const at::Tensor dw = wf - wp;
    at::Tensor wb = at::empty_like(wp);
    for (int64_t b = 0; b < N; ++b) {
      at::addcmul_out(wb, wp, g[b].view({C, 1, 1, 1}), dw);
      auto r = at::convolution_backward(dy.narrow(0, b, 1), x.narrow(0, b, 1), wb, c10::nullopt, a.stride,
                                        a.padding, a.dilation, false, {0, 0}, G, {true, false, false});
      dx[b].copy_(std::get<0>(r)[0]);
    }
  }
  const bool both_w = m[1] && m[2];
  if ((m[0] && !large) || both_w) {
    dyc = dy_cat();
    auto r = at::convolution_backward(dyc, x, concat_per_group(wp, wf, G), c10::nullopt, a.stride, a.padding,
                                      a.dilation, false, {0, 0}, G, {m[0] && !large, both_w, false});
    if (m[0] && !large) dx = std::get<0>(r);
    if (both_w) {
      auto dwc = std::get<1>(r).view({G, 2, C / G, wp.size(1), wp.size(2), wp.size(3)});
      dwp = dwc.select(1, 0).reshape(wp.sizes());
      dwf = dwc.select(1, 1).reshape(wf.sizes());
    }
  }
  if (!both_w && (m[1] || m[2])) {
    const at::Tensor scaled = m[2] ? dy * g4 : dy * (1 - g4);
    auto r = at::convolution_backward(scaled, x, m[2] ? wf : wp, c10::nullopt, a.stride, a.padding, a.dilation,
                                      false, {0, 0}, G, {false, true, false});
    (m[2] ? dwf : dwp) = std::get<1>(r);
  }
  if (m[3]) dg = gate_grad(dy, x, wp, wf, bias_pre, bias_ft, a, gate.dim());
  if (m[4] || m[5]) {
    const at::Tensor s = dy.sum({2, 3});
    if (m[4]) dbp = (s * (1 - g)).sum(0);
    if (m[5]) dbf = (s * g).sum(0);
  }
  return finish({dx, dwp, dwf, dg, dbp, dbf});
}

Grads backward_entry(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight_pre,
                     const at::Tensor& weight_ft, const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                     const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, bool hard, c10::List<bool> output_mask) {
  TORCH_CHECK(output_mask.size() == 6, "gated_conv2d_backward: output_mask must have 6 values, got ",
              output_mask.size());
  std::array<bool, 6> m;
  for (int i = 0; i < 6; ++i) m[i] = output_mask.get(i);
  return gated_conv2d_backward_cpu(grad_output, input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride,
                                   padding, dilation, groups, hard, m);
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) {
  m.impl("gated_conv2d", &gated_conv2d_cpu);
  m.impl("gated_conv2d_backward", &backward_entry);
}

}  // namespace tlkernels
