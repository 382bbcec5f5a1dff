// CPU kernel of the fused cross-entropy: one parallel pass over rows; each row computes its
// log-sum-exp online, its loss, and (optionally) its gradient row while it is hot in cache.
#include <ATen/ATen.h>
#include <limits>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/check.h"
#include "ops/common/softmax_math.h"
#include "ops/cross_entropy.h"
#include "ops/cpu/avx2.h"

namespace tlkernels {
namespace {

// `op` and `names` name the caller and the arguments in error messages (cross_entropy's, or one head of
// joint_cross_entropy's).
std::tuple<at::Tensor, at::Tensor> cross_entropy_impl(const char* op, const HeadNames& names,
                                                      const at::Tensor& logits_in,
                                                      const at::Tensor& target_in,
                                                      const c10::optional<at::Tensor>& sample_weight,
                                                      int64_t ignore_index, int64_t reduction, double scale,
                                                      bool compute_grad) {
  check_cross_entropy_args(op, names, logits_in, target_in, sample_weight);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const bool soft = target_in.is_floating_point();
  at::Tensor w;
  if (sample_weight.has_value() && sample_weight->defined()) w = sample_weight->to(at::kDouble).contiguous();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = soft ? target_in.to(logits.scalar_type()).contiguous() : target_in.contiguous();
  const int64_t* lab = soft ? nullptr : target.const_data_ptr<int64_t>();
  const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;

  // Weighted count of rows that count (mean's denominator), and label range check.
  double denom = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (lab) {
      const int64_t y = lab[i];
      if (y == ignore_index) continue;
      if (y < 0 || y >= C) label_out_of_range(op, names, i, y, C, ignore_index);
    }
    denom += wp ? wp[i] : 1.0;
  }
  const double norm = reduction == 1 ? scale / denom : scale;  // 0/0 -> nan, as F.cross_entropy
  if (C == 0) {
    // No classes: every row's loss is an empty sum; F.cross_entropy's mean over them is nan (0/0) for both
    // target kinds (hard labels reach here only when all are ignore_index).
    at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
    if (reduction == 0) return {at::zeros({N}, logits.options()), grad};
    const double v = reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0;
    return {at::scalar_tensor(v, logits.options()), grad};
  }

  at::Tensor rows = at::empty({N}, logits.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  double* rowp = rows.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const scalar_t* q = soft ? target.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* g = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t rb, int64_t re) {
      for (int64_t i = rb; i < re; ++i) {
        const scalar_t* xi = x + i * C;
        const bool ignored = lab && lab[i] == ignore_index;
        const double wi = ignored ? 0.0 : (wp ? wp[i] : 1.0);
#ifdef TLK_HAVE_AVX2_PATH
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (avx2::available()) {
            // max pass, then exp(x - max) summed and kept in the gradient row, then that row turned into
            // the gradient in place: one exp per element, the row hot in cache throughout.
            // (casts only to compile for the other dtypes; this branch runs for float alone)
            const float* xf = reinterpret_cast<const float*>(xi);
            float* gi = g ? reinterpret_cast<float*>(g) + i * C : nullptr;
            const float m = avx2::row_max(xf, C);
            const float se = avx2::row_exp_sum(xf, m, gi, C);
            const double L = static_cast<double>(m) + std::log(static_cast<double>(se));
            const float* qi = q ? reinterpret_cast<const float*>(q) + i * C : nullptr;
            double loss = 0, qsum = 1;
            if (qi) {
              double dot = 0;
              qsum = 0;
              for (int64_t c = 0; c < C; ++c) {
                dot += static_cast<double>(qi[c]) * xf[c];
                qsum += qi[c];
              }
              loss = L * qsum - dot;
            } else if (!ignored) {
              loss = L - static_cast<double>(xf[lab[i]]);
            }
            rowp[i] = wi * loss;
            if (gi) {
              const float coef = wi == 0.0 ? 0.f : static_cast<float>(reduction == 0 ? wi * scale : wi * norm);
              avx2::row_grad(gi, qi, qi ? -1 : (ignored ? -1 : lab[i]), coef, static_cast<float>(qsum / se), C);
            }
            continue;
          }
        }
#endif
        OnlineLse<A> lse;
        for (int64_t c = 0; c < C; ++c) lse.add(static_cast<A>(xi[c]));
        const A L = lse.value();
        double loss = 0, qsum = 1;
        if (ignored) {
          loss = 0;
        } else if (q) {
          const scalar_t* qi = q + i * C;
          double dot = 0;
          qsum = 0;
          for (int64_t c = 0; c < C; ++c) {
            dot += static_cast<double>(qi[c]) * static_cast<double>(xi[c]);
            qsum += static_cast<double>(qi[c]);
          }
          loss = static_cast<double>(L) * qsum - dot;
        } else {
          loss = static_cast<double>(L) - static_cast<double>(xi[lab[i]]);
        }
        rowp[i] = wi * loss;
        if (g) {
          // d(scaled loss)/dx_c = coef * (softmax_c * sum(q) - q_c); coef 0 for ignored rows.
          // Ignored (zero-weight) rows get exact zeros, as F.cross_entropy (even when mean is 0/0 = nan).
          const A coef = wi == 0.0 ? A(0) : static_cast<A>(reduction == 0 ? wi * scale : wi * norm);
          scalar_t* gi = g + i * C;
          const A qs = static_cast<A>(qsum);
          for (int64_t c = 0; c < C; ++c) {
            const A p = std::exp(static_cast<A>(xi[c]) - L);
            const A qc = q ? static_cast<A>(q[i * C + c]) : (c == lab[i] ? A(1) : A(0));
            gi[c] = static_cast<scalar_t>(coef * (p * qs - qc));
          }
        }
      }
    });
  });
  at::Tensor loss;
  if (reduction == 0) {
    loss = (rows * scale).to(logits.scalar_type());
  } else {
    double total = 0;
    for (int64_t i = 0; i < N; ++i) total += rowp[i];  // ordered: deterministic
    loss = at::scalar_tensor(total * norm, logits.options().dtype(logits.scalar_type()));
  }
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& sample_weight,
                                                     int64_t ignore_index, int64_t reduction, double scale,
                                                     bool compute_grad) {
  return cross_entropy_impl("cross_entropy", HeadNames(""), logits, target, sample_weight, ignore_index, reduction,
                            scale, compute_grad);
}

// Both heads in one op, so autograd records a single node (at N=256 the per-node overhead of the
// Python-level custom-op autograd costs as much as the row passes themselves).
std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_cross_entropy_cpu(
    const at::Tensor& target_logits, const at::Tensor& target_labels,
    const c10::optional<at::Tensor>& target_sample_weight, const at::Tensor& source_logits,
    const at::Tensor& source_labels, const c10::optional<at::Tensor>& source_sample_weight, int64_t ignore_index,
    int64_t reduction, double target_weight, double source_weight, bool compute_grad) {
  TORCH_CHECK_VALUE(reduction == 1 || reduction == 2, "joint_cross_entropy: reduction must be 1 (mean) or 2 (sum) "
              "(per-row losses of two heads of different sizes do not add up), got ", reduction);
  auto [lt, gt] = cross_entropy_impl("joint_cross_entropy", HeadNames("target"), target_logits, target_labels,
                                     target_sample_weight, ignore_index, reduction, target_weight, compute_grad);
  auto [ls, gs] = cross_entropy_impl("joint_cross_entropy", HeadNames("source"), source_logits, source_labels,
                                     source_sample_weight, ignore_index, reduction, source_weight, compute_grad);
  return {at::add(lt, ls), gt, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("joint_cross_entropy", &joint_cross_entropy_cpu);
}

}  // namespace tlkernels
