// The gated convolution's backward strategies on ATen ops (device-generic), plus the CPU small-map engine's
// passes where the choice takes it. What each strategy does and costs: gated_conv2d_aten.cpp.
#include <ATen/ATen.h>

#include "ops/cpu/gated_conv2d_mix.h"
#include "ops/gated_conv2d_strategies.h"

namespace tlkernels {
namespace gconv {
namespace {

// Batched dot product over pixels: out[b, c] = sum_hw u[b, c] * v[b, c]: BLAS, no elementwise temporary, in
// float32 / float64; a product and a sum in bfloat16 / half (the naive way's rounding; a batched GEMM of 1 x P
// by P x 1 per channel is slow there: benchmarks/test_bench_gated_conv2d.py's bf16 rows with a gate gradient).
at::Tensor pixel_dot(const at::Tensor& u, const at::Tensor& v) {
  if (at::isReducedFloatingType(u.scalar_type())) return (u * v).sum({2, 3});
  const int64_t N = u.size(0), C = u.size(1), P = u.size(2) * u.size(3);
  return at::bmm(u.contiguous().view({N * C, 1, P}), v.contiguous().view({N * C, P, 1})).view({N, C});
}

}  // namespace

// The bias part of dL/dg: sum_hw dy * (bf - bp).
at::Tensor gate_grad_bias(const at::Tensor& dy_sum, const c10::optional<at::Tensor>& bp,
                          const c10::optional<at::Tensor>& bf, const at::Tensor& wp) {
  return dy_sum * (bias_or_zeros(bf, wp) - bias_or_zeros(bp, wp)).unsqueeze(0);
}

// `rt` splits the batch by each image's binary gate; per_filter: the op's gate was (N, C_out) with equal rows, so
// dL/dg stays per filter.
Grads backward_routed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                      const Route& rt, const c10::optional<at::Tensor>& bp,
                      const c10::optional<at::Tensor>& bf, const ConvArgs& a, const GradMask& m,
                      bool per_filter) {
  const at::Tensor &idx0 = rt.idx0, &idx1 = rt.idx1;
  at::Tensor dx = m.input ? at::zeros_like(x) : at::Tensor();
  at::Tensor dW[2] = {at::zeros_like(wp), at::zeros_like(wf)};
  at::Tensor dB[2] = {at::zeros({wp.size(0)}, wp.options()), at::zeros({wp.size(0)}, wp.options())};
  const at::Tensor* W[2] = {&wp, &wf};
  const at::Tensor* idx[2] = {&idx0, &idx1};
  const bool need_w[2] = {m.weight_pre, m.weight_ft}, need_b[2] = {m.bias_pre, m.bias_ft};
  for (int s = 0; s < 2; ++s) {
    const int64_t n = idx[s]->numel();
    if (n == 0 || !(m.input || need_w[s] || need_b[s])) continue;
    const bool all = n == x.size(0);
    at::Tensor xs = all ? x : x.index_select(0, *idx[s]);
    at::Tensor dys = all ? dy : dy.index_select(0, *idx[s]);
    auto r = at::convolution_backward(dys, xs, *W[s], c10::nullopt, a.stride, a.padding, a.dilation, false,
                                      {0, 0}, a.groups, {m.input, need_w[s], false});
    if (m.input) {
      if (all) dx = std::get<0>(r);
      else dx.index_copy_(0, *idx[s], std::get<0>(r));
    }
    if (need_w[s]) dW[s] = std::get<1>(r);
    if (need_b[s]) dB[s] = dys.sum({0, 2, 3});
  }
  at::Tensor dg;
  if (m.gate) {  // one conv with Wf - Wp; both branch outputs are never materialised
    c10::optional<at::Tensor> db;
    if (has(bp) || has(bf)) db = bias_or_zeros(bf, wp) - bias_or_zeros(bp, wp);
    dg = pixel_dot(dy, conv(x, wf - wp, db, a));
    if (!per_filter) dg = dg.sum(1);
  }
  return {dx, dW[0], dW[1], dg, dB[0], dB[1]};
}

// The naive way's backward: one library convolution backward per branch on its share of dy ((1-g) dy, g dy),
// dL/dg from the forward's diff (else from one conv with Wf - Wp).
Grads backward_twoconv(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf,
                       const at::Tensor& diff, const ConvArgs& a, const GradMask& m) {
  const at::Tensor g4 = g.view({g.size(0), g.size(1), 1, 1});
  at::Tensor dx, dwp, dwf, dg;
  const at::Tensor* W[2] = {&wp, &wf};
  const bool need_w[2] = {m.weight_pre, m.weight_ft};
  // A strided 1x1 convolution's backward on channels_last tensors runs in NCHW: oneDNN 3.12's AVX-512 1x1
  // weight-gradient kernel writes out of bounds for some small channel counts in that layout (plain
  // F.conv2d's backward crashes the same way: 8 -> 16 channels, 10x10, stride 2).
  const bool nchw = wp.size(2) == 1 && wp.size(3) == 1 && (a.stride[0] > 1 || a.stride[1] > 1) &&
                    x.suggest_memory_format() == at::MemoryFormat::ChannelsLast && !x.is_contiguous();
  const at::Tensor xs = nchw ? x.contiguous() : x;
  for (int s = 0; s < 2; ++s) {
    if (!m.input && !need_w[s]) continue;
    at::Tensor dys = s == 0 ? dy * (1 - g4) : dy * g4;
    if (nchw) dys = dys.contiguous();
    auto r = at::convolution_backward(dys, xs, *W[s], c10::nullopt, a.stride, a.padding,
                                      a.dilation, false, {0, 0}, a.groups, {m.input, need_w[s], false});
    if (m.input) dx = dx.defined() ? dx.add_(std::get<0>(r)) : std::get<0>(r);
    if (need_w[s]) (s == 0 ? dwp : dwf) = std::get<1>(r);
  }
  if (m.gate) {
    if (diff.numel() == dy.numel()) {
      dg = pixel_dot(dy, diff);
    } else {
      c10::optional<at::Tensor> db;
      if (has(bp) || has(bf)) db = bias_or_zeros(bf, wp) - bias_or_zeros(bp, wp);
      dg = pixel_dot(dy, conv(x, wf - wp, db, a));
    }
  }
  return {dx, dwp, dwf, dg, at::Tensor(), at::Tensor()};
}

Grads backward_grouped(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const ConvArgs& a, const GradMask& m) {
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const bool need_dwb = m.weight_pre || m.weight_ft || m.gate;
  auto xg = x.contiguous().view({1, N * x.size(1), x.size(2), x.size(3)});
  auto dyg = dy.contiguous().view({1, N * C, dy.size(2), dy.size(3)});
  auto r = at::convolution_backward(dyg, xg, blended_weights(wp, wf, g), c10::nullopt, a.stride, a.padding,
                                    a.dilation, false, {0, 0}, N * a.groups, {m.input, need_dwb, false});
  at::Tensor dx, dwp, dwf, dg;
  if (m.input) dx = std::get<0>(r).view(x.sizes()).contiguous(x.suggest_memory_format());
  if (need_dwb) {
    const at::Tensor dwb = std::get<1>(r).view({N, C, K});  // per-image weight gradients
    if (m.weight_ft) dwf = at::einsum("nc,nck->ck", {g, dwb}).view(wf.sizes());
    if (m.weight_pre) dwp = at::einsum("nc,nck->ck", {1 - g, dwb}).view(wp.sizes());
    if (m.gate) dg = at::einsum("nck,ck->nc", {dwb, (wf - wp).view({C, K})});
  }
  return {dx, dwp, dwf, dg, at::Tensor(), at::Tensor()};
}

Grads backward_general(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const c10::optional<at::Tensor>& bp,
                       const c10::optional<at::Tensor>& bf, const at::Tensor& diff, const ConvArgs& a,
                       const GradMask& m, Strategy st, bool weights_by_mix, bool binary) {
  const int64_t N = x.size(0), C = wp.size(0), G = a.groups;
  const bool blended = st == Strategy::Blended, mix = st == Strategy::Mix || st == Strategy::Brgemm;
  const bool wmix = weights_by_mix;
  at::Tensor dx, dwp, dwf, dg;
  if (wmix) mix::weight_grads(dy, x, wp, wf, g, a, m, dwp, dwf, dg);  // dg without its bias part
  if (m.input && mix) {
    dx = mix::input_grad(dy, x, wp, wf, g, a, binary, st == Strategy::Brgemm);
  } else if (m.input && st == Strategy::Bmm) {
    dx = input_grad_bmm(dy, x, wp, wf, g, a);
  } else if (m.input && blended) {
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
  const bool both_w = !wmix && m.weight_pre && m.weight_ft, dx_concat = m.input && !blended && !mix && st != Strategy::Bmm;
  if (dx_concat || both_w) {
    // ((1-g) dy, g dy) interleaved per group: the output gradient of the concatenated conv.
    auto dyv = dy.reshape({N, G, 1, C / G, dy.size(2), dy.size(3)});
    auto gv = g.view({N, G, 1, C / G, 1, 1});
    auto dyc = (dyv * at::cat({1 - gv, gv}, 2)).reshape({N, 2 * C, dy.size(2), dy.size(3)});
    auto r = at::convolution_backward(dyc, x, concat_per_group(wp, wf, G), c10::nullopt, a.stride, a.padding,
                                      a.dilation, false, {0, 0}, G, {dx_concat, both_w, false});
    if (dx_concat) dx = std::get<0>(r);
    if (both_w) {
      auto dwc = std::get<1>(r).view({G, 2, C / G, wp.size(1), wp.size(2), wp.size(3)});
      dwp = dwc.select(1, 0).reshape(wp.sizes());
      dwf = dwc.select(1, 1).reshape(wf.sizes());
    }
  }
  if (!wmix && !both_w && (m.weight_pre || m.weight_ft)) {
    const at::Tensor g4 = g.view({N, C, 1, 1});
    auto r = at::convolution_backward(m.weight_ft ? dy * g4 : dy * (1 - g4), x, m.weight_ft ? wf : wp, c10::nullopt, a.stride,
                                      a.padding, a.dilation, false, {0, 0}, G, {false, true, false});
    (m.weight_ft ? dwf : dwp) = std::get<1>(r);
  }
  if (m.gate && !wmix) {
    if (diff.numel() == dy.numel()) {
      dg = pixel_dot(dy, diff);  // diff saved by the forward already holds the bias difference
    } else {
      c10::optional<at::Tensor> db;
      if (has(bp) || has(bf)) db = bias_or_zeros(bf, wp) - bias_or_zeros(bp, wp);
      dg = pixel_dot(dy, conv(x, wf - wp, db, a));
    }
  }
  return {dx, dwp, dwf, dg, at::Tensor(), at::Tensor()};
}

}  // namespace gconv
}  // namespace tlkernels
