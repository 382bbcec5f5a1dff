// CPU kernel of the fused filter-bank histogram. Work item = (image, chunk of filters): one small conv
// (oneDNN) produces that tile of responses, which is binned straight away into int32 counters private to
// the item. Tiles are capped at kTileElems floats, so peak extra memory is threads x tile, whatever N is.
//
// Low-rank banks (a Gabor filter with an isotropic envelope is exactly rank 1-3: cos(ax + by) splits into
// cos/sin products) take a separable path instead: each filter is the sum of its SVD components
// s * u v^T kept above 1e-7 of its largest singular value (the rest is below float rounding), and each
// component is a horizontal then a vertical 1-D pass over one image held in cache, the response plane
// binned as soon as it is complete. For the default 48-filter 11x11 bank that is 2,112 multiply-adds
// per pixel instead of 5,808.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>

#include "ops/check.h"
#include "ops/common/histogram_math.h"
#include "ops/config.h"
#include "ops/cpu/avx2.h"
#include "ops/histogram.h"
#include "ops/measured_choice.h"

namespace tlkernels {
namespace {

constexpr int64_t kLutCells = 4096;
constexpr int64_t kSubs = 8;  // interleaved sub-histograms per channel (the binning loops use 4 or 8 of them)
constexpr int64_t kTileElems = 1 << 20;  // 4 MB of float32 responses per work item (48 filters at 128x128)

// One rank-1 component s * u v^T of filter f (u: kh taps down, v: kw taps across).
struct SepComponent {
  int64_t f;
  std::vector<float> u, v;
};

// The components of every filter, or empty when the bank cannot be separated with fewer taps than the direct
// path or the geometry is not the plain stride-1 case.
std::vector<SepComponent> separable_components(const at::Tensor& w, at::IntArrayRef stride) {
  std::vector<SepComponent> comps;
  if (w.size(1) != 1 || stride[0] != 1 || stride[1] != 1 || w.size(2) < 3 || w.size(3) < 3) return comps;
  if (!at::isfinite(w).all().item<bool>()) return comps;  // (an SVD of NaN fails; the direct path propagates it)
  const int64_t F = w.size(0), kh = w.size(2), kw = w.size(3);
  auto svd = at::linalg_svd(w.squeeze(1).to(at::kDouble), /*full_matrices=*/false);
  const at::Tensor U = std::get<0>(svd).contiguous(), S = std::get<1>(svd).contiguous(),
                   Vh = std::get<2>(svd).contiguous();
  const int64_t r = S.size(1);
  const double* up = U.const_data_ptr<double>();
  const double* sp = S.const_data_ptr<double>();
  const double* vp = Vh.const_data_ptr<double>();
  int64_t taps = 0;
  for (int64_t f = 0; f < F; ++f) {
    for (int64_t k = 0; k < r; ++k) {
      const double sk = sp[f * r + k];
      if (!(sk > 1e-7 * sp[f * r])) break;  // singular values are sorted, largest first
      SepComponent c{f, std::vector<float>(kh), std::vector<float>(kw)};
      for (int64_t i = 0; i < kh; ++i) c.u[i] = static_cast<float>(sk * up[(f * kh + i) * r + k]);
      for (int64_t j = 0; j < kw; ++j) c.v[j] = static_cast<float>(vp[(f * r + k) * kw + j]);
      comps.push_back(std::move(c));
      taps += kh + kw;
    }
  }
  if (taps >= F * kh * kw) comps.clear();
  return comps;
}

int64_t component_taps(const std::vector<SepComponent>& comps) {
  int64_t taps = 0;
  for (const auto& c : comps) taps += static_cast<int64_t>(c.u.size() + c.v.size());
  return taps;
}

// out[x] = sum_j v[j] * in[x + j], x < n (in has n + kw - 1 values), and acc[x] += sum_i u[i] * rows[i*ld + x].
inline void row_pass_generic(const float* in, const float* v, int64_t kw, float* out, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    float a = 0;
    for (int64_t j = 0; j < kw; ++j) a += v[j] * in[x + j];
    out[x] = a;
  }
}
inline void col_pass_generic(const float* rows, int64_t ld, const float* u, int64_t kh, float* acc, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    float a = acc[x];
    for (int64_t i = 0; i < kh; ++i) a += u[i] * rows[i * ld + x];
    acc[x] = a;
  }
}
#ifdef TLK_HAVE_AVX2_PATH
// Register-blocked: 64 outputs held in eight accumulators across all taps, so every tap costs one load and
// one FMA per 8 outputs (no store/reload of the output per tap), and eight independent FMA chains cover
// the FMA latency (with two chains the loop is bound by that latency instead).
template <int V>
__attribute__((target("avx2,fma"))) inline void row_block(const float* in, const float* v, int64_t kw, float* out) {
  __m256 a[V];
  for (int k = 0; k < V; ++k) a[k] = _mm256_setzero_ps();
  for (int64_t j = 0; j < kw; ++j) {
    const __m256 c = _mm256_set1_ps(v[j]);
    for (int k = 0; k < V; ++k) a[k] = _mm256_fmadd_ps(c, _mm256_loadu_ps(in + j + 8 * k), a[k]);
  }
  for (int k = 0; k < V; ++k) _mm256_storeu_ps(out + 8 * k, a[k]);
}
template <int V>
__attribute__((target("avx2,fma"))) inline void col_block(const float* rows, int64_t ld, const float* u, int64_t kh,
                                                          float* acc) {
  __m256 a[V];
  for (int k = 0; k < V; ++k) a[k] = _mm256_loadu_ps(acc + 8 * k);
  for (int64_t i = 0; i < kh; ++i) {
    const __m256 c = _mm256_set1_ps(u[i]);
    for (int k = 0; k < V; ++k) a[k] = _mm256_fmadd_ps(c, _mm256_loadu_ps(rows + i * ld + 8 * k), a[k]);
  }
  for (int k = 0; k < V; ++k) _mm256_storeu_ps(acc + 8 * k, a[k]);
}
__attribute__((target("avx2,fma"))) inline void row_pass_avx2(const float* in, const float* v, int64_t kw, float* out,
                                                              int64_t n) {
  int64_t x = 0;
  for (; x + 64 <= n; x += 64) row_block<8>(in + x, v, kw, out + x);
  for (; x + 16 <= n; x += 16) row_block<2>(in + x, v, kw, out + x);
  if (x < n) row_pass_generic(in + x, v, kw, out + x, n - x);
}
__attribute__((target("avx2,fma"))) inline void col_pass_avx2(const float* rows, int64_t ld, const float* u, int64_t kh,
                                                              float* acc, int64_t n) {
  int64_t x = 0;
  for (; x + 64 <= n; x += 64) col_block<8>(rows + x, ld, u, kh, acc + x);
  for (; x + 16 <= n; x += 16) col_block<2>(rows + x, ld, u, kh, acc + x);
  if (x < n) col_pass_generic(rows + x, ld, u, kh, acc + x, n - x);
}
#endif

// Counts the bins b[0, m) (m a multiple of 8) into eight interleaved sub-histograms (sub[(i & 7) * nbins + b]):
// run as a loop of its own after a block's bins are computed, the counters' read-modify-write chains
// (neighbouring responses share bins) overlap with one another instead of with the bin computation.
inline void count_bins(const int32_t* b, int64_t m, int32_t* sub, int64_t nbins) {
  for (int64_t i = 0; i < m; i += 8)
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) ++sub[k * nbins + b[i + k]];
}
constexpr int64_t kBinBlock = 128;  // values per block of count_bins

#ifdef TLK_HAVE_AVX2_PATH
// The bin rules past the table: v >= the top edge: the last bin; v < e_1: bin 0; NaN: the last bin (as
// torch.bucketize in the reference). AVX2, eight values.
__attribute__((target("avx2,fma"))) inline __m256i edge_rules256(__m256 v, __m256i b, __m256 vtop, __m256 ve1,
                                                                 __m256i vlast) {
  b = _mm256_blendv_epi8(b, vlast, _mm256_castps_si256(_mm256_cmp_ps(v, vtop, _CMP_GE_OQ)));
  b = _mm256_and_si256(b, _mm256_castps_si256(_mm256_cmp_ps(v, ve1, _CMP_GE_OQ)));
  return _mm256_blendv_epi8(b, vlast, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
// edge_rules256 on AVX-512, sixteen values.
__attribute__((target("avx512f"))) inline __m512i edge_rules512(__m512 v, __m512i b, __m512 vtop, __m512 ve1,
                                                                __m512i vlast) {
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, vtop, _CMP_GE_OQ), vlast);
  b = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, ve1, _CMP_GE_OQ), b);
  return _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), vlast);
}
#endif

#ifdef TLK_HAVE_AVX2_PATH
// Bins of values [0, n8) (n8 a multiple of 8) by the single-edge lookup table, eight at a time, counted
// into the four interleaved sub-histograms exactly as the scalar loop does (sub[(i & 3) * nbins + b]).
__attribute__((target("avx2,fma"))) inline void bin_single_avx2(const float* rf, int64_t n8, float lo, float linv,
                                                                float cmax, float e1, float top, int32_t last,
                                                                const int32_t* bins, const float* thr, int32_t* sub,
                                                                int64_t nbins) {
  const __m256 vlo = _mm256_set1_ps(lo), vinv = _mm256_set1_ps(linv), vmax = _mm256_set1_ps(cmax);
  const __m256 ve1 = _mm256_set1_ps(e1), vtop = _mm256_set1_ps(top), zero = _mm256_setzero_ps();
  const __m256i vlast = _mm256_set1_epi32(last);
  alignas(32) int32_t b8[8];
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = _mm256_loadu_ps(rf + i);
    __m256 t = _mm256_mul_ps(_mm256_sub_ps(v, vlo), vinv);
    t = _mm256_min_ps(_mm256_max_ps(t, zero), vmax);  // max(NaN, 0) = 0, as the scalar loop
    // (scalar table loads: AVX2 gathers are microcoded, slower than eight loads on the AMD EPYC CPUs)
    alignas(32) int32_t c8[8], g8[8];
    alignas(32) float t8[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c8), _mm256_cvttps_epi32(t));
    for (int k = 0; k < 8; ++k) {
      g8[k] = bins[c8[k]];
      t8[k] = thr[c8[k]];
    }
    __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(g8));
    const __m256 th = _mm256_load_ps(t8);
    b = _mm256_sub_epi32(b, _mm256_castps_si256(_mm256_cmp_ps(v, th, _CMP_GE_OQ)));  // + (v >= thr)
    b = edge_rules256(v, b, vtop, ve1, vlast);
    _mm256_store_si256(reinterpret_cast<__m256i*>(b8), b);
    for (int k = 0; k < 8; ++k) ++sub[(k & 3) * nbins + b8[k]];
  }
}
#endif

#ifdef TLK_HAVE_AVX2_PATH
// Binning by near-uniform edges (Lut::uniform) on AVX2: the estimate and the rules eight values at a time, the
// next edge of each estimate by eight scalar loads from the 128-float table (in L1; AVX2 gathers are
// microcoded on AMD cores); counted by count_bins.
__attribute__((target("avx2,fma"))) inline void bin_uniform_avx2(const float* rf, int64_t n, float u0, float uinv,
                                                                 float e1, float top, int32_t last, const float* next,
                                                                 int32_t* sub, int64_t nbins) {
  const __m256 vu0 = _mm256_set1_ps(u0), vinv = _mm256_set1_ps(uinv), half = _mm256_set1_ps(0.5f);
  const __m256 vmax = _mm256_set1_ps(static_cast<float>(last)), zero = _mm256_setzero_ps();
  const __m256 ve1 = _mm256_set1_ps(e1), vtop = _mm256_set1_ps(top);
  const __m256i vlast = _mm256_set1_epi32(last);
  alignas(32) int32_t b[kBinBlock];
  alignas(32) int32_t e8[8];
  for (int64_t i0 = 0; i0 < n; i0 += kBinBlock) {
    const int64_t m = std::min(kBinBlock, n - i0);  // (a multiple of 8)
    for (int64_t i = 0; i < m; i += 8) {
      const __m256 v = _mm256_loadu_ps(rf + i0 + i);
      __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(v, vu0), vinv), half);
      t = _mm256_min_ps(_mm256_max_ps(t, zero), vmax);  // max(NaN, 0) = 0
      const __m256i est = _mm256_cvttps_epi32(t);
      _mm256_store_si256(reinterpret_cast<__m256i*>(e8), est);
      const __m256 nxt = _mm256_setr_ps(next[e8[0] + 1], next[e8[1] + 1], next[e8[2] + 1], next[e8[3] + 1],
                                        next[e8[4] + 1], next[e8[5] + 1], next[e8[6] + 1], next[e8[7] + 1]);
      const __m256i bv = _mm256_sub_epi32(est, _mm256_castps_si256(_mm256_cmp_ps(v, nxt, _CMP_GE_OQ)));  // + (v >= next)
      _mm256_store_si256(reinterpret_cast<__m256i*>(b + i), edge_rules256(v, bv, vtop, ve1, vlast));
    }
    count_bins(b, m, sub, nbins);
  }
}

// bin_single_avx2's AVX-512 twin, 16 values at a time: both table lookups as gathers, the bin rules as mask
// operations; counted by count_bins.
__attribute__((target("avx512f"))) inline void bin_single_avx512(const float* rf, int64_t n, float lo, float linv,
                                                                 float cmax, float e1, float top, int32_t last,
                                                                 const int32_t* bins, const float* thr,
                                                                 int32_t* sub, int64_t nbins) {
  const __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(linv), vmax = _mm512_set1_ps(cmax);
  const __m512 ve1 = _mm512_set1_ps(e1), vtop = _mm512_set1_ps(top), zero = _mm512_setzero_ps();
  const __m512i vlast = _mm512_set1_epi32(last), one = _mm512_set1_epi32(1);
  alignas(64) int32_t b[kBinBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBinBlock) {
    const int64_t m = std::min(kBinBlock, n - i0);  // (a multiple of 16)
    for (int64_t i = 0; i < m; i += 16) {
      const __m512 v = _mm512_loadu_ps(rf + i0 + i);
      __m512 t = _mm512_mul_ps(_mm512_sub_ps(v, vlo), vinv);
      t = _mm512_min_ps(_mm512_max_ps(t, zero), vmax);  // max(NaN, 0) = 0, as the scalar loop
      const __m512i c = _mm512_cvttps_epi32(t);
      __m512i bv = _mm512_i32gather_epi32(c, bins, 4);
      const __m512 th = _mm512_i32gather_ps(c, thr, 4);
      bv = _mm512_mask_add_epi32(bv, _mm512_cmp_ps_mask(v, th, _CMP_GE_OQ), bv, one);
      _mm512_store_si512(b + i, edge_rules512(v, bv, vtop, ve1, vlast));
    }
    count_bins(b, m, sub, nbins);
  }
}

// Binning by near-uniform edges (Lut::uniform), 16 values at a time with no memory lookups: the next edge of
// each estimate read from the 128-float table held in eight registers (two-source permutes, then blends by
// the index's bits 5 and 6), the bin rules as in bin_single_avx2; counted by count_bins.
__attribute__((target("avx512f"))) inline void bin_uniform_avx512(const float* rf, int64_t n, float u0, float uinv,
                                                                  float e1, float top, int32_t last,
                                                                  const float* next, int32_t* sub, int64_t nbins) {
  const __m512 vu0 = _mm512_set1_ps(u0), vinv = _mm512_set1_ps(uinv), half = _mm512_set1_ps(0.5f);
  const __m512 vmax = _mm512_set1_ps(static_cast<float>(last)), zero = _mm512_setzero_ps();
  const __m512 ve1 = _mm512_set1_ps(e1), vtop = _mm512_set1_ps(top);
  const __m512i vlast = _mm512_set1_epi32(last), one = _mm512_set1_epi32(1);
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  __m512 tab[8];
  for (int r = 0; r < 8; ++r) tab[r] = _mm512_loadu_ps(next + 16 * r);
  alignas(64) int32_t b[kBinBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBinBlock) {
    const int64_t m = std::min(kBinBlock, n - i0);  // (a multiple of 16)
    for (int64_t i = 0; i < m; i += 16) {
      const __m512 v = _mm512_loadu_ps(rf + i0 + i);
      __m512 t = _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(v, vu0), vinv), half);
      t = _mm512_min_ps(_mm512_max_ps(t, zero), vmax);  // max(NaN, 0) = 0
      const __m512i est = _mm512_cvttps_epi32(t), idx = _mm512_add_epi32(est, one);
      const __m512 p0 = _mm512_permutex2var_ps(tab[0], idx, tab[1]), p1 = _mm512_permutex2var_ps(tab[2], idx, tab[3]);
      const __m512 p2 = _mm512_permutex2var_ps(tab[4], idx, tab[5]), p3 = _mm512_permutex2var_ps(tab[6], idx, tab[7]);
      const __mmask16 m5 = _mm512_test_epi32_mask(idx, bit5), m6 = _mm512_test_epi32_mask(idx, bit6);
      const __m512 nxt = _mm512_mask_blend_ps(m6, _mm512_mask_blend_ps(m5, p0, p1), _mm512_mask_blend_ps(m5, p2, p3));
      const __m512i bv = _mm512_mask_add_epi32(est, _mm512_cmp_ps_mask(v, nxt, _CMP_GE_OQ), est, one);
      _mm512_store_si512(b + i, edge_rules512(v, bv, vtop, ve1, vlast));
    }
    count_bins(b, m, sub, nbins);
  }
}
#endif

// The response plane (OH x OW) of one image (padded, Hp x Wp) for the components [cb, ce) of one filter.
// hbuf: Hp rows, ldh floats apart (a multiple of 16 on a 64-byte aligned buffer: the column pass's vector loads
// then stay within cache lines).
void separable_plane(const float* img, int64_t Hp, int64_t Wp, const SepComponent* cb, const SepComponent* ce,
                     float* hbuf, int64_t ldh, float* plane, int64_t OH, int64_t OW) {
  const int64_t kh = static_cast<int64_t>(cb->u.size()), kw = static_cast<int64_t>(cb->v.size());
  std::memset(plane, 0, sizeof(float) * OH * OW);
#ifdef TLK_HAVE_AVX2_PATH
  const bool fast = avx2::available();
#else
  const bool fast = false;
#endif
  for (const SepComponent* c = cb; c != ce; ++c) {
    for (int64_t y = 0; y < Hp; ++y) {
#ifdef TLK_HAVE_AVX2_PATH
      if (fast) { row_pass_avx2(img + y * Wp, c->v.data(), kw, hbuf + y * ldh, OW); continue; }
#endif
      row_pass_generic(img + y * Wp, c->v.data(), kw, hbuf + y * ldh, OW);
    }
    for (int64_t y = 0; y < OH; ++y) {
#ifdef TLK_HAVE_AVX2_PATH
      if (fast) { col_pass_avx2(hbuf + y * ldh, ldh, c->u.data(), kh, plane + y * OW, OW); continue; }
#endif
      col_pass_generic(hbuf + y * ldh, ldh, c->u.data(), kh, plane + y * OW, OW);
    }
  }
  (void)fast;
}

// Per channel, a lookup table over a uniform grid of [e1, e_{nb-1}]: cell -> bin of its left end (by the
// shared bin_index), so binning is a multiply, a load and (rarely) a compare or two, not a binary search.
// thr[c]: the first edge above the cell's first bin. When no cell holds two edges (`single`), a value's
// bin is bin[c] + (v >= thr[c]): no loop, no branch.
struct Lut {
  float lo, inv;
  std::vector<int32_t> bin;
  std::vector<float> thr;
  bool single = true;
  // Near-uniform edges (each within a quarter bin of e_0 + i (e_nb - e_0) / nb; nb <= 127, as linspace makes
  // them): trunc((v - e_0) / step - 1/2) is the bin or the one below it, and one compare with the next edge
  // (next[i] = e_i, +inf past e_nb: 128 floats, held in registers) settles it.
  bool uniform = false;
  float u0 = 0, uinv = 0;
  std::vector<float> next;
};

Lut build_lut(const float* ef, int64_t nb) {
  Lut L;
  const float hi = nb > 2 ? ef[nb - 1] : ef[1] + 1.0f;
  L.lo = ef[1];
  L.inv = static_cast<float>(kLutCells) / std::max(hi - L.lo, 1e-30f);
  L.bin.resize(kLutCells);
  for (int64_t c = 0; c < kLutCells; ++c) {
    const float left = L.lo + static_cast<float>(c) / L.inv;
    int b = bin_index<float>(left, ef, static_cast<int>(nb));
    while (b > 0 && left < ef[b]) --b;  // float rounding of `left`: never start past the true bin
    L.bin[c] = b;
  }
  L.thr.resize(kLutCells);
  const float cell = 1.0f / L.inv;
  for (int64_t c = 0; c < kLutCells; ++c) {
    const int b = L.bin[c];
    L.thr[c] = b + 1 <= nb - 1 ? ef[b + 1] : INFINITY;
    // a second edge inside the cell (with a margin for the rounding of (v - lo) * inv): keep the loop
    const float right = L.lo + static_cast<float>(c + 1) * cell + 0.01f * cell;
    if (b + 2 <= nb - 1 && ef[b + 2] <= right) L.single = false;
  }
  const double step = (static_cast<double>(ef[nb]) - ef[0]) / static_cast<double>(nb);
  L.uniform = nb <= 127 && std::isfinite(step) && step > 0;
  for (int64_t i = 0; L.uniform && i <= nb; ++i)
    L.uniform = std::abs(static_cast<double>(ef[i]) - (ef[0] + static_cast<double>(i) * step)) <= 0.25 * step;
  if (L.uniform) {
    L.u0 = ef[0];
    L.uinv = static_cast<float>(1.0 / step);
    L.next.assign(128, INFINITY);
    for (int64_t i = 0; i <= nb; ++i) L.next[i] = ef[i];
  }
  return L;
}

// The binning of one filter bank call: edges (F, nb + 1) and their lookup tables.
struct Binner {
  const float* edges;
  int64_t nb;
  std::vector<Lut> luts;

  Binner(const at::Tensor& e) : edges(e.const_data_ptr<float>()), nb(e.size(1) - 1) {
    for (int64_t ch = 0; ch < e.size(0); ++ch) luts.push_back(build_lut(edges + ch * (nb + 1), nb));
  }

  // Adds the counts of one response plane rf (np values) of channel ch into cf (nb counters). Four
  // interleaved sub-histograms: neighbouring pixels often share a bin, and increments of one counter serialise.
  void bin_plane(int64_t ch, const float* rf, int64_t np, int32_t* cf) const {
    const float* ef = edges + ch * (nb + 1);
    const Lut& L = luts[ch];
    thread_local std::vector<int32_t> sub_tls;
    sub_tls.assign(kSubs * nb, 0);
    int32_t* const sub = sub_tls.data();  // (a plain pointer: no TLS lookup inside the loop)
    const int64_t nbins = nb;
    if (L.single) {
      const float e1 = ef[1], top = ef[nb - 1], lo = L.lo, linv = L.inv, cmax = static_cast<float>(kLutCells - 1);
      const int32_t* bins = L.bin.data();
      const float* thr = L.thr.data();
      const int32_t last = static_cast<int32_t>(nb) - 1;
      int64_t i0 = 0;
#ifdef TLK_HAVE_AVX2_PATH
      if (avx512::available() && L.uniform) {
        i0 = np / 16 * 16;
        bin_uniform_avx512(rf, i0, L.u0, L.uinv, e1, top, last, L.next.data(), sub, nbins);
      } else if (avx512::available()) {
        i0 = np / 16 * 16;
        bin_single_avx512(rf, i0, lo, linv, cmax, e1, top, last, bins, thr, sub, nbins);
      } else if (avx2::available() && L.uniform) {
        i0 = np / 8 * 8;
        bin_uniform_avx2(rf, i0, L.u0, L.uinv, e1, top, last, L.next.data(), sub, nbins);
      } else if (avx2::available()) {
        i0 = np / 8 * 8;
        bin_single_avx2(rf, i0, lo, linv, cmax, e1, top, last, bins, thr, sub, nbins);
      }
#endif
      for (int64_t i = i0; i < np; ++i) {
        const float v = rf[i];
        float t = (v - lo) * linv;
        t = t > 0.0f ? t : 0.0f;  // (written so that NaN gives 0: its bin is 0 below)
        t = t < cmax ? t : cmax;
        const int32_t c = static_cast<int32_t>(t);
        int32_t b = bins[c] + (v >= thr[c]);
        b = v >= top ? last : b;
        b = v >= e1 ? b : 0;
        b = v != v ? last : b;  // NaN: the last bin, as torch.bucketize in the reference
        ++sub[(i & 3) * nbins + b];
      }
    } else {
      for (int64_t i = 0; i < np; ++i) {
        const float v = rf[i];
        int b;
        if (v != v) {
          b = static_cast<int>(nb) - 1;  // NaN: the last bin, as torch.bucketize in the reference
        } else if (!(v >= ef[1])) {
          b = 0;
        } else if (v >= ef[nb - 1]) {
          b = static_cast<int>(nb) - 1;
        } else {  // the cell's first bin, then step over the edges inside the cell (usually none)
          const int64_t c = std::min<int64_t>(kLutCells - 1, static_cast<int64_t>((v - L.lo) * L.inv));
          b = L.bin[c];
          while (v >= ef[b + 1]) ++b;
        }
        ++sub[(i & 3) * nbins + b];
      }
    }
    for (int64_t j = 0; j < kSubs; ++j)
      for (int64_t b = 0; b < nbins; ++b) cf[b] += sub[j * nbins + b];
  }

  // out row = counts / P (each response pixel adds 1/P).
  void write(const int32_t* counts, int64_t P, float* out_row) const {
    const float inv = 1.0f / static_cast<float>(P);
    for (int64_t b = 0; b < nb; ++b) out_row[b] = static_cast<float>(counts[b]) * inv;
  }
};

// Separable path. Work item = one image, copied into a zero-bordered buffer of this thread, then filter by
// filter (components are grouped by filter). Extra memory: three planes per thread.
void histogram_separable(const at::Tensor& x, const std::vector<SepComponent>& comps, const Binner& bins,
                         const HistogramShape& sh, at::IntArrayRef padding, float* out) {
  const int64_t H = x.size(2), W = x.size(3), OH = sh.OH, OW = sh.OW, P = OH * OW, F = sh.F, nb = sh.bins;
  const int64_t Hp = H + 2 * padding[0], Wp = W + 2 * padding[1];
  const at::Tensor xc = x.contiguous();
  const float* xcp = xc.const_data_ptr<float>();
  at::parallel_for(0, sh.N, 1, [&](int64_t nb0, int64_t ne) {
    const int64_t ldh = (OW + 15) / 16 * 16;
    std::vector<float> pimg(Hp * Wp, 0.0f), hstore(Hp * ldh + 16), pstore(P + 16);
    auto aligned = [](std::vector<float>& v) {  // (64-byte aligned: whole cache lines per vector load)
      return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
    };
    float* const hbuf = aligned(hstore);
    float* const plane = aligned(pstore);
    std::vector<int32_t> counts(nb);
    for (int64_t n = nb0; n < ne; ++n) {
      for (int64_t y = 0; y < H; ++y)
        std::memcpy(pimg.data() + (y + padding[0]) * Wp + padding[1], xcp + (n * H + y) * W, sizeof(float) * W);
      size_t c0 = 0;
      for (int64_t f = 0; f < F; ++f) {
        size_t c1 = c0;
        while (c1 < comps.size() && comps[c1].f == f) ++c1;
        if (c1 > c0) {
          separable_plane(pimg.data(), Hp, Wp, comps.data() + c0, comps.data() + c1, hbuf, ldh, plane, OH, OW);
        } else {
          std::fill(plane, plane + P, 0.0f);  // an all-zero filter
        }
        c0 = c1;
        std::fill(counts.begin(), counts.end(), 0);
        bins.bin_plane(f, plane, P, counts.data());
        bins.write(counts.data(), P, out + (n * F + f) * nb);
      }
    }
  });
}

// Direct path. Work item = (image, chunk of filters): one small oneDNN conv, run single-threaded (the items
// already run in parallel), gives that tile of responses, binned at once; tiles of at most kTileElems floats.
void histogram_direct(const at::Tensor& x, const at::Tensor& w, const Binner& bins, const HistogramShape& sh,
                      at::IntArrayRef stride, at::IntArrayRef padding, float* out) {
  const int64_t P = sh.OH * sh.OW, F = sh.F, nb = sh.bins;
  const int64_t fchunk = std::max<int64_t>(1, std::min<int64_t>(F, kTileElems / P));
  const int64_t nchunks = (F + fchunk - 1) / fchunk;
  at::parallel_for(0, sh.N * nchunks, 1, [&](int64_t ib, int64_t ie) {
    std::vector<int32_t> counts(fchunk * nb);
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t n = it / nchunks, f0 = (it % nchunks) * fchunk, fc = std::min(fchunk, F - f0);
      const at::Tensor r = at::conv2d(x.narrow(0, n, 1), w.narrow(0, f0, fc), {}, stride, padding).contiguous();
      const float* rp = r.const_data_ptr<float>();
      std::fill(counts.begin(), counts.end(), 0);
      for (int64_t f = 0; f < fc; ++f) {
        int32_t* cf = counts.data() + f * nb;
        bins.bin_plane(f0 + f, rp + f * P, P, cf);
        bins.write(cf, P, out + (n * F + f0 + f) * nb);
      }
    }
  });
}

// The choice between the separable and the direct path (the `histogram` setting, TLKERNELS_HISTOGRAM): `auto`
// (default) times both once per call signature on the first two images and keeps the fixed rule's path unless
// the other is clearly faster (ops/measured_choice.h, as the gated convolution's choice); `heuristic` takes the
// fixed rule (separable when its 1-D passes cost at most 60% of the direct taps); `separable` / `direct` force a
// path (separable only where the bank separates).
enum class HistPath { Separable, Direct };
constexpr const char* kPathNames[] = {"separable", "direct"};
const ChoiceNames kRegisterPathNames(kPathNames);
const config::Setting kHistogramSetting("histogram", {"auto", "heuristic", kPathNames[0], kPathNames[1]});
thread_local std::string last_path = "";

HistPath choose_path(const std::vector<SepComponent>& comps, const HistogramShape& sh, int64_t kh, int64_t kw,
                     const std::string& key, const std::function<void(HistPath)>& run_sample) {
  const std::string& v = kHistogramSetting.value();
  if (comps.empty() || v == "direct") return HistPath::Direct;
  if (v == "separable") return HistPath::Separable;
  const HistPath rule = component_taps(comps) <= 0.6 * static_cast<double>(sh.F * kh * kw) ? HistPath::Separable
                                                                                            : HistPath::Direct;
  if (v == "heuristic") return rule;
  return measured_choice(key, {HistPath::Separable, HistPath::Direct}, rule, kPathNames, run_sample);
}

at::Tensor filterbank_histogram_cpu(const at::Tensor& images, const at::Tensor& filters, const at::Tensor& edges,
                                    at::IntArrayRef stride, at::IntArrayRef padding) {
  const HistogramShape sh = check_filterbank_histogram_args(images, filters, edges, stride, padding);
  const at::Tensor e = edges.to(at::kFloat).contiguous();
  check_edges_increasing(e);
  at::Tensor out = at::zeros({sh.N, sh.F, sh.bins}, images.options().dtype(at::kFloat));
  if (sh.N == 0 || sh.F == 0) return out;
  at::Tensor x = images.to(at::kFloat);
  at::Tensor w = filters.to(at::kFloat).contiguous();
  // Filters identical across input channels (a grey-level bank such as gabor_bank on RGB) act on the channel
  // sum: conv(x, [w0, w0, w0]) = conv(x0 + x1 + x2, w0), a third of the work.
  if (w.size(1) > 1 && at::equal(w, w.narrow(1, 0, 1).expand_as(w))) {
    x = x.sum(1, /*keepdim=*/true);
    w = w.narrow(1, 0, 1).contiguous();
  }
  const Binner bins(e);
  const std::vector<SepComponent> comps = separable_components(w, stride);
  auto run = [&](HistPath p, const at::Tensor& xs, const HistogramShape& s, float* o) {
    if (p == HistPath::Separable)
      histogram_separable(xs, comps, bins, s, padding, o);
    else
      histogram_direct(xs, w, bins, s, stride, padding, o);
  };
  std::ostringstream key;
  key << "hist|" << x.sizes() << '|' << w.sizes() << '|' << stride << padding << '|' << sh.bins << '|' << component_taps(comps)
      << '|' << at::get_num_threads();
  const HistPath path = choose_path(comps, sh, w.size(2), w.size(3), key.str(), [&](HistPath p) {
    HistogramShape sample = sh;
    sample.N = std::min<int64_t>(sh.N, 2);
    at::Tensor scratch = at::empty({sample.N, sh.F, sh.bins}, out.options());
    run(p, x.narrow(0, 0, sample.N), sample, scratch.mutable_data_ptr<float>());
  });
  run(path, x, sh, out.mutable_data_ptr<float>());
  last_path = kPathNames[static_cast<int>(path)];
  return out;
}

std::string histogram_last_path() { return last_path; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  // The path the last CPU call on this thread took (diagnostics: tests check that a forced path ran).
  m.def("_filterbank_histogram_last_path() -> str", &histogram_last_path);
}

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) { m.impl("filterbank_histogram", &filterbank_histogram_cpu); }

}  // namespace tlkernels
