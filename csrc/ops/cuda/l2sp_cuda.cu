// CUDA multi-tensor kernels of the L2-SP penalty and of the L2-SP-aware SGD / AdamW steps.
//
// Multi-tensor apply as in apex / ATen's MultiTensorApply.cuh: the host cuts every tensor into chunks of
// 65,536 elements and packs up to kMaxTensors tensors and kMaxBlocks (tensor, chunk) pairs into one
// kernel-argument struct (CUDA >= 12.1 allows 32 KB of parameters on Volta and newer), one block per chunk.
// The penalty writes one partial sum per chunk into a buffer that one cleanup reduction adds up:
// deterministic, no atomics. The per-element math lives in ops/common/l2sp_math.h, compiled and tested
// in the CPU build as well.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include <cmath>

#include "ops/common/l2sp_math.h"
#include "ops/l2sp_checks.h"

namespace tlkernels {
namespace {

constexpr int kChunk = 65536;
constexpr int kThreads = 256;
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;

template <int D>
struct Meta {
  void* addr[D][kMaxTensors];
  int64_t numel[kMaxTensors];
  double coeff[kMaxTensors];  // (read in the op-math type: double for float64 tensors)
  int tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
  int64_t first_block;  // global index of this launch's first chunk (penalty partial sums)

#ifdef __CUDACC__
  // This block's chunk: its tensor slot t and element range [begin, end).
  __device__ int chunk(int64_t& begin, int64_t& end) const {
    const int t = tensor_of_block[blockIdx.x];
    begin = static_cast<int64_t>(chunk_of_block[blockIdx.x]) * kChunk;
    end = min(begin + kChunk, numel[t]);
    return t;
  }
  // Operand d of tensor slot t (null when absent).
  template <typename T>
  __device__ T* operand(int d, int t) const { return static_cast<T*>(addr[d][t]); }
#endif
};
// Kernel parameters above 4 KB need CUDA 12.1 or newer (and Volta or newer GPUs).
#if defined(CUDART_VERSION) && CUDART_VERSION < 12010
static_assert(sizeof(Meta<7>) <= 4096, "tlkernels: the multi-tensor kernels pass a parameter struct of more than "
              "4 KB, which needs CUDA >= 12.1; build with a newer CUDA toolkit");
#endif

// Calls launch(meta, nblocks) for every full pack of (tensor, chunk) pairs. lists[d][t] is the d-th
// operand of tensor t (undefined = absent operand, e.g. no reference for a head parameter).
template <int D, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, const std::vector<double>& coeffs,
                        Launch launch) {
  Meta<D> meta{};
  meta.first_block = 0;
  int nt = 0, nb = 0;
  int64_t global = 0;
  for (size_t t = 0; t < lists[0].size(); ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < D; ++d) meta.addr[d][nt] = lists[d][t].defined() ? lists[d][t].data_ptr() : nullptr;
    meta.numel[nt] = numel;
    meta.coeff[nt] = coeffs[t];
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.tensor_of_block[nb] = nt;
      meta.chunk_of_block[nb] = static_cast<int>(c);
      ++nb;
      ++global;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (last_chunk && nt + 1 == kMaxTensors)) {
        launch(meta, nb);
        meta.first_block = global;
        nb = 0;
        if (last_chunk) {
          nt = -1;  // the next tensor starts at slot 0
        } else {    // this tensor goes on in the next pack, as its slot 0
          for (int d = 0; d < D; ++d) meta.addr[d][0] = meta.addr[d][nt];
          meta.numel[0] = meta.numel[nt];
          meta.coeff[0] = meta.coeff[nt];
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) launch(meta, nb);
}

int64_t count_chunks(const std::vector<at::Tensor>& ts) {
  int64_t c = 0;
  for (auto& t : ts) c += (t.numel() + kChunk - 1) / kChunk;
  return c;
}

// operands: 0 p, 1 ref (optional), 2 grad out (optional), 3 per-element weights (optional)
template <typename scalar_t>
__global__ void penalty_kernel(Meta<4> meta, at::opmath_type<scalar_t> scale, double* partial, bool accumulate) {
  using A = at::opmath_type<scalar_t>;
  int64_t base, end;
  const int t = meta.chunk(base, end);
  const auto* p = meta.template operand<const scalar_t>(0, t);
  const auto* r = meta.template operand<const scalar_t>(1, t);
  auto* g = meta.template operand<scalar_t>(2, t);
  const auto* w = meta.template operand<const scalar_t>(3, t);
  const A c = static_cast<A>(meta.coeff[t]) * scale;
  double acc = 0;
  for (int64_t i = base + threadIdx.x; i < end; i += blockDim.x) {
    const A pv = static_cast<A>(p[i]);
    const A rv = r ? static_cast<A>(r[i]) : A(0);
    const A wv = w ? static_cast<A>(w[i]) : A(1);
    acc += static_cast<double>(wv * l2sp::penalty_sq(pv, rv));
    if (g) {
      const A d = l2sp::penalty_grad(pv, rv, c * wv);
      g[i] = static_cast<scalar_t>(accumulate ? static_cast<A>(g[i]) + d : d);
    }
  }
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double s = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0 && partial) partial[meta.first_block + blockIdx.x] = s * meta.coeff[t] * 0.5;
}

// Penalty over one list (params with refs and optional weights W, or new params without). Returns
// sum coeff/2 * w (p - ref)^2 as a device scalar (if want_value) and writes gradients coeff*scale*w*(p - ref)
// into *grads (if grads).
// One launch series per dtype; each series' per-chunk partials are summed in a fixed order.
// accumulate: *grads already holds one tensor per p, and the gradient is added into it.
at::Tensor penalty_list(const std::vector<at::Tensor>& P, const std::vector<at::Tensor>& R,
                        const std::vector<at::Tensor>& W, double coeff, std::vector<at::Tensor>* grads, double scale, bool want_value, const at::Device& dev,
                        bool accumulate = false) {
  at::Tensor total = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(dev));
  std::vector<at::Tensor> G;
  if (accumulate) {
    G = *grads;
  } else {
    for (auto& p : P) G.push_back(grads ? at::empty_like(p) : at::Tensor());
  }
  for (auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<std::vector<at::Tensor>> lists(4);
    std::vector<double> coeffs;
    for (size_t i = 0; i < P.size(); ++i) {
      if (P[i].scalar_type() != dt) continue;
      lists[0].push_back(P[i]);
      lists[1].push_back(R.empty() ? at::Tensor() : R[i]);
      lists[2].push_back(G[i]);
      lists[3].push_back(W.empty() ? at::Tensor() : W[i]);
      coeffs.push_back(coeff);
    }
    if (lists[0].empty()) continue;
    at::Tensor partial = want_value ? at::zeros({count_chunks(lists[0])}, total.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "l2sp_penalty_cuda", [&] {
      multi_tensor_apply<4>(lists, coeffs, [&](const Meta<4>& meta, int nb) {
        penalty_kernel<scalar_t><<<nb, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            meta, static_cast<at::opmath_type<scalar_t>>(scale), want_value ? partial.data_ptr<double>() : nullptr, accumulate);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    if (want_value) total = total + partial.sum();
  }
  if (grads) *grads = G;
  return total;
}

std::vector<at::Tensor> dense_list(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (auto& t : ts) out.push_back(dense(t));
  return out;
}

// References in the memory layout of their (dense) parameters: the kernels index both with one flat index.
std::vector<at::Tensor> refs_like(at::TensorList refs, const std::vector<at::Tensor>& P) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < refs.size(); ++i) out.push_back(layout_like(refs[i], P[i]));
  return out;
}

at::Tensor penalty_value(const std::vector<at::Tensor>& P, const std::vector<at::Tensor>& R,
                         const std::vector<at::Tensor>& W, double alpha, const std::vector<at::Tensor>& Q, double beta, std::vector<at::Tensor>* gp,
                         std::vector<at::Tensor>* gn, bool accumulate = false) {
  bool dbl = false;
  for (auto& t : P) dbl |= t.scalar_type() == at::kDouble;
  for (auto& t : Q) dbl |= t.scalar_type() == at::kDouble;
  const auto dev = !P.empty() ? P[0].device() : Q[0].device();
  auto v = penalty_list(P, R, W, alpha, gp, 1.0, true, dev, accumulate) +
           penalty_list(Q, {}, {}, beta, gn, 1.0, true, dev, accumulate);
  return v.to(dbl ? at::kDouble : at::kFloat);
}

at::Tensor l2sp_penalty_cuda(at::TensorList params, at::TensorList refs, const OptionalTensors& weights, double alpha,
                             at::TensorList new_params, double beta) {
  check_penalty_args("l2sp_penalty", params, refs, weights, new_params);
  const c10::cuda::OptionalCUDAGuard guard(params.empty() ? new_params[0].device() : params[0].device());
  const auto P = dense_list(params);
  return penalty_value(P, refs_like(refs, P), optional_like(weights, P), alpha, dense_list(new_params), beta, nullptr,
                       nullptr);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> l2sp_penalty_backward_cuda(
    const at::Tensor& grad, at::TensorList params, at::TensorList refs, const OptionalTensors& weights, double alpha,
    at::TensorList new_params, double beta) {
  check_penalty_args("l2sp_penalty_backward", params, refs, weights, new_params);
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  // The upstream gradient scales the result on the device: reading it on the host would synchronise.
  std::vector<at::Tensor> gp, gn;
  const auto P = dense_list(params);
  penalty_list(P, refs_like(refs, P), optional_like(weights, P), alpha, &gp, 1.0, false, grad.device());
  penalty_list(dense_list(new_params), {}, {}, beta, &gn, 1.0, false, grad.device());
  const at::Tensor s = grad.reshape({});
  for (auto& g : gp) g.mul_(s.to(g.scalar_type()));
  for (auto& g : gn) g.mul_(s.to(g.scalar_type()));
  return {gp, gn};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> l2sp_value_and_grad_cuda(
    at::TensorList params, at::TensorList refs, const OptionalTensors& weights, double alpha,
    at::TensorList new_params, double beta) {
  check_penalty_args("l2sp_value_and_grad", params, refs, weights, new_params);
  const c10::cuda::OptionalCUDAGuard guard(params.empty() ? new_params[0].device() : params[0].device());
  std::vector<at::Tensor> gp, gn;
  const auto P = dense_list(params);
  auto v = penalty_value(P, refs_like(refs, P), optional_like(weights, P), alpha, dense_list(new_params), beta, &gp,
                         &gn);
  return {v, gp, gn};
}

at::Tensor l2sp_value_and_grad_inplace_cuda(at::TensorList params, at::TensorList refs,
                                             const OptionalTensors& weights, double alpha, at::TensorList new_params,
                                             double beta, at::TensorList grads, at::TensorList new_grads) {
  const char* op = "l2sp_value_and_grad_";
  check_inplace_args(op, params, refs, weights, new_params, grads, new_grads);
  const c10::cuda::OptionalCUDAGuard guard(params.empty() ? new_params[0].device() : params[0].device());
  std::vector<at::Tensor> gp(grads.begin(), grads.end()), gn(new_grads.begin(), new_grads.end());
  const auto P = dense_list(params);
  return penalty_value(P, refs_like(refs, P), optional_like(weights, P), alpha, dense_list(new_params), beta, &gp, &gn,
                       true);
}

// operands: 0 p, 1 g, 2 momentum buffer (optional), 3 ref (optional), 4 per-element weights (optional)
template <typename scalar_t>
__global__ void sgd_kernel(Meta<5> meta, at::opmath_type<scalar_t> lr, at::opmath_type<scalar_t> momentum,
                           at::opmath_type<scalar_t> dampening, at::opmath_type<scalar_t> weight_decay, bool nesterov,
                           bool maximize, bool first) {
  using A = at::opmath_type<scalar_t>;
  int64_t base, end;
  const int t = meta.chunk(base, end);
  auto* p = meta.template operand<scalar_t>(0, t);
  const auto* g = meta.template operand<const scalar_t>(1, t);
  auto* b = meta.template operand<scalar_t>(2, t);
  const auto* r = meta.template operand<const scalar_t>(3, t);
  const auto* w = meta.template operand<const scalar_t>(4, t);
  const A c = static_cast<A>(meta.coeff[t]);
  for (int64_t i = base + threadIdx.x; i < end; i += blockDim.x) {
    A buf = b ? static_cast<A>(b[i]) : A(0);
    p[i] = static_cast<scalar_t>(l2sp::sgd_update<A>(p[i], g[i], r ? static_cast<A>(r[i]) : A(0),
                                                     w ? c * static_cast<A>(w[i]) : c, &buf, first, lr, momentum,
                                                     dampening, weight_decay, nesterov, maximize));
    if (b) b[i] = static_cast<scalar_t>(buf);
  }
}

// The step kernels' operands for the params of dtype dt: p, g (in p's layout), each optimizer state (an empty
// list: that state is absent), ref, weights; coefficients in cs. False when no param has that dtype.
bool step_operands(at::ScalarType dt, at::TensorList params, at::TensorList grads,
                   const std::vector<at::TensorList>& states, const std::vector<at::Tensor>& R,
                   const std::vector<at::Tensor>& W, at::ArrayRef<double> coeffs,
                   std::vector<std::vector<at::Tensor>>& lists, std::vector<double>& cs) {
  lists.assign(4 + states.size(), {});
  cs.clear();
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].scalar_type() != dt) continue;
    size_t d = 0;
    lists[d++].push_back(params[i]);
    lists[d++].push_back(layout_like(grads[i], params[i]));
    for (const auto& st : states) lists[d++].push_back(st.empty() ? at::Tensor() : st[i]);
    lists[d++].push_back(R[i]);
    lists[d++].push_back(W[i]);
    cs.push_back(coeffs[i]);
  }
  return !cs.empty();
}

void sgd_l2sp_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, const OptionalTensors& refs,
                        const OptionalTensors& weights, at::ArrayRef<double> coeffs, double lr,
                        double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                        bool first_step) {
  const bool use_buf = momentum != 0.0;
  check_step_args("sgd_l2sp_step_", params, grads,
                  use_buf ? std::vector<at::TensorList>{bufs} : std::vector<at::TensorList>{}, {"momentum_buffers"},
                  refs, weights, coeffs);
  if (params.empty()) return;
  const c10::cuda::OptionalCUDAGuard guard(params[0].device());
  const auto R = optional_like(refs, params), W = optional_like(weights, params);
  std::vector<std::vector<at::Tensor>> lists;
  std::vector<double> cs;
  for (auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    if (!step_operands(dt, params, grads, {use_buf ? bufs : at::TensorList()}, R, W, coeffs, lists, cs)) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "sgd_l2sp_cuda", [&] {
      multi_tensor_apply<5>(lists, cs, [&](const Meta<5>& meta, int nb) {
        using A = at::opmath_type<scalar_t>;  // (float64 tensors: every scalar in double)
        sgd_kernel<scalar_t><<<nb, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            meta, static_cast<A>(lr), static_cast<A>(momentum), static_cast<A>(dampening), static_cast<A>(weight_decay),
            nesterov, maximize, first_step);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

// operands: 0 p, 1 g, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq (amsgrad, optional), 5 ref (optional),
// 6 per-element weights (optional)
template <typename scalar_t>
__global__ void adamw_kernel(Meta<7> meta, at::opmath_type<scalar_t> lr, at::opmath_type<scalar_t> beta1,
                             at::opmath_type<scalar_t> beta2, at::opmath_type<scalar_t> eps,
                             at::opmath_type<scalar_t> weight_decay, at::opmath_type<scalar_t> bias_c1,
                             at::opmath_type<scalar_t> bias_c2_sqrt, bool maximize) {
  using A = at::opmath_type<scalar_t>;
  int64_t base, end;
  const int t = meta.chunk(base, end);
  auto* p = meta.template operand<scalar_t>(0, t);
  const auto* g = meta.template operand<const scalar_t>(1, t);
  auto* m = meta.template operand<scalar_t>(2, t);
  auto* v = meta.template operand<scalar_t>(3, t);
  auto* x = meta.template operand<scalar_t>(4, t);
  const auto* r = meta.template operand<const scalar_t>(5, t);
  const auto* w = meta.template operand<const scalar_t>(6, t);
  const A c = static_cast<A>(meta.coeff[t]);
  for (int64_t i = base + threadIdx.x; i < end; i += blockDim.x) {
    A mm = m[i], vv = v[i], xx = x ? static_cast<A>(x[i]) : A(0);
    p[i] = static_cast<scalar_t>(l2sp::adamw_update<A>(p[i], g[i], r ? static_cast<A>(r[i]) : A(0),
                                                       w ? c * static_cast<A>(w[i]) : c, &mm, &vv, x ? &xx : nullptr,
                                                       lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2_sqrt,
                                                       maximize));
    m[i] = static_cast<scalar_t>(mm);
    v[i] = static_cast<scalar_t>(vv);
    if (x) x[i] = static_cast<scalar_t>(xx);
  }
}

void adamw_l2sp_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const OptionalTensors& refs,
                          const OptionalTensors& weights,
                          at::ArrayRef<double> coeffs, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int64_t step, bool maximize) {
  check_adamw_step("adamw_l2sp_step_", step);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  check_step_args("adamw_l2sp_step_", params, grads,
                  amsgrad ? std::vector<at::TensorList>{exp_avgs, exp_avg_sqs, max_exp_avg_sqs}
                          : std::vector<at::TensorList>{exp_avgs, exp_avg_sqs},
                  {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"}, refs, weights, coeffs);
  if (params.empty()) return;
  const c10::cuda::OptionalCUDAGuard guard(params[0].device());
  const auto R = optional_like(refs, params), W = optional_like(weights, params);
  const double bc1 = 1.0 - std::pow(beta1, (double)step), bc2s = std::sqrt(1.0 - std::pow(beta2, (double)step));
  std::vector<std::vector<at::Tensor>> lists;
  std::vector<double> cs;
  for (auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    if (!step_operands(dt, params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, R, W, coeffs, lists, cs)) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "adamw_l2sp_cuda", [&] {
      multi_tensor_apply<7>(lists, cs, [&](const Meta<7>& meta, int nb) {
        using A = at::opmath_type<scalar_t>;  // (float64 tensors: every scalar in double)
        adamw_kernel<scalar_t><<<nb, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            meta, static_cast<A>(lr), static_cast<A>(beta1), static_cast<A>(beta2), static_cast<A>(eps),
            static_cast<A>(weight_decay), static_cast<A>(bc1), static_cast<A>(bc2s), maximize);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CUDA, m) {
  m.impl("l2sp_penalty", &l2sp_penalty_cuda);
  m.impl("l2sp_penalty_backward", &l2sp_penalty_backward_cuda);
  m.impl("l2sp_value_and_grad", &l2sp_value_and_grad_cuda);
  m.impl("l2sp_value_and_grad_", &l2sp_value_and_grad_inplace_cuda);
  m.impl("sgd_l2sp_step_", &sgd_l2sp_step_cuda);
  m.impl("adamw_l2sp_step_", &adamw_l2sp_step_cuda);
}

}  // namespace tlkernels
