#pragma once
// The L2-SP ops' and fused optimizer steps' C++ signatures, declared once: these functions call the ops through
// the dispatcher (ops/l2sp.cpp, `typed<decltype(l2sp_penalty)>()`), and every kernel is a function of the same
// type.
#include <ATen/ATen.h>
#include <tuple>
#include <vector>

namespace tlkernels {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;
using TensorVectors = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

at::Tensor l2sp_penalty(at::TensorList params, at::TensorList refs, const OptionalTensorList& weights, double alpha,
                        at::TensorList new_params, double beta);

TensorVectors l2sp_penalty_backward(const at::Tensor& grad, at::TensorList params, at::TensorList refs,
                                    const OptionalTensorList& weights, double alpha, at::TensorList new_params,
                                    double beta);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> l2sp_value_and_grad(
    at::TensorList params, at::TensorList refs, const OptionalTensorList& weights, double alpha,
    at::TensorList new_params, double beta);

at::Tensor l2sp_value_and_grad_(at::TensorList params, at::TensorList refs, const OptionalTensorList& weights,
                                double alpha, at::TensorList new_params, double beta, at::TensorList grads,
                                at::TensorList new_grads);

void sgd_l2sp_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const OptionalTensorList& refs, const OptionalTensorList& weights, at::ArrayRef<double> coeffs,
                    double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                    bool first_step);

void adamw_l2sp_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const OptionalTensorList& refs,
                      const OptionalTensorList& weights, at::ArrayRef<double> coeffs, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step, bool maximize);

}  // namespace tlkernels
