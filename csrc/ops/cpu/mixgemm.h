#pragma once
// Per-image gated GEMM on AVX2 + FMA or AVX-512 (float32; AVX-512 BF16 for bfloat16 operands), the small-map
// engine of the gated convolution.
//
// For every image n:  C_n[p][m] = sum_k A_n[k][p] * B_n[k][m],
//                     B_n = (1 - g_n) * Bp + g_n * Bf,
// the gate g_n taken per output column m (forward: one gate per output filter) or per contraction row k
// (input gradient: the gate of output channel k). The blend is linear, so this is exactly the gated
// convolution with one convolution's FLOPs, hard or soft gates alike; for binary gates the blend
// (1-g)*bp + g*bf is exact.
//
// Why our own GEMM: with a gate per image and per filter, each image needs its own weight matrix. Library
// GEMMs would need that matrix materialised per image (C_out*K floats read twice and written once per
// image: more memory traffic than the convolution at 7x7), or one call per image (49 columns: call and
// packing overhead). Here the blended 16-column weight panel is built in L1 inside the GEMM's own loop
// (kc x 16 floats), once per image and reused by all of that image's pixel tiles, and one block of
// images shares each weight panel while it is in cache, so Bp and Bf are read from memory once per image
// block, not once per image.
//
// Layout: micro-kernel 6 pixels x 16 columns (12 accumulators, the classic AVX2 shape: 12 FMAs per
// 8 loads; AVX-512: two tiles of 6 or 7 pixels x two panels); A comes row-major [K][P] per image (im2col rows
// for the forward, written with contiguous row copies; dy itself for the input gradient) and is re-tiled to
// [pixel tile][k][rows] per kc block; B panels of 16 columns, kc = 256 rows (16 KB, stays in L1).
// Binary gates (AVX-512, Selected): no blended panel; the kernel picks each column from the packed Wp or Wf
// panel with a mask. Segments (AVX-512): the contraction split by kernel tap, each tap over the output rows
// it reaches inside the image.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "ops/cpu/avx2.h"

#ifdef TLK_HAVE_AVX2_PATH
namespace tlkernels {
namespace mixgemm {

constexpr int64_t kMR = 6, kNR = 16, kKC = 256;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Calls f(std::integral_constant<int, R>{}) with R = rows (1..6): the micro-kernels below are unrolled per
// row count (accumulators must live in registers).
template <class F>
inline void with_rows(int64_t rows, const F& f) {
  switch (rows) {
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// An R x 16 output tile in registers (two 8-wide halves per row): loaded (accumulating) or zeroed, stored.
template <int R>
__attribute__((target("avx2,fma"))) inline void load_tile(const float* C, int64_t ldc, bool acc, __m256* c0,
                                                          __m256* c1) {
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    c0[r] = acc ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();
    c1[r] = acc ? _mm256_loadu_ps(C + r * ldc + 8) : _mm256_setzero_ps();
  }
}

template <int R>
__attribute__((target("avx2,fma"))) inline void store_tile(float* C, int64_t ldc, const __m256* c0,
                                                           const __m256* c1) {
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(C + r * ldc, c0[r]);
    _mm256_storeu_ps(C + r * ldc + 8, c1[r]);
  }
}

// c[r] += sum_k A[k][r] * B[k][0..16) for r < R: A packed [kc][6] (broadcast), B [kc][16] (32-byte aligned).
template <int R>
__attribute__((target("avx2,fma"))) inline void accumulate(int64_t kc, const float* A, const float* B, __m256* c0,
                                                           __m256* c1) {
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(B + 16 * k), b1 = _mm256_load_ps(B + 16 * k + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + 6 * k + r);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
}

// C[r][0..16) (+)= sum_k A[k][r] * B[k][0..16) for r < R. A is [kc][6], B is [kc][16] (32-byte aligned).
template <int R>
__attribute__((target("avx2,fma"))) inline void micro(int64_t kc, const float* A, const float* B, float* C,
                                                      int64_t ldc, bool acc) {
  __m256 c0[R], c1[R];
  load_tile<R>(C, ldc, acc, c0, c1);
  accumulate<R>(kc, A, B, c0, c1);
  store_tile<R>(C, ldc, c0, c1);
}

// The accumulators of micro512 and micro512_bf16: the R C rows crow[i] (null: a padding row of a tile) of its
// pixel tiles times J 16-column panels, loaded (acc) or zeroed, and stored.
template <int R, int J>
__attribute__((target("avx512f"), always_inline)) inline void load_acc512(float* const* crow, bool acc,
                                                                         __m512 (&c)[J][R]) {
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < J; ++j) c[j][i] = acc && crow[i] ? _mm512_loadu_ps(crow[i] + 16 * j) : _mm512_setzero_ps();
}

template <int R, int J>
__attribute__((target("avx512f"), always_inline)) inline void store_acc512(float* const* crow,
                                                                          const __m512 (&c)[J][R]) {
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < J; ++j)
      if (crow[i]) _mm512_storeu_ps(crow[i] + 16 * j, c[j][i]);
}

// c += broadcast(*a) * b with the broadcast embedded in the FMA's memory operand (a load-unit operation): a
// separate vbroadcastss, which compilers emit when the value feeds two FMAs, also takes an FP pipe on some
// cores, next to the FMAs.
__attribute__((target("avx512f"), always_inline)) inline void fma_bcast(__m512& c, __m512 b, const float* a) {
  asm("vfmadd231ps %[a]%{1to16%}, %[b], %[c]" : [c] "+v"(c) : [b] "v"(b), [a] "m"(*a));
}

// The AVX-512 micro-kernel: T pixel tiles of MR rows (A packed [kc][MR] each; C rows crow) times J 16-column
// panels (B[j] packed [kc][16]; panel j's columns 16 j.. of C): MR T J accumulators of one 512-bit register
// each (at most 28 of the 32 registers); per k, J loads and MR T J FMAs whose broadcasts fold into them,
// against 8 loads for 12 FMAs of half the width in the AVX2 kernel.
// Sel (binary gates per column): panel j's column l is Bf[j]'s where bit l of sel[j] is set, else B[j]'s: a
// mask blend per panel and k, off the FMA ports, instead of a blended panel written per image.
template <int MR, int T, int J, bool Sel = false>
__attribute__((target("avx512f"))) inline void micro512(int64_t kc, const float* const* A, float* const* crow,
                                                        const float* const* B, bool acc,
                                                        const float* const* Bf = nullptr,
                                                        const __mmask16* sel = nullptr) {
  __m512 c[J][MR * T];
  load_acc512<MR * T, J>(crow, acc, c);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b[J];
#pragma GCC unroll 2
    for (int j = 0; j < J; ++j) {
      b[j] = _mm512_loadu_ps(B[j] + 16 * k);
      if constexpr (Sel) b[j] = _mm512_mask_blend_ps(sel[j], b[j], _mm512_loadu_ps(Bf[j] + 16 * k));
    }
#pragma GCC unroll 2
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 7
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < J; ++j) fma_bcast(c[j][MR * t + r], b[j], A[t] + MR * k + r);
  }
  store_acc512<MR * T, J>(crow, c);
}

// Pixel tiles: ceil(P/6) tiles whose sizes differ by at most one (49 = 4x6 + 5x5 rather than 8x6 + 1):
// the micro-kernel needs >= 5 rows (10 accumulators) to cover FMA latency, and a 1-row tile is
// latency-bound (benchmarks/single_thread_512.py measures the 7x7 case).
// mr: the rows of the micro-kernel's tile (kMR; the AVX-512 kernels also take 7: best()).
struct Tiles {
  int64_t count, base, extra, mr;  // tile t has base + (t < extra) rows
  explicit Tiles(int64_t P, int64_t m = kMR) : count((P + m - 1) / m), base(P / count), extra(P % count), mr(m) {}
  // The tile height (6 or 7) with the fewer rows computed in all (49 = 7 x 7 instead of 9 x 6; ties: 6).
  static Tiles best(int64_t P) { return (P + 6) / 7 * 7 < (P + 5) / 6 * 6 ? Tiles(P, 7) : Tiles(P, 6); }
  int64_t rows(int64_t t) const { return base + (t < extra); }
  int64_t start(int64_t t) const { return t * base + std::min(t, extra); }
};

// The bfloat16 twin of micro512 (AVX-512 BF16): A packed [kc/2][MR][2] and B [kc/2][16][2] (pairs of
// consecutive k, bfloat16), one vdpbf16ps per row, panel and pair of k: two products summed into the float32
// accumulator per lane. kc2 = ceil(kc / 2) (an odd kc's last pair is zero padded).
// Sel as in micro512: a column's pair of k is one 32-bit lane, so the mask picks columns here too.
template <int MR, int T, int J, bool Sel = false>
__attribute__((target("avx512f,avx512bf16"))) inline void micro512_bf16(int64_t kc2, const uint16_t* const* A,
                                                                        float* const* crow, const uint16_t* const* B,
                                                                        bool acc, const uint16_t* const* Bf = nullptr,
                                                                        const __mmask16* sel = nullptr) {
  __m512 c[J][MR * T];
  load_acc512<MR * T, J>(crow, acc, c);
  for (int64_t k = 0; k < kc2; ++k) {
    __m512bh b[J];
#pragma GCC unroll 2
    for (int j = 0; j < J; ++j) {
      __m512i v = _mm512_loadu_si512(B[j] + 32 * k);
      if constexpr (Sel) v = _mm512_mask_blend_epi32(sel[j], v, _mm512_loadu_si512(Bf[j] + 32 * k));
      b[j] = (__m512bh)v;
    }
#pragma GCC unroll 2
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 7
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, A[t] + 2 * MR * k + 2 * r, 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 2
        for (int j = 0; j < J; ++j) c[j][MR * t + r] = _mm512_dpbf16_ps(c[j][MR * t + r], a, b[j]);
      }
  }
  store_acc512<MR * T, J>(crow, c);
}

// One pass of micro512 (E = float) or micro512_bf16 (E = uint16_t: bfloat16 pairs) over all the pixel tiles of
// one image (an: its packed tiles, kb rows each), J panels; tiles two at a time (the last alone when odd).
// The output rows a pass of the micro-kernels covers: row i (0 <= i < count()) of the packed A is C row
// (h0 + i / (w1 - w0)) * width + w0 + i % (w1 - w0), a rectangle of the output map (all P rows: h0 = 0,
// h1 = 1, w0 = 0, w1 = width = P). A segment also names its contraction rows [k0, k1).
struct Segment {
  int64_t k0, k1, h0, h1, w0, w1, width;
  static Segment all(int64_t K, int64_t P) { return {0, K, 0, 1, 0, P, P}; }
  int64_t count() const { return (h1 - h0) * (w1 - w0); }
  int64_t row(int64_t i) const { return (h0 + i / (w1 - w0)) * width + w0 + i % (w1 - w0); }
};

// One pass of micro512 (E = float) or micro512_bf16 (E = uint16_t: bfloat16 pairs) over all the pixel tiles of
// one image (an: its packed tiles, kb rows each; C rows as sg maps them, ldc apart), J panels; tiles two at a
// time (the last alone when odd). Sel: columns picked from B or Bf by sel (see micro512).
template <int J, bool Sel, class E>
inline void micro512_tiles(int64_t kb, const E* an, const Tiles& tl, const Segment& sg, const E* const* B,
                           float* cn, int64_t ldc, bool acc, const E* const* Bf, const __mmask16* sel) {
  constexpr bool bf = std::is_same_v<E, uint16_t>;
  const int64_t stride = (bf ? round_up(kb, 2) : kb) * tl.mr;
  auto tiles = [&](auto MRc) {
    constexpr int MR = decltype(MRc)::value;
    for (int64_t t = 0; t < tl.count; t += 2) {
      const E* a[2] = {an + t * stride, an + (t + 1) * stride};
      const bool two = t + 1 < tl.count;
      float* crow[2 * MR];
      for (int u = 0; u < 2; ++u) {
        const int64_t rows = t + u < tl.count ? tl.rows(t + u) : 0, start = t + u < tl.count ? tl.start(t + u) : 0;
        for (int64_t r = 0; r < MR; ++r) crow[MR * u + r] = r < rows ? cn + sg.row(start + r) * ldc : nullptr;
      }
      if constexpr (bf) {
        if (two) micro512_bf16<MR, 2, J, Sel>((kb + 1) / 2, a, crow, B, acc, Bf, sel);
        else micro512_bf16<MR, 1, J, Sel>((kb + 1) / 2, a, crow, B, acc, Bf, sel);
      } else {
        if (two) micro512<MR, 2, J, Sel>(kb, a, crow, B, acc, Bf, sel);
        else micro512<MR, 1, J, Sel>(kb, a, crow, B, acc, Bf, sel);
      }
    }
  };
  if (tl.mr == 7)
    tiles(std::integral_constant<int, 7>{});
  else
    tiles(std::integral_constant<int, 6>{});
}

// Rows [0, kb) of a row-major [kb][P] matrix (row stride lda) as [tile][kb][mr], zero padded: each
// micro-kernel call then streams one contiguous 6 KB tile (a strided A is slower: more cache lines and TLB
// entries per call).
inline void retile(const float* src, int64_t lda, const Tiles& tl, int64_t kb, float* dst) {
  const int64_t mr = tl.mr;
  for (int64_t t = 0; t < tl.count; ++t) {
    const int64_t r = tl.rows(t);
    const float* s = src + tl.start(t);
    if (r == mr) {
      for (int64_t k = 0; k < kb; ++k, s += lda, dst += mr)
        for (int64_t i = 0; i < mr; ++i) dst[i] = s[i];
    } else {
      for (int64_t k = 0; k < kb; ++k, s += lda, dst += mr)
        for (int64_t i = 0; i < mr; ++i) dst[i] = i < r ? s[i] : 0.f;
    }
  }
}

// retile's bfloat16 twin for micro512_bf16: [tile][kb2][mr][2], pairs of consecutive k per pixel, zero padded
// (pixels past a tile's rows, and an odd kb's last k), rounded to nearest even (exact for values that were
// bfloat16 before). Each pair of rows is written as 16 values of which 2 mr belong to it: dst needs 4 values
// of room past its end.
__attribute__((target("avx512f,avx512bf16"))) inline void retile_bf16(const float* src, int64_t lda, const Tiles& tl,
                                                                      int64_t kb, uint16_t* dst) {
  const __m512i idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  for (int64_t t = 0; t < tl.count; ++t) {
    const __mmask16 m = static_cast<__mmask16>((1u << tl.rows(t)) - 1);
    const float* s = src + tl.start(t);
    for (int64_t k = 0; k < kb; k += 2, dst += 2 * tl.mr) {
      const __m512 r0 = _mm512_maskz_loadu_ps(m, s + k * lda);
      const __m512 r1 = k + 1 < kb ? _mm512_maskz_loadu_ps(m, s + (k + 1) * lda) : _mm512_setzero_ps();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(_mm512_permutex2var_ps(r0, idx, r1)));
    }
  }
}

// r[i] <- column i of the 8 x 8 block whose rows are r[0..8): pairs, quads, then 128-bit halves.
__attribute__((target("avx2,fma"), always_inline)) inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // column i from u[i] (rows 0-3) and u[i + 4] (rows 4-7), column i + 4 likewise
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// dst[m * ldd + p] = src[p * lds + m] (+ bias[m] when bias is not null) for p < P, m < M, in 8 x 8 blocks
// transposed in registers. Reading src a column at a time walks it with a stride of lds floats: with lds a
// multiple of 512 every such line falls into the same two L1 sets, and each read missed L1.
__attribute__((target("avx2,fma"))) inline void transpose_out(const float* src, int64_t lds, int64_t P, int64_t M,
                                                              const float* bias, float* dst, int64_t ldd) {
  int64_t p0 = 0;
  for (; p0 + 8 <= P; p0 += 8) {  // 8 source rows stream forward together; M columns in steps of 8
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) {
      __m256 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (p0 + i) * lds + m0);
      transpose8(r);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m256 v = bias ? _mm256_add_ps(r[i], _mm256_set1_ps(bias[m0 + i])) : r[i];
        _mm256_storeu_ps(dst + (m0 + i) * ldd + p0, v);
      }
    }
    for (; m0 < M; ++m0)
      for (int64_t p = p0; p < p0 + 8; ++p) dst[m0 * ldd + p] = src[p * lds + m0] + (bias ? bias[m0] : 0.f);
  }
  for (; p0 < P; ++p0)
    for (int64_t m = 0; m < M; ++m) dst[m * ldd + p0] = src[p0 * lds + m] + (bias ? bias[m] : 0.f);
}

// One 16-column B panel from up to 16 rows of a row-major weight: dst[row_of(m) * 16 + l] = src[l * lds + m]
// for l < rows (<= 16), zero for rows <= l < 16, m < M (row_of: the panel row of weight column m, a
// permutation of [0, M)). The rows are read forward 8 at a time and transposed in registers: a column at a
// time, the reads would walk 16 rows with a stride of lds.
template <class RowOf>
__attribute__((target("avx2,fma"))) inline void panel_from_rows(const float* src, int64_t lds, int64_t rows,
                                                                int64_t M, float* dst, const RowOf& row_of) {
  int64_t m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) {
    int64_t at[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) at[i] = row_of(m0 + i) * 16;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // rows [8h, 8h + 8): half h of each panel row
      __m256 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i)
        r[i] = 8 * h + i < rows ? _mm256_loadu_ps(src + (8 * h + i) * lds + m0) : _mm256_setzero_ps();
      transpose8(r);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + at[i] + 8 * h, r[i]);
    }
  }
  for (; m0 < M; ++m0) {
    float* d = dst + row_of(m0) * 16;
    for (int64_t l = 0; l < 16; ++l) d[l] = l < rows ? src[l * lds + m0] : 0.f;
  }
}

// Where the 16 floats of B panel j, row k live: src + j * panel_stride + k * row_stride; `valid` (<= 16)
// of them exist (the rest read as zero: masked load, never past the caller's buffer).
struct BSource {
  const float* pre;
  const float* ft;
  int64_t panel_stride, row_stride;
};

// Binary gates per column, for the AVX-512 micro-kernels: Wp and Wf packed once in the micro-kernel's own
// B layout (float32 [panel][K][16], or bfloat16 pairs [panel][ceil(K/2)][16][2] for Micro::Bf16; panel_stride
// elements apart), the kernel picking each column from one or the other (no blended panel per image).
// Soft gates (binary = false; bfloat16 pair panels only): the panels are blended per image instead
// (blend_pairs_bf16), still read as packed.
struct Selected {
  const void* pre;
  const void* ft;
  int64_t panel_stride;
  bool binary = true;
};

__attribute__((target("avx2,fma"))) inline __m256 load16(const float* p, int valid, int half) {
  const int v = valid - 8 * half;
  if (v >= 8) return _mm256_loadu_ps(p + 8 * half);
  if (v <= 0) return _mm256_setzero_ps();
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(v), idx);
  return _mm256_maskload_ps(p + 8 * half, mask);
}

// Bmix[k][0..16) for rows [k0, k0 + kb) of panel j; gate per column (gcol: 16 floats) or per row (grow + k0).
__attribute__((target("avx2,fma"))) inline void blend_panel(const BSource& s, int64_t j, int valid, int64_t k0,
                                                            int64_t kb, const float* gcol, const float* grow,
                                                            float* bmix) {
  const float* pp = s.pre + j * s.panel_stride + k0 * s.row_stride;
  const float* pf = s.ft + j * s.panel_stride + k0 * s.row_stride;
  const __m256 one = _mm256_set1_ps(1.f);
  __m256 g0 = _mm256_setzero_ps(), g1 = g0, h0 = g0, h1 = g0;
  if (gcol) {
    g0 = _mm256_loadu_ps(gcol);
    g1 = _mm256_loadu_ps(gcol + 8);
    h0 = _mm256_sub_ps(one, g0);
    h1 = _mm256_sub_ps(one, g1);
  }
  for (int64_t k = 0; k < kb; ++k, pp += s.row_stride, pf += s.row_stride) {
    if (grow) {
      g0 = g1 = _mm256_set1_ps(grow[k0 + k]);
      h0 = h1 = _mm256_sub_ps(one, g0);
    }
    const __m256 p0 = load16(pp, valid, 0), p1 = load16(pp, valid, 1);
    const __m256 f0 = load16(pf, valid, 0), f1 = load16(pf, valid, 1);
    _mm256_store_ps(bmix + 16 * k, _mm256_fmadd_ps(g0, f0, _mm256_mul_ps(h0, p0)));
    _mm256_store_ps(bmix + 16 * k + 8, _mm256_fmadd_ps(g1, f1, _mm256_mul_ps(h1, p1)));
  }
}

// The micro-kernel of run(): ours (6 x 16 AVX2 + FMA tiles, or AVX-512 where allowed), oneDNN's BRGeMM
// ukernel through ATen (at::native::cpublas::brgemm, JIT-generated for the running CPU: AVX2, AVX-512, ...;
// one call per image and 16-column panel over all its pixels, A read row-major as [P][kc]), ours on
// bfloat16 operands with float32 sums (AVX-512 BF16: A and the blended B rounded to bfloat16), or oneDNN's
// on those bfloat16 operands (B as the blended pairs, oneDNN's VNNI layout; AMX tiles where the CPU has them).
enum class Micro { Avx2, Brgemm, Bf16, Bf16Brgemm };
inline bool is_brgemm(Micro k) { return k == Micro::Brgemm || k == Micro::Bf16Brgemm; }
inline bool is_bf16(Micro k) { return k == Micro::Bf16 || k == Micro::Bf16Brgemm; }

// Whether oneDNN's BRGeMM ukernel runs bfloat16 operands with VNNI-packed B on this CPU, as ATen's build and
// oneDNN's ISA cap allow (ATen raises where it does not): one tiny call, once per process.
inline bool brgemm_bf16_available() {
  static const bool ok = [] {
    if (!avx512::bf16_available()) return false;
    try {
      const c10::BFloat16 a[2] = {c10::BFloat16(1.f), c10::BFloat16(2.f)};
      c10::BFloat16 b[2 * kNR];
      for (int64_t i = 0; i < 2 * kNR; ++i) b[i] = c10::BFloat16(static_cast<float>(i % 2 + 1));
      float c[kNR];
      at::native::cpublas::brgemm(1, kNR, 2, 2, kNR, kNR, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      return c[0] == 5.f && c[kNR - 1] == 5.f;  // (1 * 1 + 2 * 2 in every column)
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// (1 - g) * p + g * f for one panel row (m: its valid columns)
__attribute__((target("avx512f"))) inline __m512 blend_row512(const float* p, const float* f, __m512 g, __mmask16 m) {
  const __m512 pv = _mm512_maskz_loadu_ps(m, p), fv = _mm512_maskz_loadu_ps(m, f);
  return _mm512_fmadd_ps(g, fv, _mm512_mul_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), g), pv));
}

// The [16][2] pairs of one panel row pair from its two rows' float32 values: each rounded to bfloat16 (nearest
// even), the even row's in the low half of each 32-bit lane.
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) inline __m512i pair_rows_bf16(__m512 even, __m512 odd) {
  const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even));
  return _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd)), 16));
}

// blend_panel's bfloat16 twin for micro512_bf16's B, gates per column (row gates on bfloat16 weights:
// RowPick): the blend in float32, written as [kb2][16][2] bfloat16 (pairs of consecutive k per column, an odd
// kb's last pair zero padded), rounded to nearest even.
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) inline void blend_panel_bf16(const BSource& s, int64_t j, int valid,
                                                                           int64_t k0, int64_t kb, const float* gcol,
                                                                           uint16_t* dst) {
  const __mmask16 m = valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
  const float* pp = s.pre + j * s.panel_stride + k0 * s.row_stride;
  const float* pf = s.ft + j * s.panel_stride + k0 * s.row_stride;
  const __m512 gc = _mm512_loadu_ps(gcol);
  for (int64_t k = 0; k < kb; k += 2, dst += 32) {
    const __m512 r0 = blend_row512(pp + k * s.row_stride, pf + k * s.row_stride, gc, m);
    const __m512 r1 = k + 1 < kb ? blend_row512(pp + (k + 1) * s.row_stride, pf + (k + 1) * s.row_stride, gc, m)
                                 : _mm512_setzero_ps();
    _mm512_storeu_si512(dst, pair_rows_bf16(r0, r1));
  }
}

// Gates per contraction row on bfloat16 weights (the input gradient's: one gate per output channel): the
// weights as they are, [Kd][M] bfloat16 with row stride ld; pick_rows_bf16 (binary gates) or blend_rows_bf16
// builds an image's panel from them.
struct RowPick {
  const uint16_t* pre;
  const uint16_t* ft;
  int64_t ld;
  bool binary;
};

// blend_panel_bf16 for binary row gates: rows [k0, k0 + kb) of panel j, each row's 16 values taken from r.pre
// or r.ft by its gate (grow[k] != 0: ft) and interleaved into pairs [kb2][16][2] (an odd kb's last pair zero):
// two 32-byte loads per pair of rows, no float32 arithmetic.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void pick_rows_bf16(const RowPick& r, int64_t j, int valid,
                                                                               int64_t k0, int64_t kb,
                                                                               const float* grow, uint16_t* dst) {
  const __mmask16 m = valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
  for (int64_t k = k0; k < k0 + kb; k += 2, dst += 32) {  // (each row's 16 values in the 32-bit lanes' halves)
    const uint16_t* r0 = (grow[k] != 0.f ? r.ft : r.pre) + k * r.ld + j * kNR;
    const __m512i lo = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(m, r0));
    __m512i hi = _mm512_setzero_si512();
    if (k + 1 < k0 + kb) {
      const uint16_t* r1 = (grow[k + 1] != 0.f ? r.ft : r.pre) + (k + 1) * r.ld + j * kNR;
      hi = _mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(m, r1)), 16);
    }
    _mm512_storeu_si512(dst, _mm512_or_si512(lo, hi));
  }
}

// blend_panel_bf16 for gates per column from the pair panels of Selected (k0 even): each pair of rows widened
// to float32 (exact), blended, and rounded again: half the bytes of the float32 panels, and no float32 copy
// of the weights. Values equal blend_panel_bf16's.
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) inline void blend_pairs_bf16(const Selected& s, int64_t j,
                                                                                            int64_t k0, int64_t kb,
                                                                                            const float* gcol,
                                                                                            uint16_t* dst) {
  const uint16_t* pp = static_cast<const uint16_t*>(s.pre) + j * s.panel_stride + k0 * kNR;
  const uint16_t* pf = static_cast<const uint16_t*>(s.ft) + j * s.panel_stride + k0 * kNR;
  const __m512 g = _mm512_loadu_ps(gcol), h = _mm512_sub_ps(_mm512_set1_ps(1.f), g);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < kb; k += 2, pp += 2 * kNR, pf += 2 * kNR, dst += 2 * kNR) {
    const __m512i p = _mm512_loadu_si512(pp), f = _mm512_loadu_si512(pf);
    const __m512 even = _mm512_fmadd_ps(g, _mm512_castsi512_ps(_mm512_slli_epi32(f, 16)),
                                        _mm512_mul_ps(h, _mm512_castsi512_ps(_mm512_slli_epi32(p, 16))));
    const __m512 odd = k + 1 < kb ? _mm512_fmadd_ps(g, _mm512_castsi512_ps(_mm512_and_si512(f, high)),
                                                    _mm512_mul_ps(h, _mm512_castsi512_ps(_mm512_and_si512(p, high))))
                                  : _mm512_setzero_ps();
    _mm512_storeu_si512(dst, pair_rows_bf16(even, odd));
  }
}

// Row k of panel j of RowPick r blended by gate g, as float32 (m: the panel's valid columns).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 blend_row_bf16(const RowPick& r, int64_t j,
                                                                                 __mmask16 m, int64_t k, float g) {
  const int64_t at = k * r.ld + j * kNR;
  const __m512 p = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r.pre + at)), 16));
  const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r.ft + at)), 16));
  const __m512 gv = _mm512_set1_ps(g);
  return _mm512_fmadd_ps(gv, f, _mm512_mul_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), gv), p));
}

// blend_panel_bf16 for gates per row from the bfloat16 weights as they are (RowPick): rows widened exactly,
// blended in float32, rounded once; values equal blend_panel_bf16's on float32 copies.
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) inline void blend_rows_bf16(const RowPick& r, int64_t j,
                                                                                           int valid, int64_t k0,
                                                                                           int64_t kb, const float* grow,
                                                                                           uint16_t* dst) {
  const __mmask16 m = valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
  for (int64_t k = k0; k < k0 + kb; k += 2, dst += 2 * kNR) {
    const __m512 odd = k + 1 < k0 + kb ? blend_row_bf16(r, j, m, k + 1, grow[k + 1]) : _mm512_setzero_ps();
    _mm512_storeu_si512(dst, pair_rows_bf16(blend_row_bf16(r, j, m, k, grow[k]), odd));
  }
}

// dst[i] = src[i] (+ bias[i] where bias is not null) rounded to bfloat16 (nearest even), i < n.
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) inline void store_bf16(const float* src,
                                                                                      const float* bias, int64_t n,
                                                                                      uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + i));
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// Rows [0, kb) of a row-major [kb][P] matrix (row stride lda) as [P][ld]: brgemm's row-major A (E = float,
// or c10::BFloat16: each value rounded to nearest even; columns [kb, ld) zero).
template <class E = float>
inline void transpose_rows(const float* src, int64_t lda, int64_t P, int64_t kb, E* dst, int64_t ld) {
  constexpr int64_t kBlock = 16;  // 16 pixels x kb: the writes of one block stay in a few cache lines per k
  for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
    const int64_t p1 = std::min(P, p0 + kBlock);
    for (int64_t k = 0; k < kb; ++k) {
      const float* s = src + k * lda;
      for (int64_t p = p0; p < p1; ++p) dst[p * ld + k] = static_cast<E>(s[p]);
    }
    for (int64_t k = kb; k < ld; ++k)
      for (int64_t p = p0; p < p1; ++p) dst[p * ld + k] = static_cast<E>(0.f);
  }
}

// Per-thread scratch that lives across calls (grow-only): a fresh buffer per call came back from the OS as
// new pages (page faults and zeroing on every call).
inline float* scratch(int slot, size_t n) {
  thread_local std::vector<float> bufs[6];  // slots 0-3: the GEMM loops; 4-5: their consumers
  std::vector<float>& v = bufs[slot];
  if (v.size() < n) v.resize(n);
  return v.data();
}

// A writer of an image's packed A tiles for the AVX-512 micro-kernels itself (pack_tiles(n, k0, kb, tiles, dst)
// -> whether it did; dst: float32 or bfloat16 pairs): for inputs whose k are adjacent in memory, which need no
// float32 rows (see run()).
using PackTiles = std::function<bool(int64_t, int64_t, int64_t, const Tiles&, void*)>;

// Runs the per-image gated GEMM over images [0, N).
//   P: rows (pixels) per image, Kd: contraction length, M: output columns.
//   gates: [N][gate_ld] float32 (gate_ld >= round_up(M, 16) when per column, zero padded; >= Kd per row).
//   pack_a(n, k0, kb, buf, lda) -> const float*: rows [k0, k0+kb) of A_n ([K][P] with row stride lda):
//   either a pointer into the caller's tensor (dy, a 1x1 conv's input: no copy) or im2col rows written
//   to buf (room for kb * P floats); run() re-tiles them.
//   consume(n, C): C is [P][round_up(M, 16)], the finished result of image n.
// Images are processed in blocks: each block's weight panels are blended from Bp/Bf while they are in
// cache, and the block's packed A (kb rows) stays in L2. Blocks are spread over ATen's thread pool; with
// fewer blocks than threads, each block's panels are split among tasks too (then consume runs once all are done).
//   sel: gates per column, Wp and Wf already packed (see Selected): binary gates (0 or 1) pick columns, soft
//   ones (bfloat16 pair panels) blend them per image; only where the AVX-512 micro-kernels run; then b is not
//   read.
//   pack_tiles: where it returns true, it has written the image's packed tiles (retile's or retile_bf16's
//   layout, with 2 floats of room past the end) and pack_a is not called for them; AVX-512 kernels only.
//   segs: the contraction in segments, each with the output rows it reaches (a convolution's kernel taps: a
//   tap on the padding reaches fewer pixels, whose rows alone are packed and multiplied); only where the
//   AVX-512 micro-kernels run; pack_a then writes the segment's rows ([kb][count()], lda = count()).
//   Without: one segment of all rows.
template <class PackA, class Consume>
void run(int64_t N, int64_t P, int64_t Kd, int64_t M, const BSource& b, const float* gates, int64_t gate_ld,
         bool gate_per_column, const PackA& pack_a, const Consume& consume, Micro kernel = Micro::Avx2,
         const Selected* sel = nullptr, const std::vector<Segment>* segs = nullptr, const RowPick* pick = nullptr,
         const PackTiles* pack_tiles = nullptr) {
  const bool brg = is_brgemm(kernel), bf = is_bf16(kernel), wide = !brg && avx512::available();
  TORCH_CHECK(!bf || avx512::bf16_available(), "gated_conv2d: internal error: bfloat16 engine without AVX-512 BF16");
  TORCH_CHECK(kernel != Micro::Bf16Brgemm || brgemm_bf16_available(),
              "gated_conv2d: internal error: bfloat16 BRGeMM where oneDNN has none");
  TORCH_CHECK(!sel || (wide && gate_per_column), "gated_conv2d: internal error: column selection needs AVX-512");
  TORCH_CHECK(!sel || sel->binary || bf, "gated_conv2d: internal error: blended pair panels are bfloat16");
  TORCH_CHECK(!segs || wide, "gated_conv2d: internal error: contraction segments need AVX-512");
  TORCH_CHECK(!pick || (bf && !gate_per_column), "gated_conv2d: internal error: row picks are for bfloat16 rows");
  TORCH_CHECK(!bf || gate_per_column || pick, "gated_conv2d: internal error: bfloat16 row gates need RowPick");
  const std::vector<Segment> whole{Segment::all(Kd, P)};
  const std::vector<Segment>& sgs = segs ? *segs : whole;
  const int64_t step = wide ? 2 : 1;  // panels per pass of the micro-kernel (AVX-512: two, 32 columns)
  const int64_t tiles = Tiles(P).count, Mp = round_up(M, kNR), panels = Mp / kNR;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // About 256 pixels per block (A block of kc rows: <= 256 KB), a multiple of the thread count of blocks.
  int64_t nblk = threads * std::max<int64_t>(1, (N * P + 256 * threads - 1) / (256 * threads));
  nblk = std::min(nblk, N);
  const int64_t nb = (N + nblk - 1) / nblk, blocks = (N + nb - 1) / nb;
  // Fewer image blocks than threads (small batches, as in serving): each block's passes over the panels are
  // split among tasks too, each task packing its images' A itself (a small part of a pass's work); the tasks
  // then write one shared C, consumed once all are done.
  const int64_t passes = (panels + step - 1) / step;
  const int64_t groups = blocks < threads ? std::max<int64_t>(1, std::min(threads / blocks, passes)) : 1;
  at::Tensor shared_c;
  if (groups > 1)  // (segments reach subsets of the rows: zeros)
    shared_c = segs ? at::zeros({N * P * Mp}, at::kFloat) : at::empty({N * P * Mp}, at::kFloat);
  at::parallel_for(0, blocks * groups, 1, [&](int64_t task0, int64_t task1) {
    float* rows = scratch(0, kKC * P + 8);
    float* apack = scratch(1, nb * (brg ? P * kKC : tiles * kKC * kMR) + 8);
    float* own_c = groups > 1 ? nullptr : scratch(2, nb * P * Mp + 8);
    float* bstore = scratch(3, step * kKC * kNR + 8);
    float* bmix = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bstore) + 31) & ~uintptr_t(31));
    uint16_t* bmix16 = reinterpret_cast<uint16_t*>(bmix);  // (bfloat16 panels: the same room, half of it)
    uint16_t* apack16 = reinterpret_cast<uint16_t*>(apack);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t blk = task / groups, group = task % groups;
      const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb);
      const int64_t j_begin = group * passes / groups * step;  // (this task's panels)
      const int64_t j_end = std::min(panels, (group + 1) * passes / groups * step);
      float* cbuf = groups > 1 ? shared_c.data_ptr<float>() + n0 * P * Mp : own_c;
      if (segs && groups == 1) std::fill(cbuf, cbuf + (n1 - n0) * P * Mp, 0.f);  // (as shared_c's zeros)
      for (const Segment& sg : sgs)
      for (int64_t k0 = sg.k0; k0 < sg.k1; k0 += kKC) {
        const int64_t kb = std::min(kKC, sg.k1 - k0), kb2 = round_up(kb, 2), R = sg.count();
        const bool acc = segs || k0 > 0;
        const Tiles tl = wide ? Tiles::best(R) : Tiles(R);  // (7-row tiles: the AVX-512 kernels only)
        // (one image's packed A, in elements: float32, or bfloat16 pairs of k)
        const int64_t per_image = tiles * (bf ? kb2 : kb) * kMR;
        for (int64_t n = n0; n < n1; ++n) {
          if (wide && pack_tiles &&
              (*pack_tiles)(n, k0, kb, tl, bf ? static_cast<void*>(apack16 + (n - n0) * per_image)
                                              : static_cast<void*>(apack + (n - n0) * per_image)))
            continue;
          int64_t lda = R;
          const float* a = pack_a(n, k0, kb, rows, lda);
          if (brg && bf)  // (kb rounded up to pairs: the VNNI B's)
            transpose_rows(a, lda, P, kb, reinterpret_cast<c10::BFloat16*>(apack16) + (n - n0) * P * kb2, kb2);
          else if (bf)
            retile_bf16(a, lda, tl, kb, apack16 + (n - n0) * per_image);
          else if (brg)
            transpose_rows(a, lda, P, kb, apack + (n - n0) * P * kb, kb);
          else
            retile(a, lda, tl, kb, apack + (n - n0) * per_image);
        }
        for (int64_t j = j_begin; j < j_end; j += step) {
          const int64_t jn = std::min(step, panels - j);  // panels in this pass
          for (int64_t n = n0; n < n1; ++n) {
            const float* gn = gates + n * gate_ld;
            float* cn = cbuf + (n - n0) * P * Mp + j * kNR;
            auto blend = [&] {  // this image's panels of the pass, blended into bmix (bmix16)
              for (int64_t i = 0; i < jn; ++i) {
                const int valid = static_cast<int>(std::min<int64_t>(kNR, M - (j + i) * kNR));
                const float* gcol = gate_per_column ? gn + (j + i) * kNR : nullptr;
                const float* grow = gate_per_column ? nullptr : gn;
                if (pick && pick->binary)
                  pick_rows_bf16(*pick, j + i, valid, k0, kb, grow, bmix16 + i * kKC * kNR);
                else if (pick)
                  blend_rows_bf16(*pick, j + i, valid, k0, kb, grow, bmix16 + i * kKC * kNR);
                else if (sel)  // (soft gates on bfloat16 pair panels)
                  blend_pairs_bf16(*sel, j + i, k0, kb, gcol, bmix16 + i * kKC * kNR);
                else if (bf)
                  blend_panel_bf16(b, j + i, valid, k0, kb, gcol, bmix16 + i * kKC * kNR);
                else
                  blend_panel(b, j + i, valid, k0, kb, gcol, grow, bmix + i * kKC * kNR);
              }
            };
            if (wide) {  // (bf implies wide) E: float32, or bfloat16 pairs
              // The pass's two panels: Wp's and Wf's as packed, each column picked by the gates' mask (sel; a
              // panel whose 16 gates agree runs the plain kernel on one of them), or this image's blend.
              auto pass = [&](auto zero) {
                using E = decltype(zero);
                const E* bp[2];
                const E* bq[2];
                __mmask16 m[2] = {0, 0};
                bool mixed = false;
                if (sel && sel->binary) {
                  for (int64_t i = 0; i < jn; ++i) {
                    for (int l = 0; l < kNR; ++l) m[i] |= static_cast<__mmask16>(gn[(j + i) * kNR + l] != 0.f) << l;
                    mixed |= m[i] != 0 && m[i] != 0xFFFF;
                  }
                  for (int64_t i = 0; i < 2; ++i) {  // (row k0 of a panel: k0 * 16 elements in either layout)
                    const int64_t off = (j + std::min(i, jn - 1)) * sel->panel_stride + k0 * kNR;
                    bq[i] = static_cast<const E*>(sel->ft) + off;
                    bp[i] = !mixed && m[i] ? bq[i] : static_cast<const E*>(sel->pre) + off;
                  }
                } else {
                  blend();
                  const E* bm = reinterpret_cast<const E*>(bmix);
                  bp[0] = bq[0] = bm;
                  bp[1] = bq[1] = bm + kKC * kNR;
                }
                const E* an = reinterpret_cast<const E*>(apack) + (n - n0) * per_image;
                if (mixed) {
                  if (jn == 2) micro512_tiles<2, true>(kb, an, tl, sg, bp, cn, Mp, acc, bq, m);
                  else micro512_tiles<1, true>(kb, an, tl, sg, bp, cn, Mp, acc, bq, m);
                } else {
                  if (jn == 2) micro512_tiles<2, false>(kb, an, tl, sg, bp, cn, Mp, acc, bq, m);
                  else micro512_tiles<1, false>(kb, an, tl, sg, bp, cn, Mp, acc, bq, m);
                }
              };
              if (bf)
                pass(uint16_t{0});
              else
                pass(0.f);
              continue;
            }
            blend();
            if (brg && bf) {  // C[P][16] (+)= A[P][kb2] B[kb2 / 2][16][2], C's rows Mp apart
              at::native::cpublas::brgemm(P, kNR, kb2, kb2, kNR, Mp, k0 > 0,
                                          reinterpret_cast<const c10::BFloat16*>(apack16) + (n - n0) * P * kb2,
                                          reinterpret_cast<const c10::BFloat16*>(bmix16), cn, true);
              continue;
            }
            if (brg) {  // C[P][16] (+)= A[P][kb] B[kb][16], C's rows Mp apart
              at::native::cpublas::brgemm(P, kNR, kb, kb, kNR, Mp, k0 > 0, apack + (n - n0) * P * kb, bmix, cn,
                                          false);
              continue;
            }
            const float* an = apack + (n - n0) * per_image;
            for (int64_t t = 0; t < tiles; ++t)
              with_rows(tl.rows(t), [&](auto R) {
                micro<R>(kb, an + t * kb * kMR, bmix, cn + tl.start(t) * Mp, Mp, k0 > 0);
              });
          }
        }
      }
      if (groups == 1)
        for (int64_t n = n0; n < n1; ++n) consume(n, cbuf + (n - n0) * P * Mp);
    }
    if (brg) at::native::cpublas::brgemm_release(bf);  // (the ukernel's per-thread hardware context)
  });
  if (groups > 1)
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) consume(n, shared_c.data_ptr<float>() + n * P * Mp);
    });
}

// ---------------------------------------------------------------------------------------------------
// Hard-gate engine for maps of one 16-pixel tile (4x4; the caller decides where it pays).
// With binary gates the weight row of filter c for image n is simply Wp[c] or Wf[c]: choosing a row
// pointer costs nothing, so this engine vectorises over pixels (16 per tile, two AVX2 vectors) and
// broadcasts weights from six selected rows of the raw [C][K] weights: no weight packing, no blend, no
// re-tiling. At 4x4 (ResNet-18's last stage at 112x112 input) the blend and packing of the engine above
// were a third of the time. Rows are padded to a multiple of 16 pixels (the padding's results are
// discarded).

// C[r][0..16) (+)= sum_k W_r[k] * A[k*lda + 0..16) for r < R.
template <int R>
__attribute__((target("avx2,fma"))) inline void micro_rows_pv(int64_t kc, const float* A, int64_t lda,
                                                              const float* const* w, float* C, int64_t ldc,
                                                              bool acc) {
  __m256 c0[R], c1[R];
  const float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w[r];
  load_tile<R>(C, ldc, acc, c0, c1);
  for (int64_t k = 0; k < kc; ++k, A += lda) {
    const __m256 a0 = _mm256_loadu_ps(A), a1 = _mm256_loadu_ps(A + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(wr[r] + k);
      c0[r] = _mm256_fmadd_ps(b, a0, c0[r]);
      c1[r] = _mm256_fmadd_ps(b, a1, c1[r]);
    }
  }
  store_tile<R>(C, ldc, c0, c1);
}


// For every image n: C_n[m][p] = sum_k W_{sel(n,m)}[m][k] * A_n[k][p], sel = gate[n][m] >= 0.5 (Wf) or not
// (Wp); Wp, Wf row-major [M][Kd]. pack_a as for run(), but rows must be readable up to round_up(P, 16)
// (the buffer offered has lda = round_up(P, 16), zero padded); consume(n, C, ldc) gets C as [M][ldc].
template <class PackA, class Consume>
void run_hard_rows(int64_t N, int64_t P, int64_t Kd, int64_t M, const float* wp, const float* wf,
                   const float* gates, int64_t gate_ld, const PackA& pack_a, const Consume& consume) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nblk = threads * std::max<int64_t>(1, (N * P + 256 * threads - 1) / (256 * threads));
  nblk = std::min(nblk, N);
  const int64_t nb = (N + nblk - 1) / nblk, blocks = (N + nb - 1) / nb, P16 = round_up(P, 16);
  at::parallel_for(0, blocks, 1, [&](int64_t blo, int64_t bhi) {
    float* rows = scratch(0, nb * kKC * P16 + 8);
    float* cbuf = scratch(2, nb * M * P16 + 8);
    std::vector<const float*> a(nb);
    std::vector<int64_t> lda(nb);
    const float* w[kMR];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb);
      for (int64_t k0 = 0; k0 < Kd; k0 += kKC) {
        const int64_t kb = std::min(kKC, Kd - k0);
        for (int64_t n = n0; n < n1; ++n) {
          float* buf = rows + (n - n0) * kb * P16;
          for (int64_t kk = 0; kk < kb && P16 > P; ++kk) std::fill(buf + kk * P16 + P, buf + (kk + 1) * P16, 0.f);
          lda[n - n0] = P16;
          a[n - n0] = pack_a(n, k0, kb, buf, lda[n - n0]);
        }
        for (int64_t m0 = 0; m0 < M; m0 += kMR) {  // six filters' rows stay in L1 across the block's images
          const int64_t r = std::min(kMR, M - m0);
          for (int64_t n = n0; n < n1; ++n) {
            const float* gn = gates + n * gate_ld;
            for (int i = 0; i < r; ++i) w[i] = (gn[m0 + i] >= 0.5f ? wf : wp) + (m0 + i) * Kd + k0;
            float* cn = cbuf + (n - n0) * M * P16 + m0 * P16;
            for (int64_t p0 = 0; p0 < P; p0 += 16)
              with_rows(r, [&](auto R) { micro_rows_pv<R>(kb, a[n - n0] + p0, lda[n - n0], w, cn + p0, P16, k0 > 0); });
          }
        }
      }
      for (int64_t n = n0; n < n1; ++n) consume(n, cbuf + (n - n0) * M * P16, P16);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Weight side of the backward with a gate gradient. Per image n the weight gradient of its blended filters
// is T_n[c][k] = sum_p dy_n[c][p] * X_n[k][p] (X: im2col). Everything the backward needs follows from it:
//   dWf[c][k] = sum_n g[n][c] T_n[c][k],  dWp[c][k] = sum_n (1 - g[n][c]) T_n[c][k],
//   dg[n][c]  = sum_k T_n[c][k] (Wf - Wp)[c][k]
// so dWf, dWp and dL/dg together cost one weight-gradient's FLOPs (the library way needs a second full
// convolution, conv(x, Wf - Wp), for dL/dg). T_n is never stored: each 6 x 16 tile is reduced into dW and
// dg straight from the registers.

// T tile: acc[r] = sum_p A[p][r] * B[p][0..16) for r < R (A packed [P][6], B packed [P][16]).
template <int R>
__attribute__((target("avx2,fma"))) inline void wgrad_tile(int64_t P, const float* A, const float* B, int valid,
                                                           const float* g, float* dwf, float* dwp, int64_t ldw,
                                                           const float* dW, float* dg) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  accumulate<R>(P, A, B, c0, c1);
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), idx);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid - 8), idx);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    const __m256 gr = _mm256_set1_ps(g[r]);
    if (dwf) {
      float* w = dwf + r * ldw;
      _mm256_maskstore_ps(w, m0, _mm256_fmadd_ps(gr, c0[r], _mm256_maskload_ps(w, m0)));
      _mm256_maskstore_ps(w + 8, m1, _mm256_fmadd_ps(gr, c1[r], _mm256_maskload_ps(w + 8, m1)));
    }
    if (dwp) {
      const __m256 hr = _mm256_sub_ps(_mm256_set1_ps(1.f), gr);
      float* w = dwp + r * ldw;
      _mm256_maskstore_ps(w, m0, _mm256_fmadd_ps(hr, c0[r], _mm256_maskload_ps(w, m0)));
      _mm256_maskstore_ps(w + 8, m1, _mm256_fmadd_ps(hr, c1[r], _mm256_maskload_ps(w + 8, m1)));
    }
    if (dg) {
      const float* d = dW + r * ldw;
      const __m256 v = _mm256_fmadd_ps(c1[r], _mm256_maskload_ps(d + 8, m1),
                                       _mm256_mul_ps(c0[r], _mm256_maskload_ps(d, m0)));
      dg[r] += avx2::hsum(v);
    }
  }
}


// dwf / dwp ([C][K], zeroed by the caller; either may be null), dg ([N][C], zeroed; null when not wanted).
// gates [N][gate_ld]; dW = Wf - Wp as [C][K] (read only when dg is wanted).
//   dy_row(n, c) -> const float*: P values of dy for image n, channel c.
//   x_row(n, k, buf) -> const float*: row k of image n's im2col matrix, P values (written to buf if needed).
// Threads split the output channels (each owns its rows of dW and its columns of dg: no reduction between
// threads, deterministic). Per thread: dy of its channels packed [n][tile][P][6] once; per 256-row block of
// K and image, that image's im2col rows packed [panel][P][16] (in L2 while every tile of T_n is formed).
template <class DyRow, class XRow>
void run_wgrad(int64_t N, int64_t P, int64_t C, int64_t K, const float* gates, int64_t gate_ld, const float* dW,
               float* dwf, float* dwp, float* dg, const DyRow& dy_row, const XRow& x_row) {
  const int64_t ctiles = (C + kMR - 1) / kMR;
  at::parallel_for(0, ctiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t c_lo = t0 * kMR, c_hi = std::min(C, t1 * kMR), nt = t1 - t0;
    float* apack = scratch(0, N * nt * P * kMR + 8);
    float* bstore = scratch(1, (kKC / kNR) * P * kNR + 16);
    float* row = scratch(2, P + 8);
    float* bpack = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bstore) + 31) & ~uintptr_t(31));
    for (int64_t n = 0; n < N; ++n) {  // dy of this thread's channels, every image, as [n][tile][P][6]
      float* an = apack + n * nt * P * kMR;
      for (int64_t c = c_lo; c < c_lo + nt * kMR; ++c) {
        float* d = an + ((c - c_lo) / kMR) * P * kMR + (c - c_lo) % kMR;
        if (c < c_hi) {
          const float* src = dy_row(n, c);
          for (int64_t p = 0; p < P; ++p) d[p * kMR] = src[p];
        } else {  // rows past C in the last tile
          for (int64_t p = 0; p < P; ++p) d[p * kMR] = 0.f;
        }
      }
    }
    // K blocks outside, images inside: the block's rows of dW (and of Wf - Wp) stay in L2 for all images.
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kb = std::min(kKC, K - k0), panels = (kb + kNR - 1) / kNR;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t kk = 0; kk < panels * kNR; ++kk) {  // im2col rows k0.. as [panel][P][16]
          float* d = bpack + (kk / kNR) * P * kNR + kk % kNR;
          if (kk < kb) {
            const float* src = x_row(n, k0 + kk, row);
            for (int64_t p = 0; p < P; ++p) d[p * kNR] = src[p];
          } else {
            for (int64_t p = 0; p < P; ++p) d[p * kNR] = 0.f;
          }
        }
        const float* gn = gates + n * gate_ld;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c = t * kMR;
          const int rows = static_cast<int>(std::min(kMR, C - c));
          const float* a = apack + (n * nt + (t - t0)) * P * kMR;
          for (int64_t j = 0; j < panels; ++j) {
            const int64_t k = k0 + j * kNR;
            const int valid = static_cast<int>(std::min(kNR, K - k));
            with_rows(rows, [&](auto R) {
              wgrad_tile<R>(P, a, bpack + j * P * kNR, valid, gn + c, dwf ? dwf + c * K + k : nullptr,
                            dwp ? dwp + c * K + k : nullptr, K, dg ? dW + c * K + k : nullptr,
                            dg ? dg + n * C + c : nullptr);
            });
          }
        }
      }
    }
  });
}

}  // namespace mixgemm
}  // namespace tlkernels
#endif  // TLK_HAVE_AVX2_PATH
