#pragma once
// Online log-sum-exp (one pass: running max and rescaled sum), shared by the CPU cross-entropy kernel
// and any CUDA kernel that wants the same numerics.
#include <cmath>
#include <limits>

#include "ops/common/macros.h"

namespace tlkernels {

template <typename A>
struct OnlineLse {
  A m = -std::numeric_limits<A>::infinity();
  A s = A(0);
  TLK_HD void add(A x) {
    if (x > m) {
      s = s * std::exp(m - x) + A(1);
      m = x;
    } else if (x != -std::numeric_limits<A>::infinity()) {
      // (a -inf term adds exp(-inf) = 0; computed, it would be exp(-inf - -inf) = NaN while m is still -inf)
      s += std::exp(x - m);
    }
  }
  TLK_HD A value() const { return m + std::log(s); }
};

}  // namespace tlkernels
