#pragma once
// AVX2 + FMA fast paths for float32 rows, chosen at run time (scalar fallback elsewhere). The extension is
// built without -mavx2 so it loads on any x86-64; only these functions carry the target attribute.
// exp: a Cody-Waite range reduction and a degree-6 polynomial (Cephes expf), about 1 ulp on the range
// softmax uses (x - max <= 0); Sleef's u10 exp, which ATen uses, cost 3x more and bound the whole
// cross-entropy kernel on an AVX2 AMD EPYC.
#include <c10/util/Exception.h>

#include "ops/common/l2sp_math.h"
#include "ops/config.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace tlkernels {
extern const config::Setting kCpuIsa;  // ops/cpu/isa.cpp
}  // namespace tlkernels

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TLK_HAVE_AVX2_PATH 1
#include <immintrin.h>

namespace tlkernels {
namespace avx2 {

// The `cpu_isa` setting (TLKERNELS_CPU_ISA; declared in ops/cpu/isa.cpp) caps the instruction set the
// hand-written paths use: "native" (the best the CPU has), "avx512", "avx2", or "scalar" (no SIMD paths: the
// portable loops, which the tests then compare with the references too).
inline bool available() {
  static const bool cpu_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu_ok && !kCpuIsa.is("scalar");
}

}  // namespace avx2

namespace avx512 {
// The AVX-512 paths (foundation instructions only): on a CPU with AVX-512F unless `cpu_isa` caps the
// hand-written paths at avx2 or scalar.
inline bool available() {
  static const bool cpu_ok = __builtin_cpu_supports("avx512f");
  return cpu_ok && avx2::available() && !kCpuIsa.is("avx2");
}
// The AVX-512 BF16 dot products (vdpbf16ps: pairs of bfloat16 products summed into float32), where allowed
// (with the BW / VL masked 16-bit stores the bfloat16 paths use: every such CPU has them).
inline bool bf16_available() {
  static const bool cpu_ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  return cpu_ok && available();
}
}  // namespace avx512

namespace avx2 {

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum w (p - r)^2 over [0, n) (r may be null: r = 0; w may be null: w = 1); writes g = c * w * (p - r) when g
// is not null (g += c * w * (p - r) when acc).
// Four independent accumulators; the sum is a fixed-order function of the data: deterministic.
__attribute__((target("avx2,fma"))) inline double l2sp_chunk(const float* p, const float* r, const float* w, float* g,
                                                             float c, int64_t n, bool acc = false) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const __m256 vc = _mm256_set1_ps(c);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 d[4], wd[4];
    for (int k = 0; k < 4; ++k) {
      __m256 pv = _mm256_loadu_ps(p + i + 8 * k);
      d[k] = r ? _mm256_sub_ps(pv, _mm256_loadu_ps(r + i + 8 * k)) : pv;
      wd[k] = w ? _mm256_mul_ps(d[k], _mm256_loadu_ps(w + i + 8 * k)) : d[k];
      if (g) {
        float* gk = g + i + 8 * k;
        _mm256_storeu_ps(gk, acc ? _mm256_fmadd_ps(wd[k], vc, _mm256_loadu_ps(gk)) : _mm256_mul_ps(wd[k], vc));
      }
    }
    a0 = _mm256_fmadd_ps(wd[0], d[0], a0);
    a1 = _mm256_fmadd_ps(wd[1], d[1], a1);
    a2 = _mm256_fmadd_ps(wd[2], d[2], a2);
    a3 = _mm256_fmadd_ps(wd[3], d[3], a3);
  }
  double s = (double)hsum(a0) + (double)hsum(a1) + (double)hsum(a2) + (double)hsum(a3);
  for (; i < n; ++i) {
    const float d = r ? p[i] - r[i] : p[i];
    const float wd = w ? w[i] * d : d;
    if (g) g[i] = acc ? g[i] + c * wd : c * wd;
    s += (double)wd * d;
  }
  return s;
}

// The L2-SP-aware optimizer steps over [0, n) of one tensor (float32), the math of ops/common/l2sp_math.h
// (sgd_update, adamw_update) eight elements at a time; r (reference) and w (per-element weights) may be null.
// The options are loop-invariant branches. Per element: p, g, r, w and the state are read once and p and
// the state written once (the memory-bound minimum).
struct SgdOptions {
  float coeff, lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first;
};

__attribute__((target("avx2,fma"))) inline void sgd_chunk(float* p, const float* g, const float* r, const float* w,
                                                          float* buf, int64_t n, const SgdOptions& o) {
  const __m256 vc = _mm256_set1_ps(o.coeff), vlr = _mm256_set1_ps(o.lr), vm = _mm256_set1_ps(o.momentum);
  const __m256 vdamp = _mm256_set1_ps(1.0f - o.dampening), vwd = _mm256_set1_ps(o.weight_decay);
  const __m256 sign = _mm256_set1_ps(o.maximize ? -1.0f : 1.0f);
  const bool wd = o.weight_decay != 0.0f, mom = o.momentum != 0.0f;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + i);
    __m256 gv = _mm256_mul_ps(sign, _mm256_loadu_ps(g + i));
    const __m256 d = r ? _mm256_sub_ps(pv, _mm256_loadu_ps(r + i)) : pv;
    const __m256 c = w ? _mm256_mul_ps(vc, _mm256_loadu_ps(w + i)) : vc;
    gv = _mm256_fmadd_ps(c, d, gv);
    if (wd) gv = _mm256_fmadd_ps(vwd, pv, gv);
    if (mom) {
      const __m256 b = o.first ? gv : _mm256_fmadd_ps(vm, _mm256_loadu_ps(buf + i), _mm256_mul_ps(vdamp, gv));
      _mm256_storeu_ps(buf + i, b);
      gv = o.nesterov ? _mm256_fmadd_ps(vm, b, gv) : b;
    }
    _mm256_storeu_ps(p + i, _mm256_fnmadd_ps(vlr, gv, pv));
  }
  for (; i < n; ++i) {
    float b = mom ? buf[i] : 0.0f;
    p[i] = l2sp::sgd_update<float>(p[i], g[i], r ? r[i] : 0.0f, w ? o.coeff * w[i] : o.coeff, &b, o.first, o.lr,
                                   o.momentum, o.dampening, o.weight_decay, o.nesterov, o.maximize);
    if (mom) buf[i] = b;
  }
}

struct AdamWOptions {
  float coeff, lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2_sqrt;
  bool maximize;
};

__attribute__((target("avx2,fma"))) inline void adamw_chunk(float* p, const float* g, const float* r,
                                                            const float* w, float* m, float* v, float* vmax,
                                                            int64_t n, const AdamWOptions& o) {
  const __m256 vc = _mm256_set1_ps(o.coeff), sign = _mm256_set1_ps(o.maximize ? -1.0f : 1.0f);
  const __m256 b1 = _mm256_set1_ps(o.beta1), nb1 = _mm256_set1_ps(1.0f - o.beta1);
  const __m256 b2 = _mm256_set1_ps(o.beta2), nb2 = _mm256_set1_ps(1.0f - o.beta2);
  const __m256 decay = _mm256_set1_ps(1.0f - o.lr * o.weight_decay), step = _mm256_set1_ps(o.lr / o.bias_c1);
  const __m256 c2 = _mm256_set1_ps(o.bias_c2_sqrt), eps = _mm256_set1_ps(o.eps);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 pv = _mm256_loadu_ps(p + i);
    __m256 gv = _mm256_mul_ps(sign, _mm256_loadu_ps(g + i));
    const __m256 d = r ? _mm256_sub_ps(pv, _mm256_loadu_ps(r + i)) : pv;
    const __m256 c = w ? _mm256_mul_ps(vc, _mm256_loadu_ps(w + i)) : vc;
    gv = _mm256_fmadd_ps(c, d, gv);
    pv = _mm256_mul_ps(pv, decay);
    const __m256 mm = _mm256_fmadd_ps(b1, _mm256_loadu_ps(m + i), _mm256_mul_ps(nb1, gv));
    const __m256 vv = _mm256_fmadd_ps(b2, _mm256_loadu_ps(v + i), _mm256_mul_ps(_mm256_mul_ps(nb2, gv), gv));
    _mm256_storeu_ps(m + i, mm);
    _mm256_storeu_ps(v + i, vv);
    __m256 second = vv;
    if (vmax) {  // (max_ps returns its second operand where either is NaN: vv's NaN kept, vmax's put back)
      const __m256 old = _mm256_loadu_ps(vmax + i);
      second = _mm256_blendv_ps(_mm256_max_ps(old, vv), old, _mm256_cmp_ps(old, old, _CMP_UNORD_Q));
      _mm256_storeu_ps(vmax + i, second);
    }
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(second), c2), eps);
    _mm256_storeu_ps(p + i, _mm256_sub_ps(pv, _mm256_div_ps(_mm256_mul_ps(step, mm), denom)));
  }
  for (; i < n; ++i) {
    float mm = m[i], vv = v[i];
    p[i] = l2sp::adamw_update<float>(p[i], g[i], r ? r[i] : 0.0f, w ? o.coeff * w[i] : o.coeff, &mm, &vv,
                                     vmax ? vmax + i : nullptr, o.lr,
                                     o.beta1, o.beta2, o.eps, o.weight_decay, o.bias_c1, o.bias_c2_sqrt, o.maximize);
    m[i] = mm;
    v[i] = vv;
  }
}

// exp(x) for x <= 88 (larger x is clamped to 88; the softmax use: x - max <= 0). Below -87.3 the result is flushed to 0 (exp would
// be subnormal: 1e-38 next to a row sum >= 1 is nothing), so -inf logits give exact zeros. NaN stays NaN.
__attribute__((target("avx2,fma"))) inline __m256 exp_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // (operand order: a NaN x passes through)
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
  // 2^n from the exponent bits; n in [-126, 127] after the clamps above
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

// log(x) for positive normal finite x (Cephes logf: exponent split, mantissa in [sqrt(1/2), sqrt(2)), degree-8
// polynomial; about 1 ulp). Callers send other values (0, subnormal, negative, inf, NaN) to std::log.
__attribute__((target("avx2,fma"))) inline __m256 log_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  // mantissa with exponent of 0.5: m in [0.5, 1)
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), one);  // 2m - 1 or m - 1
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// The symmetric-KL expansion of one database row p[0, n): lp[c] = log(p[c] + eps), cp[c] = p[c], and returns
// sum_c w[c] p[c] lp[c] (one float32 vector accumulator: a fixed-order function of the row).
__attribute__((target("avx2,fma"))) inline float skl_expand_row(const float* p, const float* w, float eps, float* lp,
                                                               float* cp, int64_t n) {
  const __m256 ve = _mm256_set1_ps(eps), lo = _mm256_set1_ps(1.17549435e-38f), hi = _mm256_set1_ps(3.40282347e+38f);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + i);
    const __m256 x = _mm256_add_ps(pv, ve);
    // lanes outside the normal positive range (NaN fails both compares) go through std::log
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), _mm256_cmp_ps(x, hi, _CMP_LE_OQ));
    __m256 l;
    if (_mm256_movemask_ps(ok) == 0xFF) {
      l = log_ps(x);
    } else {
      alignas(32) float t[8];
      _mm256_store_ps(t, x);
      for (int k = 0; k < 8; ++k) t[k] = std::log(t[k]);
      l = _mm256_load_ps(t);
    }
    _mm256_storeu_ps(lp + i, l);
    _mm256_storeu_ps(cp + i, pv);
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(w + i), pv), l, acc);
  }
  float s = hsum(acc);
  for (; i < n; ++i) {
    const float l = std::log(p[i] + eps);
    lp[i] = l;
    cp[i] = p[i];
    s += w[i] * p[i] * l;
  }
  return s;
}

// Row max of x[0, n).
__attribute__((target("avx2,fma"))) inline float row_max(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  float r = hmax(m);
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

// e[c] = exp(x[c] - m) (e may be null) and returns sum_c e[c].
__attribute__((target("avx2,fma"))) inline float row_exp_sum(const float* x, float m, float* e, int64_t n) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    if (e) _mm256_storeu_ps(e + i, v);
    s = _mm256_add_ps(s, v);
  }
  float r = hsum(s);
  for (; i < n; ++i) {
    const float v = std::exp(x[i] - m);
    if (e) e[i] = v;
    r += v;
  }
  return r;
}

// g[c] = coef * (g[c] * k - q[c]) in place (q null: one-hot at `label`): turns the stored exp into the
// cross-entropy gradient, k = sum(q) / sum(exp).
__attribute__((target("avx2,fma"))) inline void row_grad(float* g, const float* q, int64_t label, float coef,
                                                         float k, int64_t n) {
  const __m256 vk = _mm256_set1_ps(coef * k), vc = _mm256_set1_ps(coef);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(g + i), vk);
    if (q) v = _mm256_fnmadd_ps(vc, _mm256_loadu_ps(q + i), v);
    _mm256_storeu_ps(g + i, v);
  }
  for (; i < n; ++i) g[i] = g[i] * coef * k - (q ? coef * q[i] : 0.f);
  if (!q && label >= 0 && label < n) g[label] -= coef;
}

}  // namespace avx2
}  // namespace tlkernels
#endif
