// CPU kernels of the gated convolution.
//
// y = (1-g)*conv(x,Wp) + g*conv(x,Wf) is linear in the weights, so several exact strategies exist;
// we pick per call from the output size (measured on 2 CPU cores with oneDNN, see benchmarks/README.md):
//  forward
//   * routed  - per-image binary gates: split the batch by gate, one weight set per part: exactly one
//               convolution's work.
//   * mix     - float32, groups == 1, < kMixMaxPixels output pixels (x86 with AVX2): our per-image gated
//               GEMM (mixgemm.h) blends each image's 16-filter weight panel in L1 inside the GEMM loop
//               (or, hard gates at 4x4, selects weight rows): one conv's FLOPs, no per-image library
//               calls, hard or soft gates alike.
//   * blended - >= kBlendMinPixels output pixels otherwise: per image blend the weights (C_out*K values,
//               tiny next to the conv) and run one oneDNN conv on that image. One conv's FLOPs; measured
//               as fast as one batched conv from 14x14 up.
//   * concat  - small maps otherwise, and whenever the gate needs a gradient on a small map: one conv
//               over [Wp; Wf] (x read once, one large GEMM) and a fused lerp epilogue. Two convs' FLOPs
//               at full GEMM efficiency. It returns diff = y_f - y_p for free, so the backward needs no
//               extra conv for dL/dg (the mix forward would need that conv in the backward: same total).
//  backward
//   * grouped - >= kGroupedMinPixels: the batch folded into groups with per-image blended weights. One
//               grouped conv backward yields dx and the per-image weight gradients dW_b, from which
//               dWf = sum_b g_b dW_b, dWp = sum_b (1-g_b) dW_b and dg_b = <dW_b, Wf - Wp> follow by
//               small contractions: a training step with gate gradient costs 3 conv-equivalents.
//   * mixed   - mid sizes: per-image dx with blended weights (the mix GEMM where it applies, else one
//               oneDNN call per image), one batched weight gradient on g*dy.
//   * concat  - small maps without the mix GEMM: dx from one conv-transpose over [Wp; Wf] with
//               ((1-g)dy, g dy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/cpu/mixgemm.h"
#include "ops/gated_conv2d.h"

namespace tlkernels {
namespace {

// Below this many output pixels per image per-image conv calls cost more than the FLOPs they save.
constexpr int64_t kBlendMinPixels = 100;
// From this many output pixels up, oneDNN's grouped conv (batch folded into groups) is efficient.
constexpr int64_t kGroupedMinPixels = 784;
// Below this many output pixels per image, per-filter gates in float32 (groups == 1) use our per-image
// gated GEMM (mixgemm.h): one convolution's FLOPs where the library paths need two or per-image calls.
// Measured (N=32, 2 cores): 1.3-1.5x faster than the per-image oneDNN calls at 7x7-14x14, equal at
// 28x28 (faster at 32 channels), 20% slower at 56x56.
constexpr int64_t kMixMaxPixels = 1024;

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                const ConvArgs& a, int64_t groups = -1) {
  return at::conv2d(x, w, b, a.stride, a.padding, a.dilation, groups < 0 ? a.groups : groups);
}

bool has(const c10::optional<at::Tensor>& b) { return b.has_value() && b->defined(); }

at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& b, const at::Tensor& w) {
  return has(b) ? *b : at::zeros({w.size(0)}, w.options());
}

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

#ifdef TLK_HAVE_AVX2_PATH
bool mix_ok(const at::Tensor& x, const ConvArgs& a, int64_t pixels) {
  return a.groups == 1 && x.scalar_type() == at::kFloat && pixels < kMixMaxPixels && avx2::available();
}

// (N, C) gates as float32 [N][round_up(C, 16)], zero padded (the GEMM reads whole 16-column panels).
at::Tensor padded_gates(const at::Tensor& g) {
  const int64_t N = g.size(0), C = g.size(1);
  auto out = at::zeros({N, mixgemm::round_up(C, mixgemm::kNR)}, g.options().dtype(at::kFloat));
  out.narrow(1, 0, C).copy_(g);
  return out;
}

struct Geometry {
  int64_t H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw;
  Geometry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const ConvArgs& a)
      : H(x.size(2)), W(x.size(3)), KH(w.size(2)), KW(w.size(3)), OH(y.size(2)), OW(y.size(3)),
        sh(a.stride[0]), sw(a.stride[1]), ph(a.padding[0]), pw(a.padding[1]), dh(a.dilation[0]),
        dw(a.dilation[1]) {}
};

// Visits the output pixels of kernel tap (kh, kw) in order: f(p, input offset or -1 when in the padding).
template <class F>
inline void for_each_tap_pixel(const Geometry& q, int64_t kh, int64_t kw, int64_t sH, int64_t sW, const F& f) {
  int64_t p = 0;
  for (int64_t oh = 0; oh < q.OH; ++oh) {
    const int64_t ih = oh * q.sh - q.ph + kh * q.dh;
    const bool hv = ih >= 0 && ih < q.H;
    for (int64_t ow = 0; ow < q.OW; ++ow, ++p) {
      const int64_t iw = ow * q.sw - q.pw + kw * q.dw;
      f(p, hv && iw >= 0 && iw < q.W ? ih * sH + iw * sW : -1);
    }
  }
}

// Row k = (ci, kh, kw) of image n's im2col matrix ([K][P], P = OH*OW), written to dst: per output row a
// strided copy of one input row between the zero borders (the valid ow range is computed once per row).
inline void im2col_row(const Geometry& q, const float* xn, int64_t xC, int64_t xH, int64_t xW, int64_t k,
                       float* dst) {
  const int64_t taps = q.KH * q.KW, kh = (k % taps) / q.KW, kw = k % q.KW;
  const float* xc = xn + (k / taps) * xC;
  const int64_t off = kw * q.dw - q.pw;  // iw = ow * sw + off
  const int64_t lo = std::min(q.OW, off >= 0 ? int64_t(0) : (-off + q.sw - 1) / q.sw);
  const int64_t hi = std::max(lo, std::min(q.OW, q.W - 1 - off < 0 ? int64_t(0) : (q.W - 1 - off) / q.sw + 1));
  const int64_t step = q.sw * xW;
  for (int64_t oh = 0; oh < q.OH; ++oh, dst += q.OW) {
    const int64_t ih = oh * q.sh - q.ph + kh * q.dh;
    if (ih < 0 || ih >= q.H) {
      std::fill(dst, dst + q.OW, 0.f);
      continue;
    }
    std::fill(dst, dst + lo, 0.f);
    const float* src = xc + ih * xH + (lo * q.sw + off) * xW;
    if (step == 1) {
      for (int64_t i = 0, e = hi - lo; i < e; ++i) dst[lo + i] = src[i];  // rows of 4-28: a call to memmove cost more
    } else {
      for (int64_t ow = lo; ow < hi; ++ow, src += step) dst[ow] = *src;
    }
    std::fill(dst + hi, dst + q.OW, 0.f);
  }
}

// Weight (C, ...) as [ceil(C/16)][K][16]: the forward's B panels, zero padded past C. Each task reads
// 16 rows in step (16 cache lines, each used for 16 consecutive k) and writes its panel contiguously;
// torch's transpose + contiguous took 5 ms for a 512 x 4608 weight, this well under 1 ms.
at::Tensor weight_panels(const at::Tensor& w) {
  const int64_t C = w.size(0), K = w.numel() / C, Cp = mixgemm::round_up(C, mixgemm::kNR);
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({Cp / 16, K, 16}, w.options());
  const float* src = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, Cp / 16, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min<int64_t>(16, C - 16 * j);
      float* d = dst + j * K * 16;
      const float* s0 = src + 16 * j * K;
      for (int64_t k = 0; k < K; ++k, d += 16) {
        int64_t l = 0;
        for (; l < rows; ++l) d[l] = s0[l * K + k];
        for (; l < 16; ++l) d[l] = 0.f;
      }
    }
  });
  return out;
}

void forward_mix(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                 const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                 at::Tensor& out, bool binary) {
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const Geometry q(x, wp, out, a);
  const int64_t P = q.OH * q.OW;
  const at::Tensor G = padded_gates(g);
  const bool any_bias = has(bp) || has(bf);
  at::Tensor b0, b1;
  if (any_bias) {
    b0 = bias_or_zeros(bp, wp).contiguous();
    b1 = bias_or_zeros(bf, wp).contiguous();
  }
  const float* X = x.data_ptr<float>();
  const int64_t xN = x.stride(0), xC = x.stride(1), xH = x.stride(2), xW = x.stride(3);
  float* Y = out.data_ptr<float>();
  const int64_t yN = out.stride(0), yC = out.stride(1), yH = out.stride(2), yW = out.stride(3);
  const float* Gd = G.data_ptr<float>();
  const int64_t Gld = G.size(1);
  // A 1x1 stride-1 unpadded conv on an NCHW image is its own im2col matrix: the GEMM reads x in place
  // (unless an engine wants rows padded past P: lda > P).
  const bool direct = q.KH == 1 && q.KW == 1 && q.sh == 1 && q.sw == 1 && q.ph == 0 && q.pw == 0 &&
                      xW == 1 && xH == q.W && xC >= P;
  auto pack = [&](int64_t n, int64_t k0, int64_t kb, float* buf, int64_t& lda) -> const float* {
    const float* xn = X + n * xN;
    if (direct && lda == P) {
      lda = xC;
      return xn + k0 * xC;
    }
    for (int64_t kk = 0; kk < kb; ++kk) im2col_row(q, xn, xC, xH, xW, k0 + kk, buf + kk * lda);
    return buf;
  };
  auto bias_of = [&](const float* gn, int64_t c) {
    return any_bias ? (1.f - gn[c]) * b0.data_ptr<float>()[c] + gn[c] * b1.data_ptr<float>()[c] : 0.f;
  };
  // Hard gates on 4x4 maps: row selection instead of a weight blend (see run_hard_rows). Only where one
  // 16-pixel tile holds the whole map: then an image's kc x 16 block of A sits in L1. Measured at 14x14
  // (13 tiles, A streamed from L2 per tile) the blend engine was 10-15% faster; 7x7 would waste 30%.
  if (binary && (P == 15 || P == 16)) {
    const at::Tensor wpc = wp.contiguous(), wfc = wf.contiguous();
    mixgemm::run_hard_rows(N, P, K, C, wpc.data_ptr<float>(), wfc.data_ptr<float>(), Gd, Gld, pack,
                           [&](int64_t n, const float* Cb, int64_t ldc) {
                             const float* gn = Gd + n * Gld;
                             for (int64_t c = 0; c < C; ++c) {
                               const float bias = bias_of(gn, c);
                               const float* src = Cb + c * ldc;
                               float* yc = Y + n * yN + c * yC;
                               for (int64_t oh = 0; oh < q.OH; ++oh, src += q.OW)
                                 for (int64_t ow = 0; ow < q.OW; ++ow) yc[oh * yH + ow * yW] = src[ow] + bias;
                             }
                           });
    return;
  }
  const at::Tensor Wp = weight_panels(wp), Wf = weight_panels(wf);
  const mixgemm::BSource src{Wp.data_ptr<float>(), Wf.data_ptr<float>(), K * mixgemm::kNR, mixgemm::kNR};
  auto consume = [&](int64_t n, const float* Cb) {
    const int64_t Mp = G.size(1);
    const float* gn = Gd + n * Gld;
    for (int64_t c = 0; c < C; ++c) {
      const float bias = bias_of(gn, c);
      float* yc = Y + n * yN + c * yC;
      int64_t p = 0;
      for (int64_t oh = 0; oh < q.OH; ++oh)
        for (int64_t ow = 0; ow < q.OW; ++ow, ++p) yc[oh * yH + ow * yW] = Cb[p * Mp + c] + bias;
    }
  };
  mixgemm::run(N, P, K, C, src, Gd, Gld, true, pack, consume);
}

// dx of the gated convolution: dx_n = conv_transpose(dy_n, (1-g_n) Wp + g_n Wf), one GEMM per image
// (rows: pixels, contraction: output channels, columns: the K = C_in*kH*kW taps), then col2im.
at::Tensor input_grad_mix(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                          const at::Tensor& g, const ConvArgs& a) {
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const Geometry q(x, wp, dy, a);
  const int64_t P = q.OH * q.OW, taps = q.KH * q.KW;
  const at::Tensor G = padded_gates(g), wpc = wp.contiguous(), wfc = wf.contiguous();
  const mixgemm::BSource src{wpc.data_ptr<float>(), wfc.data_ptr<float>(), mixgemm::kNR, K};
  at::Tensor dx = at::zeros(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
  const float* D = dy.data_ptr<float>();
  const int64_t dN = dy.stride(0), dC = dy.stride(1), dH = dy.stride(2), dW = dy.stride(3);
  float* X = dx.data_ptr<float>();
  const int64_t xN = dx.stride(0), xC = dx.stride(1), xH = dx.stride(2), xW = dx.stride(3);
  const bool direct = dW == 1 && dH == q.OW && dC >= P;  // NCHW dy is A as it is
  auto pack = [&](int64_t n, int64_t k0, int64_t kb, float* buf, int64_t& lda) -> const float* {
    const float* dn = D + n * dN;
    if (direct && lda == P) {
      lda = dC;
      return dn + k0 * dC;
    }
    for (int64_t kk = 0; kk < kb; ++kk) {
      const float* dc = dn + (k0 + kk) * dC;
      float* d = buf + kk * lda;
      for (int64_t oh = 0; oh < q.OH; ++oh)
        for (int64_t ow = 0; ow < q.OW; ++ow) *d++ = dc[oh * dH + ow * dW];
    }
    return buf;
  };
  auto consume = [&](int64_t n, const float* Cb) {
    const int64_t Kp = mixgemm::round_up(K, mixgemm::kNR);
    float* xn = X + n * xN;
    for (int64_t k = 0; k < K; ++k) {
      float* xc = xn + (k / taps) * xC;
      for_each_tap_pixel(q, (k % taps) / q.KW, k % q.KW, xH, xW, [&](int64_t p, int64_t off) {
        if (off >= 0) xc[off] += Cb[p * Kp + k];
      });
    }
  };
  mixgemm::run(N, P, C, K, src, G.data_ptr<float>(), G.size(1), false, pack, consume);
  return dx;
}

// dWp, dWf (as asked) and the weight part of dL/dg in one pass: mixgemm::run_wgrad.
void weight_grads_mix(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                      const at::Tensor& g, const ConvArgs& a, bool need_wp, bool need_wf, at::Tensor& dwp,
                      at::Tensor& dwf, at::Tensor& dg) {
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const Geometry q(x, wp, dy, a);
  const int64_t P = q.OH * q.OW;
  const at::Tensor G = padded_gates(g), dW = (wf - wp).contiguous();
  const at::Tensor dyc = dy.contiguous();  // [n][c][p] rows (dy arrives channels_last for such inputs)
  if (need_wp) dwp = at::zeros_like(wp, at::MemoryFormat::Contiguous);
  if (need_wf) dwf = at::zeros_like(wf, at::MemoryFormat::Contiguous);
  dg = at::zeros({N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* D = dyc.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const int64_t xN = x.stride(0), xC = x.stride(1), xH = x.stride(2), xW = x.stride(3);
  const bool direct = q.KH == 1 && q.KW == 1 && q.sh == 1 && q.sw == 1 && q.ph == 0 && q.pw == 0 &&
                      xW == 1 && xH == q.W && xC >= P;
  mixgemm::run_wgrad(
      N, P, C, K, G.data_ptr<float>(), G.size(1), dW.data_ptr<float>(), need_wf ? dwf.data_ptr<float>() : nullptr,
      need_wp ? dwp.data_ptr<float>() : nullptr, dg.data_ptr<float>(),
      [&](int64_t n, int64_t c) { return D + (n * C + c) * P; },
      [&](int64_t n, int64_t k, float* buf) -> const float* {
        const float* xn = X + n * xN;
        if (direct) return xn + k * xC;
        im2col_row(q, xn, xC, xH, xW, k, buf);
        return buf;
      });
}
#else
bool mix_ok(const at::Tensor&, const ConvArgs&, int64_t) { return false; }
void weight_grads_mix(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const ConvArgs&, bool, bool, at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "gated_conv2d: internal error: AVX2 path unavailable");
}
void forward_mix(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const ConvArgs&, at::Tensor&,
                 bool) {
  TORCH_CHECK(false, "gated_conv2d: internal error: AVX2 path unavailable");
}
at::Tensor input_grad_mix(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const ConvArgs&) {
  TORCH_CHECK(false, "gated_conv2d: internal error: AVX2 path unavailable");
}
#endif

std::tuple<at::Tensor, at::Tensor> gated_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft, const at::Tensor& gate,
    const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool hard, bool save_diff) {
  check_gated_conv2d_args(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                          groups);
  const ConvArgs a{stride, padding, dilation, groups};
  auto sizes = gated_conv2d_output_size(input, weight_pre, stride, padding, dilation);
  at::Tensor out = at::empty(sizes, input.options().memory_format(input.suggest_memory_format()));
  at::Tensor diff = at::empty({0}, input.options());
  if (input.size(0) == 0) return {out, diff};
  const bool binary = gate_is_binary(gate, hard);
  if (gate.dim() == 1 && binary) {
    forward_routed(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, a, out);
  } else {
    const at::Tensor g = effective_gate(gate, weight_pre.size(0), hard);
    // save_diff asks for y_f - y_p: the concat path has it for free (see the top of this file).
    if (!save_diff && mix_ok(input, a, sizes[2] * sizes[3]))
      forward_mix(input.contiguous(input.suggest_memory_format()), weight_pre, weight_ft, g, bias_pre, bias_ft, a, out,
                  binary);
    else if (sizes[2] * sizes[3] >= kBlendMinPixels)
      forward_blended(input, weight_pre, weight_ft, g, bias_pre, bias_ft, a, out);
    else
      forward_concat(input, weight_pre, weight_ft, g, bias_pre, bias_ft, a, out, save_diff ? &diff : nullptr);
  }
  if (save_diff && diff.numel() == 0) {  // the contract holds on every path; the front end asks only where free
    c10::optional<at::Tensor> db;
    if (has(bias_pre) || has(bias_ft)) db = bias_or_zeros(bias_ft, weight_pre) - bias_or_zeros(bias_pre, weight_pre);
    diff = conv(input, weight_ft - weight_pre, db, a).contiguous(input.suggest_memory_format());
  }
  return {out, diff};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Batched dot product over pixels: out[b, c] = sum_hw u[b, c] * v[b, c] (BLAS, no elementwise temporary).
at::Tensor pixel_dot(const at::Tensor& u, const at::Tensor& v) {
  const int64_t N = u.size(0), C = u.size(1), P = u.size(2) * u.size(3);
  return at::bmm(u.contiguous().view({N * C, 1, P}), v.contiguous().view({N * C, P, 1})).view({N, C});
}

// The bias part of dL/dg: sum_hw dy * (bf - bp).
at::Tensor gate_grad_bias(const at::Tensor& dy_sum, const c10::optional<at::Tensor>& bp,
                          const c10::optional<at::Tensor>& bf, const at::Tensor& wp) {
  return dy_sum * (bias_or_zeros(bf, wp) - bias_or_zeros(bp, wp)).unsqueeze(0);
}

Grads backward_routed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                      const at::Tensor& gate, const c10::optional<at::Tensor>& bp,
                      const c10::optional<at::Tensor>& bf, const ConvArgs& a, const std::array<bool, 6>& m) {
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
  at::Tensor dg;
  if (m[3]) {  // one conv with Wf - Wp; both branch outputs are never materialised
    c10::optional<at::Tensor> db;
    if (has(bp) || has(bf)) db = bias_or_zeros(bf, wp) - bias_or_zeros(bp, wp);
    dg = pixel_dot(dy, conv(x, wf - wp, db, a)).sum(1);
  }
  return {dx, dW[0], dW[1], dg, dB[0], dB[1]};
}

Grads backward_grouped(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const ConvArgs& a, const std::array<bool, 6>& m) {
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const bool need_dwb = m[1] || m[2] || m[3];
  auto xg = x.contiguous().view({1, N * x.size(1), x.size(2), x.size(3)});
  auto dyg = dy.contiguous().view({1, N * C, dy.size(2), dy.size(3)});
  auto r = at::convolution_backward(dyg, xg, blended_weights(wp, wf, g), c10::nullopt, a.stride, a.padding,
                                    a.dilation, false, {0, 0}, N * a.groups, {m[0], need_dwb, false});
  at::Tensor dx, dwp, dwf, dg;
  if (m[0]) dx = std::get<0>(r).view(x.sizes()).contiguous(x.suggest_memory_format());
  if (need_dwb) {
    const at::Tensor dwb = std::get<1>(r).view({N, C, K});  // per-image weight gradients
    if (m[2]) dwf = at::einsum("nc,nck->ck", {g, dwb}).view(wf.sizes());
    if (m[1]) dwp = at::einsum("nc,nck->ck", {1 - g, dwb}).view(wp.sizes());
    if (m[3]) dg = at::einsum("nck,ck->nc", {dwb, (wf - wp).view({C, K})});
  }
  return {dx, dwp, dwf, dg, at::Tensor(), at::Tensor()};
}

Grads backward_general(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                       const at::Tensor& g, const c10::optional<at::Tensor>& bp,
                       const c10::optional<at::Tensor>& bf, const at::Tensor& diff, const ConvArgs& a,
                       const std::array<bool, 6>& m, bool blended, bool mix, bool wmix) {
  const int64_t N = x.size(0), C = wp.size(0), G = a.groups;
  at::Tensor dx, dwp, dwf, dg;
  if (wmix) weight_grads_mix(dy, x, wp, wf, g, a, m[1], m[2], dwp, dwf, dg);  // dg without its bias part
  if (m[0] && mix) {
    dx = input_grad_mix(dy, x, wp, wf, g, a);
  } else if (m[0] && blended) {
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
  const bool both_w = !wmix && m[1] && m[2], dx_concat = m[0] && !blended && !mix;
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
  if (!wmix && !both_w && (m[1] || m[2])) {
    const at::Tensor g4 = g.view({N, C, 1, 1});
    auto r = at::convolution_backward(m[2] ? dy * g4 : dy * (1 - g4), x, m[2] ? wf : wp, c10::nullopt, a.stride,
                                      a.padding, a.dilation, false, {0, 0}, G, {false, true, false});
    (m[2] ? dwf : dwp) = std::get<1>(r);
  }
  if (m[3] && !wmix) {
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

Grads gated_conv2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight_pre, const at::Tensor& weight_ft, const at::Tensor& gate,
                                const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft,
                                const at::Tensor& diff, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, bool hard, c10::List<bool> output_mask) {
  check_gated_conv2d_args(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                          groups);
  TORCH_CHECK(output_mask.size() == 6, "gated_conv2d_backward: output_mask must have 6 values, got ",
              output_mask.size());
  std::array<bool, 6> m;
  for (int i = 0; i < 6; ++i) m[i] = output_mask.get(i);
  const ConvArgs a{stride, padding, dilation, groups};
  const at::Tensor& x = input;
  const at::Tensor& dy = grad_output;
  const int64_t N = x.size(0), C = weight_pre.size(0);
  Grads r;
  const bool binary = N == 0 || gate_is_binary(gate, hard);
  at::Tensor g;
  if (N == 0) {
    r = {at::zeros_like(x), at::zeros_like(weight_pre), at::zeros_like(weight_ft), at::zeros_like(gate),
         at::zeros({C}, x.options()), at::zeros({C}, x.options())};
  } else if (gate.dim() == 1 && binary) {
    r = backward_routed(dy, x, weight_pre, weight_ft, gate, bias_pre, bias_ft, a, m);
  } else {
    g = effective_gate(gate, C, hard);
    const int64_t P = dy.size(2) * dy.size(3);
    // With a gate gradient and no saved y_f - y_p, the mix engine's weight pass gives dWf, dWp and dL/dg
    // together (one weight-gradient's FLOPs instead of a weight gradient plus a conv with Wf - Wp).
    const bool wmix = m[3] && P < kGroupedMinPixels && mix_ok(x, a, P) && diff.numel() != dy.numel();
    if (P >= kGroupedMinPixels) {
      r = backward_grouped(dy, x, weight_pre, weight_ft, g, a, m);
    } else {
      r = backward_general(dy, x, weight_pre, weight_ft, g, bias_pre, bias_ft, diff, a, m, P >= kBlendMinPixels,
                           mix_ok(x, a, P), wmix);
    }
    const bool bias_in_dg = m[3] && (has(bias_pre) || has(bias_ft)) && (P >= kGroupedMinPixels || wmix);
    if (m[4] || m[5] || bias_in_dg) {
      const at::Tensor s = dy.sum({2, 3});
      if (m[4]) std::get<4>(r) = (s * (1 - g)).sum(0);
      if (m[5]) std::get<5>(r) = (s * g).sum(0);
      if (bias_in_dg) std::get<3>(r) = std::get<3>(r) + gate_grad_bias(s, bias_pre, bias_ft, weight_pre);
    }
    if (m[3] && gate.dim() == 1) std::get<3>(r) = std::get<3>(r).sum(1);
  }
  // Masked-out gradients come back as empty tensors (the schema has no optional outputs).
  at::Tensor* t[6] = {&std::get<0>(r), &std::get<1>(r), &std::get<2>(r),
                      &std::get<3>(r), &std::get<4>(r), &std::get<5>(r)};
  for (int i = 0; i < 6; ++i)
    if (!m[i] || !t[i]->defined()) *t[i] = at::empty({0}, x.options());
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) {
  m.impl("gated_conv2d", &gated_conv2d_cpu);
  m.impl("gated_conv2d_backward", &gated_conv2d_backward_cpu);
}

}  // namespace tlkernels
