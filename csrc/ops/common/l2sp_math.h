#pragma once
// Per-element math of the L2-SP penalty and of the L2-SP-aware optimizer steps, shared by the CPU
// kernels (csrc/ops/cpu/l2sp_kernel.cpp, exercised by the Python tests) and the CUDA multi-tensor
// kernels (csrc/ops/cuda/l2sp_cuda.cu). Accumulation type `A` is float for 16/32-bit tensors, double
// for float64 ones.
#include <cmath>

#include "ops/common/macros.h"

namespace tlkernels {
namespace l2sp {

// Penalty gradient of one element: coeff * (p - p0); p0 = 0 for new (head) parameters.
template <typename A>
TLK_HD A penalty_grad(A p, A p0, A coeff) { return coeff * (p - p0); }

// Unscaled penalty term of one element: (p - p0)^2 (the 1/2 and the coefficient are applied once per tensor).
template <typename A>
TLK_HD A penalty_sq(A p, A p0) { const A d = p - p0; return d * d; }

// torch.optim.SGD semantics (weight_decay, momentum, dampening, nesterov, maximize), with the L2-SP
// gradient folded in before momentum exactly as if it had come from the loss.
template <typename A>
TLK_HD A sgd_update(A p, A g, A p0, A coeff, A* buf, bool first, A lr, A momentum, A dampening, A weight_decay,
                    bool nesterov, bool maximize) {
  if (maximize) g = -g;
  g += penalty_grad(p, p0, coeff);
  if (weight_decay != A(0)) g += weight_decay * p;
  if (momentum != A(0)) {
    const A b = first ? g : momentum * (*buf) + (A(1) - dampening) * g;
    *buf = b;
    g = nesterov ? g + momentum * b : b;
  }
  return p - lr * g;
}

// torch.optim.AdamW semantics (decoupled weight decay; amsgrad when vmax is given: the running maximum of the
// second moment, NaN kept as torch.maximum keeps it, in the denominator), L2-SP gradient added to the loss
// gradient before the moments.
template <typename A>
TLK_HD A adamw_update(A p, A g, A p0, A coeff, A* m, A* v, A* vmax, A lr, A beta1, A beta2, A eps, A weight_decay,
                      A bias_c1, A bias_c2_sqrt, bool maximize) {
  if (maximize) g = -g;
  g += penalty_grad(p, p0, coeff);
  p = p * (A(1) - lr * weight_decay);
  const A mm = beta1 * (*m) + (A(1) - beta1) * g;
  const A vv = beta2 * (*v) + (A(1) - beta2) * g * g;
  *m = mm;
  *v = vv;
  A second = vv;
  if (vmax) {
    if (vv != vv || vv > *vmax) *vmax = vv;
    second = *vmax;
  }
  const A denom = std::sqrt(second) / bias_c2_sqrt + eps;
  return p - (lr / bias_c1) * mm / denom;
}

}  // namespace l2sp
}  // namespace tlkernels
