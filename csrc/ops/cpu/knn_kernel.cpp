// CPU kernel of the kNN chunk selection: one pass per query row over the chunk with a size-k max-heap of
// (distance, index) pairs; heap work happens only for candidates better than the current k-th.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/check.h"
#include "ops/cpu/avx2.h"

namespace tlkernels {
namespace {

template <typename T>
inline T quantize(T d, T mag, int bits) {
  if (!(mag > T(0)) || !std::isfinite(mag)) return d;
  const int e = std::ilogb(mag) + 1 - bits;
  const T u = std::ldexp(T(1), e), inv = std::ldexp(T(1), -e);
  return std::nearbyint(d * inv) * u;
}

// The running k best of one query row: a max-heap on (rounded distance, index) that only candidates better
// than the current k-th ever touch.
template <typename T>
struct RowTopK {
  using P = std::pair<T, int64_t>;
  std::vector<P> heap;
  int64_t kout = 0;
  T r = 0, ar = 0, slack = 0;

  void start(const T* bd, const int64_t* bi, int64_t kb, int64_t k, T row_c, int bits) {
    kout = k;
    heap.clear();
    heap.reserve(std::max<int64_t>(kb, k) + 1);
    for (int64_t j = 0; j < kb; ++j) heap.emplace_back(bd[j], bi[j]);  // already rounded
    std::make_heap(heap.begin(), heap.end());
    while ((int64_t)heap.size() > kout) {
      std::pop_heap(heap.begin(), heap.end());
      heap.pop_back();
    }
    r = row_c;
    ar = std::abs(row_c);
    // Rounding moves a distance by at most half a grid step (2^-bits of its magnitude, < 2^(1-bits) x mag):
    // a raw distance above the current k-th by more than that can be skipped without rounding it.
    slack = std::ldexp(T(1), 2 - bits);
  }

  // t = scale * cross for database row `index`, whose column constant is c.
  inline void offer(T t, T c, int64_t index, int bits) {
    const T raw = r + c + t;
    const T mag = ar + std::abs(c) + std::abs(t);
    if ((int64_t)heap.size() == kout && raw - heap.front().first > slack * (mag + std::abs(heap.front().first)))
      return;
    const P cand{quantize<T>(raw, mag, bits), index};
    if ((int64_t)heap.size() < kout) {
      heap.push_back(cand);
      std::push_heap(heap.begin(), heap.end());
    } else if (cand < heap.front()) {
      std::pop_heap(heap.begin(), heap.end());
      heap.back() = cand;
      std::push_heap(heap.begin(), heap.end());
    }
  }

  bool full() const { return (int64_t)heap.size() == kout; }

  void finish(T* od, int64_t* oi) {
    std::sort_heap(heap.begin(), heap.end());
    for (int64_t j = 0; j < kout; ++j) {
      od[j] = heap[j].first;
      oi[j] = heap[j].second;
    }
  }
};

std::tuple<at::Tensor, at::Tensor> knn_select_chunk_cpu(const at::Tensor& cross_in, const at::Tensor& row_c,
                                                        const at::Tensor& col_c, double scale,
                                                        const at::Tensor& best_d, const at::Tensor& best_i,
                                                        int64_t base, int64_t k, int64_t bits) {
  const char* op = "knn_select_chunk";
  TORCH_CHECK(cross_in.dim() == 2, op, ": cross must be 2-D, got ", cross_in.dim(), "-D");
  const int64_t Q = cross_in.size(0), m = cross_in.size(1), kb = best_d.size(1);
  TORCH_CHECK(row_c.numel() == Q && col_c.numel() == m, op, ": row_c must have ", Q, " and col_c ", m, " values");
  TORCH_CHECK(best_d.size(0) == Q && best_i.sizes() == best_d.sizes(), op, ": best lists must be (", Q, ", k)");
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  // Two layouts are read in place: rows contiguous (Q, m), or the transpose of a contiguous (m, Q) matrix,
  // which is what the caller gets from the GEMM chunk @ queries^T (the faster orientation for MKL on the
  // CPUs of benchmarks/test_bench_select.py). Anything else is copied once.
  const bool by_column = Q > 1 && m > 1 && cross_in.stride(0) == 1 && cross_in.stride(1) == Q;
  const at::Tensor cross = by_column ? cross_in : cross_in.contiguous();
  const int64_t kout = std::min<int64_t>(k, kb + m);
  at::Tensor od = at::empty({Q, kout}, cross.options());
  at::Tensor oi = at::empty({Q, kout}, best_i.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(cross.scalar_type(), "knn_select_chunk", [&] {
    const scalar_t* cp = cross.const_data_ptr<scalar_t>();
    const at::Tensor rc = row_c.to(cross.scalar_type()).contiguous(), cc = col_c.to(cross.scalar_type()).contiguous();
    const at::Tensor bd = best_d.to(cross.scalar_type()).contiguous(), bi = best_i.to(at::kLong).contiguous();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* ccp = cc.const_data_ptr<scalar_t>();
    const scalar_t* bdp = bd.const_data_ptr<scalar_t>();
    const int64_t* bip = bi.const_data_ptr<int64_t>();
    scalar_t* odp = od.mutable_data_ptr<scalar_t>();
    int64_t* oip = oi.mutable_data_ptr<int64_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    const int nbits = static_cast<int>(bits);
    if (!by_column) {
      at::parallel_for(0, Q, 1, [&](int64_t qb, int64_t qe) {
        RowTopK<scalar_t> top;
        for (int64_t q = qb; q < qe; ++q) {
          top.start(bdp + q * kb, bip + q * kb, kb, kout, rp[q], nbits);
          const scalar_t* row = cp + q * m;
          for (int64_t j = 0; j < m; ++j) top.offer(s * row[j], ccp[j], base + j, nbits);
          top.finish(odp + q * kout, oip + q * kout);
        }
      });
      return;
    }
    // Column layout: a block of queries walks the database rows together, reading QB adjacent values of
    // each row (one or two cache lines) instead of one value per line. The skip test of `offer` runs first
    // for the whole block in a branch-free loop the compiler vectorises (front = +inf while a heap is not
    // full, so nothing is skipped then); only the few survivors go through the heap code.
    constexpr int64_t QB = 32;
    at::parallel_for(0, (Q + QB - 1) / QB, 1, [&](int64_t bb, int64_t be) {
      std::vector<RowTopK<scalar_t>> tops(QB);
      alignas(64) scalar_t r[QB], ar[QB], front[QB], afront[QB];
      alignas(64) int32_t keep[QB];
      const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
      for (int64_t blk = bb; blk < be; ++blk) {
        const int64_t q0 = blk * QB, nq = std::min(QB, Q - q0);
        for (int64_t i = 0; i < QB; ++i) {
          if (i < nq) {
            tops[i].start(bdp + (q0 + i) * kb, bip + (q0 + i) * kb, kb, kout, rp[q0 + i], nbits);
            r[i] = tops[i].r;
            ar[i] = tops[i].ar;
          }
          front[i] = (i < nq && tops[i].full()) ? tops[i].heap.front().first : inf;
          afront[i] = std::abs(front[i]);
        }
        const scalar_t slack = tops[0].slack;
        for (int64_t j = 0; j < m; ++j) {
          const scalar_t* col = cp + j * Q + q0;
          const scalar_t c = ccp[j], ac = std::abs(c);
          int32_t any = 0;
          // Exactly offer's test, negated as written there (a NaN distance is kept, as offer keeps it).
          const auto test = [&](int64_t i) {
            const scalar_t t = s * col[i];
            return (int32_t) !((r[i] + c + t) - front[i] > slack * ((ar[i] + ac + std::abs(t)) + afront[i]));
          };
          if (nq == QB) {  // constant trip count: vectorised
            for (int64_t i = 0; i < QB; ++i) any |= keep[i] = test(i);
          } else {
            for (int64_t i = 0; i < nq; ++i) any |= keep[i] = test(i);
          }
          if (!any) continue;
          for (int64_t i = 0; i < nq; ++i) {
            if (!keep[i]) continue;
            tops[i].offer(s * col[i], c, base + j, nbits);
            if (tops[i].full()) {
              front[i] = tops[i].heap.front().first;
              afront[i] = std::abs(front[i]);
            }
          }
        }
        for (int64_t i = 0; i < nq; ++i) tops[i].finish(odp + (q0 + i) * kout, oip + (q0 + i) * kout);
      }
    });
  });
  return {od, oi};
}

at::Tensor knn_expand_skl_cpu(const at::Tensor& p_in, const at::Tensor& w_in, double eps, at::Tensor& out) {
  const char* op = "knn_expand_skl_";
  TORCH_CHECK(p_in.dim() == 2 && at::isFloatingType(p_in.scalar_type()), op,
              ": p must be a 2-D floating-point tensor, got ", p_in.dim(), "-D ", p_in.scalar_type());
  const int64_t m = p_in.size(0), d = p_in.size(1);
  TORCH_CHECK(w_in.dim() == 1 && w_in.size(0) == d, op, ": w must have shape (", d, ",), got ", w_in.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == 2 * d && out.is_contiguous() &&
                  out.scalar_type() == p_in.scalar_type(),
              op, ": out must be a contiguous (", m, ", ", 2 * d, ") ", p_in.scalar_type(), " tensor, got ",
              out.sizes(), " ", out.scalar_type());
  const at::Tensor p = p_in.contiguous(), w = w_in.to(p_in.scalar_type()).contiguous();
  at::Tensor r = at::empty({m}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "knn_expand_skl_", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    scalar_t* rp = r.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t en) {
      for (int64_t i = b; i < en; ++i) {
        const scalar_t* row = pp + i * d;
        scalar_t* lrow = op_ + i * 2 * d;
        scalar_t s = 0;
#ifdef TLK_HAVE_AVX2_PATH
        // float32: our AVX2 log in the same pass (the expansion's time is nearly all log; ATen's log is a
        // separate, slower pass)
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (avx2::available()) {
            // (casts: this branch is compiled for double too, though only taken for float)
            const auto f = [](auto* x) { return reinterpret_cast<const float*>(x); };
            float* lf = reinterpret_cast<float*>(lrow);
            rp[i] = static_cast<scalar_t>(0.5f * avx2::skl_expand_row(f(row), f(wp), static_cast<float>(e), lf, lf + d, d));
            continue;
          }
        }
#endif
        for (int64_t c = 0; c < d; ++c) {
          const scalar_t l = std::log(row[c] + e);
          lrow[c] = l;
          lrow[d + c] = row[c];
          s += wp[c] * row[c] * l;
        }
        rp[i] = s / 2;
      }
    });
  });
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) {
  m.impl("knn_select_chunk", &knn_select_chunk_cpu);
  m.impl("knn_expand_skl_", &knn_expand_skl_cpu);
}

}  // namespace tlkernels
