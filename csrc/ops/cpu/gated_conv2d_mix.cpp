// The CPU small-map engine of the gated convolution (see gated_conv2d_mix.h): im2col / weight packing around
// the micro-kernels of mixgemm.h.
#include "ops/cpu/gated_conv2d_mix.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "ops/cpu/mixgemm.h"

namespace tlkernels {
namespace gconv {
namespace mix {

#ifdef TLK_HAVE_AVX2_PATH
bool applicable(const at::Tensor& x, const ConvArgs& a, int64_t pixels) {
  const bool dtype_ok = x.scalar_type() == at::kFloat || (x.scalar_type() == at::kBFloat16 && avx512::bf16_available());
  return a.groups == 1 && dtype_ok && pixels < kMaxPixels && avx2::available();
}

bool brgemm_applicable(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || mixgemm::brgemm_bf16_available();
}

namespace {

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

// dst[i] = src[i], i < n, as float32 (bfloat16: the bits shifted into place, which compilers vectorise).
inline void widen(const float* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];  // (rows of 4-28: a call to memmove cost more)
}
inline void widen(const c10::BFloat16* src, int64_t n, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// Row k = (ci, kh, kw) of image n's im2col matrix ([K][P], P = OH*OW), written to dst: per output row a
// strided copy of one input row between the zero borders (the valid ow range is computed once per row).
template <class T>
inline void im2col_row(const Geometry& q, const T* xn, int64_t xC, int64_t xH, int64_t xW, int64_t k,
                       float* dst) {
  const int64_t taps = q.KH * q.KW, kh = (k % taps) / q.KW, kw = k % q.KW;
  const T* xc = xn + (k / taps) * xC;
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
    const T* src = xc + ih * xH + (lo * q.sw + off) * xW;
    if (step == 1) {
      widen(src, hi - lo, dst + lo);
    } else {
      for (int64_t ow = lo; ow < hi; ++ow, src += step) dst[ow] = static_cast<float>(*src);
    }
    std::fill(dst + hi, dst + q.OW, 0.f);
  }
}

// The forward's contraction by kernel tap (rows k = tap * C_in + ci, weight_panels(w, true)), each tap with the
// rectangle of output pixels whose input it reads inside the image: the taps that fall on the zero padding
// for some pixels then skip them (at 7x7 with a 3x3 kernel and padding 1, 19 x 19 of 21 x 21 tap-pixel pairs
// remain: the products a convolution on the padding would add as zeros).
std::vector<mixgemm::Segment> tap_segments(const Geometry& q, int64_t cin) {
  auto range = [](int64_t out, int64_t in, int64_t s, int64_t off) {  // o with 0 <= o * s + off < in
    int64_t lo = off >= 0 ? 0 : (-off + s - 1) / s, hi = in - 1 - off < 0 ? 0 : (in - 1 - off) / s + 1;
    lo = std::min(lo, out);
    return std::make_pair(lo, std::max(lo, std::min(hi, out)));
  };
  std::vector<mixgemm::Segment> segs;
  for (int64_t kh = 0; kh < q.KH; ++kh)
    for (int64_t kw = 0; kw < q.KW; ++kw) {
      const auto h = range(q.OH, q.H, q.sh, kh * q.dh - q.ph), w = range(q.OW, q.W, q.sw, kw * q.dw - q.pw);
      const int64_t k0 = (kh * q.KW + kw) * cin;
      if (h.second > h.first && w.second > w.first)
        segs.push_back({k0, k0 + cin, h.first, h.second, w.first, w.second, q.OW});
    }
  return segs;
}

// tap_rows and retile (retile_bf16) in one step for a channels_last image, whose k are adjacent per pixel:
// each tile of tl is the transpose of its pixels' rows of 32-bit units (float32 channels, or bfloat16 pairs of
// channels: already micro512_bf16's pairs), 8 x 8 blocks in registers, written as [tile][units][mr] (the
// micro-kernels' A, with 2 units of room past the end); no float32 rows. kb even for bfloat16.
template <class T>
__attribute__((target("avx2,fma"))) void tiles_nhwc(const Geometry& q, const T* xn, int64_t xH, int64_t xW,
                                                    const mixgemm::Segment& sg, int64_t kh, int64_t kw, int64_t ci0,
                                                    int64_t kb, const mixgemm::Tiles& tl, void* dst) {
  const int64_t w = sg.w1 - sg.w0, units = kb * sizeof(T) / 4, mr = tl.mr;
  float* out = static_cast<float*>(dst);  // (bfloat16 pairs moved as floats: bits only)
  for (int64_t t = 0; t < tl.count; ++t, out += units * mr) {
    const int64_t rows = tl.rows(t), start = tl.start(t);
    const float* px[8] = {};  // the tile's pixels at channel ci0 (none past its rows)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = start + r, oh = sg.h0 + p / w, ow = sg.w0 + p % w;
      px[r] = reinterpret_cast<const float*>(xn + (oh * q.sh - q.ph + kh * q.dh) * xH +
                                             (ow * q.sw - q.pw + kw * q.dw) * xW + ci0);
    }
    int64_t u = 0;
    for (; u + 8 <= units; u += 8) {  // (each store's 8 - mr extra units are overwritten by the next row's)
      __m256 v[8];
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) v[r] = px[r] ? _mm256_loadu_ps(px[r] + u) : _mm256_setzero_ps();
      mixgemm::transpose8(v);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (u + i) * mr, v[i]);
    }
    for (; u < units; ++u)
      for (int64_t r = 0; r < mr; ++r) {
        uint32_t unit = 0;
        if (r < rows) std::memcpy(&unit, px[r] + u, 4);
        std::memcpy(out + u * mr + r, &unit, 4);
      }
  }
}

// Rows [ci0, ci0 + kb) of segment sg's A (tap (kh, kw), its rectangle of output pixels, all inside the image),
// as [kb][sg.count()].
template <class T>
void tap_rows(const Geometry& q, const T* xn, int64_t xC, int64_t xH, int64_t xW, const mixgemm::Segment& sg,
              int64_t kh, int64_t kw, int64_t ci0, int64_t kb, float* dst) {
  const int64_t w = sg.w1 - sg.w0;
  for (int64_t kk = 0; kk < kb; ++kk) {
    const T* xc = xn + (ci0 + kk) * xC;
    for (int64_t oh = sg.h0; oh < sg.h1; ++oh, dst += w) {
      const T* src = xc + (oh * q.sh - q.ph + kh * q.dh) * xH + (sg.w0 * q.sw - q.pw + kw * q.dw) * xW;
      const int64_t step = q.sw * xW;
      if (step == 1) {
        widen(src, w, dst);
        continue;
      }
      for (int64_t i = 0; i < w; ++i) dst[i] = static_cast<float>(src[i * step]);
    }
  }
}

// The panel row of the weight's own contraction index kw = ci * taps + tap: kw itself, or tap-major
// (tap * cin + ci).
inline int64_t panel_k(int64_t kw, bool tap_major, int64_t cin, int64_t taps) {
  return tap_major ? (kw % taps) * cin + kw / taps : kw;
}

// Weight (C, ...) as [ceil(C/16)][K][16]: the forward's B panels, zero padded past C. Each task reads
// 16 rows in step (forward, 8 x 8 blocks transposed in registers; bfloat16 rows widened to float32 first) and
// writes its panel; faster than torch's transpose + contiguous, whose strided reads miss the cache.
// tap_major: the contraction ordered (kh, kw, ci) instead of the weight's (ci, kh, kw) (see tap_segments).
template <class T = float>
at::Tensor weight_panels(const at::Tensor& w, bool tap_major = false) {
  const int64_t C = w.size(0), K = w.numel() / C, Cp = mixgemm::round_up(C, mixgemm::kNR);
  const int64_t taps = w.size(2) * w.size(3), cin = K / taps;
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({Cp / 16, K, 16}, w.options().dtype(at::kFloat));
  const T* src = wc.data_ptr<T>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, Cp / 16, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> wide(std::is_same_v<T, float> ? 0 : 16 * K);  // (bfloat16 rows, widened exactly)
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min<int64_t>(16, C - 16 * j);
      const T* s0 = src + 16 * j * K;
      const float* rows32 = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        rows32 = s0;
      } else {
        for (int64_t l = 0; l < rows; ++l) widen(s0 + l * K, K, wide.data() + l * K);
        rows32 = wide.data();
      }
      mixgemm::panel_from_rows(rows32, K, rows, K, dst + j * K * 16,
                               [&](int64_t kw) { return panel_k(kw, tap_major, cin, taps); });
    }
  });
  return out;
}

// A bfloat16 weight (C, ...) as micro512_bf16's B panels: [ceil(C/16)][ceil(K/2)][16][2], pairs of consecutive
// k per column, zero padded past C and an odd K; tap_major as in weight_panels. The bits are copied.
at::Tensor pair_panels(const at::Tensor& w, bool tap_major) {
  const int64_t C = w.size(0), K = w.numel() / C, K2 = (K + 1) / 2, J = mixgemm::round_up(C, mixgemm::kNR) / 16;
  const int64_t taps = w.size(2) * w.size(3), cin = K / taps;
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({J, K2, 32}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, J, 1, [&](int64_t j0, int64_t j1) {
    // The panel's 16 rows in contraction order, each zero padded to 2 * K2 values: a pair of k is then one 32-bit
    // unit, and the panel is that [16][K2] matrix of units transposed (panel_from_rows moves bits only).
    std::vector<uint16_t> rows16(16 * 2 * K2);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min<int64_t>(16, C - 16 * j);
      std::fill(rows16.begin(), rows16.end(), 0);
      for (int64_t l = 0; l < rows; ++l) {
        const uint16_t* s = src + (16 * j + l) * K;  // (read forward)
        uint16_t* r = rows16.data() + l * 2 * K2;
        if (!tap_major) {
          std::copy(s, s + K, r);
          continue;
        }
        for (int64_t ci = 0; ci < cin; ++ci)  // (panel_k without a division per value)
          for (int64_t t = 0; t < taps; ++t) r[t * cin + ci] = s[ci * taps + t];
      }
      mixgemm::panel_from_rows(reinterpret_cast<const float*>(rows16.data()), K2, 16, K2,
                               reinterpret_cast<float*>(dst + j * K2 * 32), [](int64_t k2) { return k2; });
    }
  });
  return out;
}

// The forward's packed weight panels kept across calls for the weights registered with keep_packed (AdaFilter's
// folded eval weights): packed once per layout kind and reused while the weight's data pointer, shape, strides
// and version counter are unchanged (an in-place change bumps the counter, our ops' included:
// inplace_versions.h), then repacked. Only registered weights: a tensor that code writes without bumping its
// counter (torch.compile's generated kernels reuse and rewrite their buffers) must not be kept. An entry holds its
// weight's TensorImpl weakly (so no other tensor takes that address while it lives); the entries of freed
// weights, panels included, are dropped at the next call or registration.
class PanelCache {
 public:
  void keep(const at::Tensor& w) {
    if (!w.defined() || w.is_inference()) return;  // (an inference tensor has no version counter)
    std::lock_guard<std::mutex> lock(mu_);
    sweep();
    if (find(w.unsafeGetTensorImpl()) != nullptr) return;
    entries_.push_back({w.unsafeGetTensorImpl(),
                        c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(w.getIntrusivePtr()), {}});
  }

  template <class Pack>
  at::Tensor get(const at::Tensor& w, int kind, const Pack& pack) {
    const c10::TensorImpl* impl = w.unsafeGetTensorImpl();
    {
      std::lock_guard<std::mutex> lock(mu_);
      sweep();
      Entry* e = find(impl);
      if (e == nullptr) return pack();
      const uint32_t version = impl->version_counter().current_version();
      for (const Slot& sl : e->slots)
        if (sl.kind == kind && sl.version == version && sl.data == w.data_ptr() && sl.sizes == w.sizes() &&
            sl.strides == w.strides())
          return sl.packed;
    }
    const uint32_t version = impl->version_counter().current_version();
    at::Tensor packed = pack();
    std::lock_guard<std::mutex> lock(mu_);
    if (Entry* e = find(impl)) {
      std::vector<Slot>& slots = e->slots;
      slots.erase(std::remove_if(slots.begin(), slots.end(), [&](const Slot& sl) { return sl.kind == kind; }),
                  slots.end());
      slots.push_back({kind, version, w.data_ptr(), w.sizes().vec(), w.strides().vec(), packed});
    }
    return packed;
  }

 private:
  struct Slot {
    int kind;
    uint32_t version;
    const void* data;
    std::vector<int64_t> sizes, strides;
    at::Tensor packed;
  };
  struct Entry {
    const c10::TensorImpl* impl;
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weak;
    std::vector<Slot> slots;
  };
  Entry* find(const c10::TensorImpl* impl) {
    for (Entry& e : entries_)
      if (e.impl == impl && !e.weak.expired()) return &e;
    return nullptr;
  }
  void sweep() {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.weak.expired(); }),
                   entries_.end());
  }
  std::mutex mu_;
  std::vector<Entry> entries_;
};

PanelCache& panel_cache() {
  static PanelCache* cache = new PanelCache();  // (never destroyed: no order problem at exit)
  return *cache;
}

}  // namespace

namespace {

// T: the element type of x, the weights and out (float, or c10::BFloat16 with the bfloat16 micro-kernel: read
// exactly into the float32 packing, the output rounded once from the float32 sums).
template <class T>
void forward_engine(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
                    const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
                    at::Tensor& out, bool binary, mixgemm::Micro micro) {
  constexpr bool f32 = std::is_same_v<T, float>;
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const Geometry q(x, wp, out, a);
  const int64_t P = q.OH * q.OW;
  const at::Tensor G = padded_gates(g);
  const bool any_bias = has(bp) || has(bf);
  at::Tensor b0, b1;
  if (any_bias) {
    b0 = bias_or_zeros(bp, wp).to(at::kFloat).contiguous();
    b1 = bias_or_zeros(bf, wp).to(at::kFloat).contiguous();
  }
  const T* X = x.data_ptr<T>();
  const int64_t xN = x.stride(0), xC = x.stride(1), xH = x.stride(2), xW = x.stride(3);
  T* Y = out.data_ptr<T>();
  const int64_t yN = out.stride(0), yC = out.stride(1), yH = out.stride(2), yW = out.stride(3);
  const float* Gd = G.data_ptr<float>();
  const int64_t Gld = G.size(1);
  // A 1x1 stride-1 unpadded conv on an NCHW image is its own im2col matrix: the GEMM reads x in place
  // (unless an engine wants rows padded past P: lda > P).
  const bool rows_dense = q.KH == 1 && q.KW == 1 && q.sh == 1 && q.sw == 1 && q.ph == 0 && q.pw == 0 &&
                          xW == 1 && xH == q.W;  // (each input channel's P values are A's row as they are)
  const bool direct = f32 && rows_dense && xC >= P;
  // On the AVX-512 micro-kernels: taps as segments where the padding has products to skip (bfloat16 pairs of k
  // must stay within a tap: C_in even); binary gates take each column from Wp's or Wf's panel as it is.
  const bool wide = !mixgemm::is_brgemm(micro) && avx512::available();
  const int64_t cin = x.size(1);
  const bool hard_rows = binary && (P == 15 || P == 16) && !wide && !mixgemm::is_bf16(micro);  // (see below)
  const bool by_tap = !hard_rows && wide && (q.ph > 0 || q.pw > 0) && q.KH * q.KW <= 64 && (!mixgemm::is_bf16(micro) || cin % 2 == 0);
  const std::vector<mixgemm::Segment> segs = by_tap ? tap_segments(q, cin) : std::vector<mixgemm::Segment>{};
  const mixgemm::Segment* seg_of_tap[64] = {};  // tap -> its segment
  for (const mixgemm::Segment& sg : segs) seg_of_tap[sg.k0 / cin] = &sg;
  auto pack = [&](int64_t n, int64_t k0, int64_t kb, float* buf, int64_t& lda) -> const float* {
    const T* xn = X + n * xN;
    if (by_tap) {
      const int64_t tap = k0 / cin;
      tap_rows(q, xn, xC, xH, xW, *seg_of_tap[tap], tap / q.KW, tap % q.KW, k0 % cin, kb, buf);
      return buf;
    }
    if constexpr (f32) {
      if (direct && lda == P) {
        lda = xC;
        return xn + k0 * xC;
      }
    }
    if (rows_dense) {
      for (int64_t kk = 0; kk < kb; ++kk) widen(xn + (k0 + kk) * xC, P, buf + kk * lda);
      return buf;
    }
    for (int64_t kk = 0; kk < kb; ++kk) im2col_row(q, xn, xC, xH, xW, k0 + kk, buf + kk * lda);
    return buf;
  };
  auto bias_of = [&](const float* gn, int64_t c) {
    return any_bias ? (1.f - gn[c]) * b0.data_ptr<float>()[c] + gn[c] * b1.data_ptr<float>()[c] : 0.f;
  };
  // Hard gates on 4x4 maps with the AVX2 kernels: row selection instead of a weight blend (see run_hard_rows).
  // Only where one 16-pixel tile holds the whole map: then an image's kc x 16 block of A sits in L1. At 14x14
  // (13 tiles, A streamed from L2 per tile) the blend engine is faster, and 7x7 would leave much of a 16-pixel
  // tile empty (benchmarks/test_bench_gated_conv2d.py times the stage shapes). The AVX-512 kernels select
  // columns and skip the padding's taps instead, which is faster at 4x4 (benchmarks/adafilter_layers.py).
  if constexpr (f32) if (hard_rows) {
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
  const bool select = binary && wide;
  // Our bfloat16 micro-kernel reads the pair panels, selected (binary gates) or blended per image (soft ones);
  // every other case the float32 panels (blended per image, or selected as they are).
  at::Tensor Wp, Wf;
  mixgemm::BSource src{nullptr, nullptr, K * mixgemm::kNR, mixgemm::kNR};
  mixgemm::Selected sel{nullptr, nullptr, 0};
  const bool pairs = micro == mixgemm::Micro::Bf16;
  const int kind = (pairs ? 2 : 0) + (by_tap ? 1 : 0);
  auto panels = [&](const at::Tensor& w) {
    return panel_cache().get(w, kind, [&] { return pairs ? pair_panels(w, by_tap) : weight_panels<T>(w, by_tap); });
  };
  Wp = panels(wp);
  Wf = panels(wf);
  if (pairs) {
    sel = {Wp.data_ptr(), Wf.data_ptr(), Wp.stride(0), select};
  } else {
    src = {Wp.data_ptr<float>(), Wf.data_ptr<float>(), K * mixgemm::kNR, mixgemm::kNR};
    sel = {Wp.data_ptr<float>(), Wf.data_ptr<float>(), K * mixgemm::kNR};
  }
  // C_n is [P][Mp]: an NCHW output takes its transpose (8 x 8 register blocks), a channels_last one its rows.
  const bool pixels_dense = yW == 1 && yH == q.OW, channels_dense = yC == 1;
  auto consume = [&](int64_t n, const float* Cb) {
    const int64_t Mp = G.size(1);
    const float* gn = Gd + n * Gld;
    const float* bias = nullptr;
    if (any_bias) {
      float* b = mixgemm::scratch(4, C);
      for (int64_t c = 0; c < C; ++c) b[c] = bias_of(gn, c);
      bias = b;
    }
    T* yn = Y + n * yN;
    if constexpr (!f32) {  // bfloat16: NCHW through a float32 [C][P] transpose, channels_last row by row
      uint16_t* yb = reinterpret_cast<uint16_t*>(yn);
      if (pixels_dense) {
        float* t = mixgemm::scratch(5, C * P);
        mixgemm::transpose_out(Cb, Mp, P, C, bias, t, P);
        for (int64_t c = 0; c < C; ++c) mixgemm::store_bf16(t + c * P, nullptr, P, yb + c * yC);
        return;
      }
      if (channels_dense) {
        int64_t p = 0;
        for (int64_t oh = 0; oh < q.OH; ++oh)
          for (int64_t ow = 0; ow < q.OW; ++ow, ++p) mixgemm::store_bf16(Cb + p * Mp, bias, C, yb + oh * yH + ow * yW);
        return;
      }
    }
    if constexpr (f32) if (pixels_dense) {
      mixgemm::transpose_out(Cb, Mp, P, C, bias, yn, yC);
      return;
    }
    int64_t p = 0;
    for (int64_t oh = 0; oh < q.OH; ++oh)
      for (int64_t ow = 0; ow < q.OW; ++ow, ++p) {
        const float* src = Cb + p * Mp;
        T* yp = yn + oh * yH + ow * yW;
        if (channels_dense) {
          for (int64_t c = 0; c < C; ++c) yp[c] = src[c] + (bias ? bias[c] : 0.f);
        } else {
          for (int64_t c = 0; c < C; ++c) yp[c * yC] = src[c] + (bias ? bias[c] : 0.f);
        }
      }
  };
  // A channels_last input is packed straight into our AVX-512 micro-kernels' tiles (tiles_nhwc).
  mixgemm::PackTiles tiles;
  if (by_tap && xC == 1 && (f32 || micro == mixgemm::Micro::Bf16))
    tiles = [&](int64_t n, int64_t k0, int64_t kb, const mixgemm::Tiles& tl, void* dst) {
      if (!f32 && kb % 2) return false;
      const int64_t tap = k0 / cin;
      tiles_nhwc(q, X + n * xN, xH, xW, *seg_of_tap[tap], tap / q.KW, tap % q.KW, k0 % cin, kb, tl, dst);
      return true;
    };
  mixgemm::run(N, P, K, C, src, Gd, Gld, true, pack, consume, micro, select || pairs ? &sel : nullptr,
               by_tap ? &segs : nullptr, nullptr, tiles ? &tiles : nullptr);
}

}  // namespace

void keep_packed(const at::Tensor& w) { panel_cache().keep(w); }

void forward(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
             const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
             at::Tensor& out, bool binary, bool brgemm) {
  if (x.scalar_type() != at::kBFloat16) {
    forward_engine<float>(x, wp, wf, g, bp, bf, a, out, binary,
                          brgemm ? mixgemm::Micro::Brgemm : mixgemm::Micro::Avx2);
    return;
  }
  // bfloat16: the float32 engine's packing and epilogue around the bfloat16 micro-kernel (operands exact in
  // bfloat16 but for soft gates' blended weights, rounded once; float32 sums; the output rounded once).
  forward_engine<c10::BFloat16>(x, wp, wf, g, bp, bf, a, out, binary,
                                brgemm ? mixgemm::Micro::Bf16Brgemm : mixgemm::Micro::Bf16);
}

// dx of the gated convolution: dx_n = conv_transpose(dy_n, (1-g_n) Wp + g_n Wf), one GEMM per image
// (rows: pixels, contraction: output channels, columns: the K = C_in*kH*kW taps), then col2im.
// T: dy's element type (bfloat16: the bfloat16 micro-kernel, dx summed in float32 and rounded once).
namespace {
template <class T>
at::Tensor input_grad_engine(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                             const at::Tensor& g, const ConvArgs& a, bool binary, mixgemm::Micro micro) {
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const Geometry q(x, wp, dy, a);
  const int64_t P = q.OH * q.OW, taps = q.KH * q.KW;
  const at::Tensor G = padded_gates(g);
  // The weights are in dy's dtype. bfloat16: each image's panel picks (binary gates) or blends its rows from
  // them (RowPick); float32: blend_panel reads them.
  const bool pick = std::is_same_v<T, c10::BFloat16>;
  const at::Tensor wpc = wp.contiguous(), wfc = wf.contiguous();
  const mixgemm::BSource src{pick ? nullptr : wpc.data_ptr<float>(), pick ? nullptr : wfc.data_ptr<float>(),
                             mixgemm::kNR, K};
  const mixgemm::RowPick rows{pick ? reinterpret_cast<const uint16_t*>(wpc.data_ptr()) : nullptr,
                              pick ? reinterpret_cast<const uint16_t*>(wfc.data_ptr()) : nullptr, K, binary};
  at::Tensor dx = at::zeros(x.sizes(), x.options().dtype(at::kFloat).memory_format(x.suggest_memory_format()));
  const T* D = dy.data_ptr<T>();
  const int64_t dN = dy.stride(0), dC = dy.stride(1), dH = dy.stride(2), dW = dy.stride(3);
  float* X = dx.data_ptr<float>();
  const int64_t xN = dx.stride(0), xC = dx.stride(1), xH = dx.stride(2), xW = dx.stride(3);
  const bool direct = dW == 1 && dH == q.OW && dC >= P;  // NCHW dy is A as it is
  auto pack = [&](int64_t n, int64_t k0, int64_t kb, float* buf, int64_t& lda) -> const float* {
    const T* dn = D + n * dN;
    if constexpr (std::is_same_v<T, float>) {
      if (direct && lda == P) {
        lda = dC;
        return dn + k0 * dC;
      }
    }
    for (int64_t kk = 0; kk < kb; ++kk) {
      const T* dc = dn + (k0 + kk) * dC;
      float* d = buf + kk * lda;
      if (direct) {
        widen(dc, P, d);
        continue;
      }
      for (int64_t oh = 0; oh < q.OH; ++oh)
        for (int64_t ow = 0; ow < q.OW; ++ow) *d++ = static_cast<float>(dc[oh * dH + ow * dW]);
    }
    return buf;
  };
  // C_n is [P][Kp]. A 1x1 stride-1 unpadded conv into NCHW dx writes its transpose (each element once: dx is
  // zero); otherwise the transpose goes to [K][P] scratch and col2im adds its rows (read contiguously).
  const bool dx_is_transpose = taps == 1 && q.sh == 1 && q.sw == 1 && q.ph == 0 && q.pw == 0 && xW == 1 &&
                               xH == q.W && q.OH == q.H && q.OW == q.W;
  auto consume = [&](int64_t n, const float* Cb) {
    const int64_t Kp = mixgemm::round_up(K, mixgemm::kNR);
    float* xn = X + n * xN;
    if (dx_is_transpose) {
      mixgemm::transpose_out(Cb, Kp, P, K, nullptr, xn, xC);
      return;
    }
    float* cols = mixgemm::scratch(4, K * P);
    mixgemm::transpose_out(Cb, Kp, P, K, nullptr, cols, P);
    for (int64_t k = 0; k < K; ++k) {
      float* xc = xn + (k / taps) * xC;
      const float* row = cols + k * P;
      for_each_tap_pixel(q, (k % taps) / q.KW, k % q.KW, xH, xW, [&](int64_t p, int64_t off) {
        if (off >= 0) xc[off] += row[p];
      });
    }
  };
  mixgemm::run(N, P, C, K, src, G.data_ptr<float>(), G.size(1), false, pack, consume, micro, nullptr, nullptr,
               pick ? &rows : nullptr);
  return std::is_same_v<T, float> ? dx : dx.to(x.scalar_type());
}
}  // namespace

at::Tensor input_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                      const at::Tensor& g, const ConvArgs& a, bool binary, bool brgemm) {
  if (dy.scalar_type() == at::kBFloat16)
    return input_grad_engine<c10::BFloat16>(dy, x, wp, wf, g, a, binary,
                                            brgemm ? mixgemm::Micro::Bf16Brgemm : mixgemm::Micro::Bf16);
  return input_grad_engine<float>(dy, x, wp, wf, g, a, binary,
                                  brgemm ? mixgemm::Micro::Brgemm : mixgemm::Micro::Avx2);
}

// dWp, dWf (as asked) and the weight part of dL/dg in one pass: mixgemm::run_wgrad.
void weight_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                  const at::Tensor& g, const ConvArgs& a, const GradMask& m, at::Tensor& dwp,
                  at::Tensor& dwf, at::Tensor& dg) {
  const int64_t N = x.size(0), C = wp.size(0), K = wp.numel() / C;
  const Geometry q(x, wp, dy, a);
  const int64_t P = q.OH * q.OW;
  const at::Tensor G = padded_gates(g), dW = (wf - wp).contiguous();
  const at::Tensor dyc = dy.contiguous();  // [n][c][p] rows (dy arrives channels_last for such inputs)
  const bool need_wp = m.weight_pre, need_wf = m.weight_ft;
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
bool applicable(const at::Tensor&, const ConvArgs&, int64_t) { return false; }
void keep_packed(const at::Tensor&) {}
bool brgemm_applicable(const at::Tensor&) { return false; }
void weight_grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const ConvArgs&, const GradMask&, at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "gated_conv2d: internal error: AVX2 path unavailable");
}
void forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const ConvArgs&, at::Tensor&,
             bool, bool) {
  TORCH_CHECK(false, "gated_conv2d: internal error: AVX2 path unavailable");
}
at::Tensor input_grad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const ConvArgs&, bool, bool) {
  TORCH_CHECK(false, "gated_conv2d: internal error: AVX2 path unavailable");
}
#endif

}  // namespace mix
}  // namespace gconv
}  // namespace tlkernels
