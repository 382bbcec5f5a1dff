// CPU multi-tensor kernels of the L2-SP penalty and of the L2-SP-aware optimizer steps.
//
// Every list of tensors is cut into a fixed table of (tensor, chunk) work items, chunk = 65,536
// elements, as apex/ATen multi-tensor apply do; at::parallel_for runs the items and the penalty's
// per-item partial sums are added in item order afterwards, so the value is bit-identical whatever
// the thread count. Memory-bound by design: one read of p and p0 (and one gradient write).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "ops/check.h"
#include "ops/common/l2sp_math.h"
#include "ops/cpu/avx2.h"
#include "ops/l2sp_checks.h"

namespace tlkernels {
namespace {

constexpr int64_t kChunk = 65536;

// p + offset as float* (null stays null): the AVX2 branches run for float tensors alone, and the casts only
// let them compile inside the dispatch over every dtype.
template <typename T>
auto f32(T* p, int64_t offset) {
  using F = std::conditional_t<std::is_const_v<T>, const float, float>;
  return p ? reinterpret_cast<F*>(p) + offset : static_cast<F*>(nullptr);
}

struct Item {
  int list;  // 0: pre-trained params (with refs), 1: new params
  int64_t t, begin, end;
};

std::vector<Item> make_items(const std::vector<at::TensorList>& lists) {
  std::vector<Item> items;
  for (size_t l = 0; l < lists.size(); ++l)
    for (size_t t = 0; t < lists[l].size(); ++t)
      for (int64_t b = 0; b < lists[l][t].numel(); b += kChunk)
        items.push_back({(int)l, (int64_t)t, b, std::min(b + kChunk, lists[l][t].numel())});
  return items;
}

bool any_double(const std::vector<at::TensorList>& lists) {
  for (auto& l : lists)
    for (auto& t : l)
      if (t.scalar_type() == at::kDouble) return true;
  return false;
}

// Shared by the four penalty ops: value (if `value`) and gradients scaled by `scale` (if `gp`): new
// tensors, or (accumulate) added into the tensors *gp / *gn already hold.
at::Tensor l2sp_core(const char* op, at::TensorList params, at::TensorList refs, const OptionalTensors& weights,
                     double alpha, at::TensorList new_params, double beta, const at::Tensor* scale_t, bool value,
                     std::vector<at::Tensor>* gp, std::vector<at::Tensor>* gn, bool accumulate = false) {
  check_penalty_args(op, params, refs, weights, new_params);
  std::vector<at::Tensor> P, R, Q;  // dense, refs and weights in their param's layout (copies only where needed)
  for (auto& t : params) P.push_back(dense(t));
  for (size_t i = 0; i < refs.size(); ++i) R.push_back(layout_like(refs[i], P[i]));
  const std::vector<at::Tensor> W = optional_like(weights, P);
  for (auto& t : new_params) Q.push_back(dense(t));
  const std::vector<at::TensorList> lists{P, Q};
  const double scale = scale_t ? scale_t->item<double>() : 1.0;
  if (gp && !accumulate) {
    for (auto& t : P) gp->push_back(at::empty_like(t));
    for (auto& t : Q) gn->push_back(at::empty_like(t));
  }
  const auto items = make_items(lists);
  std::vector<double> partial(items.size(), 0.0);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t ib, int64_t ie) {
    for (int64_t it = ib; it < ie; ++it) {
      const Item& w = items[it];
      const at::Tensor& p = lists[w.list][w.t];
      const double coeff = (w.list == 0 ? alpha : beta) * scale;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "l2sp_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* pp = p.const_data_ptr<scalar_t>();
        const scalar_t* rp = w.list == 0 ? R[w.t].const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* wp = w.list == 0 && W[w.t].defined() ? W[w.t].const_data_ptr<scalar_t>() : nullptr;
        scalar_t* gptr = gp ? (w.list == 0 ? (*gp)[w.t] : (*gn)[w.t]).mutable_data_ptr<scalar_t>() : nullptr;
#ifdef TLK_HAVE_AVX2_PATH
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (avx2::available()) {
            partial[it] = avx2::l2sp_chunk(f32(pp, w.begin), f32(rp, w.begin), f32(wp, w.begin), f32(gptr, w.begin),
                                           static_cast<float>(coeff), w.end - w.begin, accumulate);
            return;
          }
        }
#endif
        double acc[4] = {0, 0, 0, 0};
        const A c = static_cast<A>(coeff);
        for (int64_t i = w.begin; i < w.end; ++i) {
          const A pv = static_cast<A>(pp[i]);
          const A rv = rp ? static_cast<A>(rp[i]) : A(0);
          const A wv = wp ? static_cast<A>(wp[i]) : A(1);
          if (value) acc[i & 3] += static_cast<double>(wv * l2sp::penalty_sq(pv, rv));
          if (gptr) {
            const A d = l2sp::penalty_grad(pv, rv, c * wv);
            gptr[i] = static_cast<scalar_t>(accumulate ? static_cast<A>(gptr[i]) + d : d);
          }
        }
        partial[it] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      });
    }
  });
  const auto out_dtype = any_double(lists) ? at::kDouble : at::kFloat;
  if (!value) return at::Tensor();
  double s[2] = {0, 0};
  for (size_t it = 0; it < items.size(); ++it) s[items[it].list] += partial[it];  // ordered: deterministic
  auto dev = !params.empty() ? params[0].device() : (!new_params.empty() ? new_params[0].device() : at::kCPU);
  return at::scalar_tensor(0.5 * alpha * s[0] + 0.5 * beta * s[1], at::TensorOptions().dtype(out_dtype).device(dev));
}

at::Tensor l2sp_penalty_cpu(at::TensorList params, at::TensorList refs, const OptionalTensors& weights, double alpha,
                            at::TensorList new_params, double beta) {
  return l2sp_core("l2sp_penalty", params, refs, weights, alpha, new_params, beta, nullptr, true, nullptr, nullptr);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> l2sp_penalty_backward_cpu(
    const at::Tensor& grad, at::TensorList params, at::TensorList refs, const OptionalTensors& weights, double alpha,
    at::TensorList new_params, double beta) {
  std::vector<at::Tensor> gp, gn;
  l2sp_core("l2sp_penalty_backward", params, refs, weights, alpha, new_params, beta, &grad, false, &gp, &gn);
  return {gp, gn};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> l2sp_value_and_grad_cpu(
    at::TensorList params, at::TensorList refs, const OptionalTensors& weights, double alpha,
    at::TensorList new_params, double beta) {
  std::vector<at::Tensor> gp, gn;
  auto v = l2sp_core("l2sp_value_and_grad", params, refs, weights, alpha, new_params, beta, nullptr, true, &gp, &gn);
  return {v, gp, gn};
}

at::Tensor l2sp_value_and_grad_inplace_cpu(at::TensorList params, at::TensorList refs,
                                            const OptionalTensors& weights, double alpha, at::TensorList new_params,
                                            double beta, at::TensorList grads, at::TensorList new_grads) {
  const char* op = "l2sp_value_and_grad_";
  check_inplace_args(op, params, refs, weights, new_params, grads, new_grads);
  std::vector<at::Tensor> gp(grads.begin(), grads.end()), gn(new_grads.begin(), new_grads.end());
  return l2sp_core(op, params, refs, weights, alpha, new_params, beta, nullptr, true, &gp, &gn, true);
}

// Per param: its gradient, reference and weights in the param's memory layout (the kernels walk all of them
// with one flat index; copies only where a layout differs), undefined where absent.
struct StepOperands {
  std::vector<at::Tensor> G, R, W;
  StepOperands(at::TensorList params, at::TensorList grads, const OptionalTensors& refs,
               const OptionalTensors& weights)
      : R(optional_like(refs, params)), W(optional_like(weights, params)) {
    for (size_t i = 0; i < params.size(); ++i) G.push_back(layout_like(grads[i], params[i]));
  }
  template <typename scalar_t>
  static const scalar_t* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; }
};

void sgd_l2sp_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, const OptionalTensors& refs,
                       const OptionalTensors& weights, at::ArrayRef<double> coeffs, double lr, double momentum,
                       double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const char* op = "sgd_l2sp_step_";
  const bool use_buf = momentum != 0.0;
  check_step_args(op, params, grads, use_buf ? std::vector<at::TensorList>{bufs} : std::vector<at::TensorList>{},
                  {"momentum_buffers"}, refs, weights, coeffs);
  const StepOperands in(params, grads, refs, weights);
  const auto items = make_items({params});
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t ib, int64_t ie) {
    for (int64_t it = ib; it < ie; ++it) {
      const Item& w = items[it];
      const at::Tensor& p = params[w.t];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sgd_l2sp_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        scalar_t* pp = p.mutable_data_ptr<scalar_t>();
        const scalar_t* gp = in.G[w.t].const_data_ptr<scalar_t>();
        const scalar_t* rp = StepOperands::ptr<scalar_t>(in.R[w.t]);
        const scalar_t* wp = StepOperands::ptr<scalar_t>(in.W[w.t]);
        scalar_t* bp = use_buf ? bufs[w.t].mutable_data_ptr<scalar_t>() : nullptr;
        const A c = static_cast<A>(coeffs[w.t]);
#ifdef TLK_HAVE_AVX2_PATH
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (avx2::available()) {
            const int64_t o = w.begin;
            avx2::sgd_chunk(f32(pp, o), f32(gp, o), f32(rp, o), f32(wp, o), f32(bp, o), w.end - w.begin, {static_cast<float>(c), static_cast<float>(lr), static_cast<float>(momentum),
                                              static_cast<float>(dampening), static_cast<float>(weight_decay),
                                              nesterov, maximize, first_step});
            return;
          }
        }
#endif
        for (int64_t i = w.begin; i < w.end; ++i) {
          A b = bp ? static_cast<A>(bp[i]) : A(0);
          pp[i] = static_cast<scalar_t>(l2sp::sgd_update<A>(
              pp[i], gp[i], rp ? static_cast<A>(rp[i]) : A(0), wp ? c * static_cast<A>(wp[i]) : c, &b, first_step,
              lr, momentum, dampening, weight_decay, nesterov, maximize));
          if (bp) bp[i] = static_cast<scalar_t>(b);
        }
      });
    }
  });
}

void adamw_l2sp_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const OptionalTensors& refs,
                         const OptionalTensors& weights,
                         at::ArrayRef<double> coeffs, double lr, double beta1, double beta2, double eps,
                         double weight_decay, int64_t step, bool maximize) {
  const char* op = "adamw_l2sp_step_";
  check_adamw_step(op, step);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  check_step_args(op, params, grads,
                  amsgrad ? std::vector<at::TensorList>{exp_avgs, exp_avg_sqs, max_exp_avg_sqs}
                          : std::vector<at::TensorList>{exp_avgs, exp_avg_sqs},
                  {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"}, refs, weights, coeffs);
  const StepOperands in(params, grads, refs, weights);
  const double bc1 = 1.0 - std::pow(beta1, (double)step), bc2s = std::sqrt(1.0 - std::pow(beta2, (double)step));
  const auto items = make_items({params});
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t ib, int64_t ie) {
    for (int64_t it = ib; it < ie; ++it) {
      const Item& w = items[it];
      const at::Tensor& p = params[w.t];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adamw_l2sp_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        scalar_t* pp = p.mutable_data_ptr<scalar_t>();
        const scalar_t* gp = in.G[w.t].const_data_ptr<scalar_t>();
        const scalar_t* rp = StepOperands::ptr<scalar_t>(in.R[w.t]);
        const scalar_t* wp = StepOperands::ptr<scalar_t>(in.W[w.t]);
        scalar_t* mp = exp_avgs[w.t].mutable_data_ptr<scalar_t>();
        scalar_t* vp = exp_avg_sqs[w.t].mutable_data_ptr<scalar_t>();
        scalar_t* xp = amsgrad ? max_exp_avg_sqs[w.t].mutable_data_ptr<scalar_t>() : nullptr;
        const A c = static_cast<A>(coeffs[w.t]);
#ifdef TLK_HAVE_AVX2_PATH
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (avx2::available()) {
            const int64_t o = w.begin;
            avx2::adamw_chunk(f32(pp, o), f32(gp, o), f32(rp, o), f32(wp, o), f32(mp, o), f32(vp, o),
                              f32(xp, o), w.end - w.begin, {static_cast<float>(c), static_cast<float>(lr), static_cast<float>(beta1),
                                                static_cast<float>(beta2), static_cast<float>(eps),
                                                static_cast<float>(weight_decay), static_cast<float>(bc1),
                                                static_cast<float>(bc2s), maximize});
            return;
          }
        }
#endif
        for (int64_t i = w.begin; i < w.end; ++i) {
          A m = mp[i], v = vp[i], x = xp ? static_cast<A>(xp[i]) : A(0);
          pp[i] = static_cast<scalar_t>(l2sp::adamw_update<A>(pp[i], gp[i], rp ? static_cast<A>(rp[i]) : A(0),
                                                               wp ? c * static_cast<A>(wp[i]) : c, &m, &v,
                                                               xp ? &x : nullptr, lr, beta1, beta2, eps, weight_decay,
                                                               bc1, bc2s, maximize));
          mp[i] = static_cast<scalar_t>(m);
          vp[i] = static_cast<scalar_t>(v);
          if (xp) xp[i] = static_cast<scalar_t>(x);
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) {
  m.impl("l2sp_penalty", &l2sp_penalty_cpu);
  m.impl("l2sp_penalty_backward", &l2sp_penalty_backward_cpu);
  m.impl("l2sp_value_and_grad", &l2sp_value_and_grad_cpu);
  m.impl("l2sp_value_and_grad_", &l2sp_value_and_grad_inplace_cpu);
  m.impl("sgd_l2sp_step_", &sgd_l2sp_step_cpu);
  m.impl("adamw_l2sp_step_", &adamw_l2sp_step_cpu);
}

}  // namespace tlkernels
