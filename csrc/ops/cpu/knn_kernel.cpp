// CPU kernel of the kNN chunk selection: one pass per query row over the chunk with a size-k max-heap of
// (distance, index) pairs; heap work happens only for candidates better than the current k-th.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "ops/check.h"

namespace tlkernels {
namespace {

template <typename T>
inline T quantize(T d, T mag, int bits) {
  if (!(mag > T(0)) || !std::isfinite(mag)) return d;
  const int e = std::ilogb(mag) + 1 - bits;
  const T u = std::ldexp(T(1), e), inv = std::ldexp(T(1), -e);
  return std::nearbyint(d * inv) * u;
}

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
  const at::Tensor cross = cross_in.contiguous();
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
    at::parallel_for(0, Q, 1, [&](int64_t qb, int64_t qe) {
      using P = std::pair<scalar_t, int64_t>;
      std::vector<P> heap;
      heap.reserve(kout + 1);
      for (int64_t q = qb; q < qe; ++q) {
        heap.clear();
        for (int64_t j = 0; j < kb; ++j) heap.emplace_back(bdp[q * kb + j], bip[q * kb + j]);  // already rounded
        std::make_heap(heap.begin(), heap.end());  // max-heap on (distance, index)
        while ((int64_t)heap.size() > kout) {
          std::pop_heap(heap.begin(), heap.end());
          heap.pop_back();
        }
        const scalar_t r = rp[q], ar = std::abs(r);
        const scalar_t* row = cp + q * m;
        // Rounding moves a distance by at most half a grid step (2^-bits of its magnitude, < 2^(1-bits) x mag):
        // a raw distance above the current k-th by more than that can be skipped without rounding it.
        const scalar_t slack = std::ldexp(scalar_t(1), 2 - (int)bits);
        for (int64_t j = 0; j < m; ++j) {
          const scalar_t t = s * row[j];
          const scalar_t raw = r + ccp[j] + t;
          const scalar_t mag = ar + std::abs(ccp[j]) + std::abs(t);
          if ((int64_t)heap.size() == kout && raw - heap.front().first > slack * (mag + std::abs(heap.front().first)))
            continue;
          const scalar_t d = quantize<scalar_t>(raw, mag, (int)bits);
          const P cand{d, base + j};
          if ((int64_t)heap.size() < kout) {
            heap.push_back(cand);
            std::push_heap(heap.begin(), heap.end());
          } else if (cand < heap.front()) {
            std::pop_heap(heap.begin(), heap.end());
            heap.back() = cand;
            std::push_heap(heap.begin(), heap.end());
          }
        }
        std::sort_heap(heap.begin(), heap.end());
        for (int64_t j = 0; j < kout; ++j) {
          odp[q * kout + j] = heap[j].first;
          oip[q * kout + j] = heap[j].second;
        }
      }
    });
  });
  return {od, oi};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) { m.impl("knn_select_chunk", &knn_select_chunk_cpu); }

}  // namespace tlkernels
