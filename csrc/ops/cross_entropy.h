#pragma once
// The cross-entropy ops' C++ signatures, declared once: these functions call the ops through the dispatcher
// (ops/cross_entropy.cpp, `typed<decltype(cross_entropy)>()`), and every kernel is a function of the same type.
//   cross_entropy        (loss, d loss / d logits for an upstream gradient of 1, or empty without compute_grad)
//   joint_cross_entropy  (loss, d loss / d target_logits, d loss / d source_logits)
#include <ATen/ATen.h>
#include <string>
#include <tuple>

namespace tlkernels {

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                 const c10::optional<at::Tensor>& sample_weight, int64_t ignore_index,
                                                 int64_t reduction, double scale, bool compute_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_cross_entropy(
    const at::Tensor& target_logits, const at::Tensor& target_labels,
    const c10::optional<at::Tensor>& target_sample_weight, const at::Tensor& source_logits,
    const at::Tensor& source_labels, const c10::optional<at::Tensor>& source_sample_weight, int64_t ignore_index,
    int64_t reduction, double target_weight, double source_weight, bool compute_grad);

// The names of one head's arguments in error messages: cross_entropy's (head "": logits, target,
// sample_weight) or one head of joint_cross_entropy's (head "source": source_logits, source_labels,
// source_sample_weight).
struct HeadNames {
  std::string logits, target, sample_weight;
  explicit HeadNames(const std::string& head)
      : logits(head.empty() ? "logits" : head + "_logits"),
        target(head.empty() ? "target" : head + "_labels"),
        sample_weight(head.empty() ? "sample_weight" : head + "_sample_weight") {}
};

// The arguments of one head (ValueError / TypeError naming `op` and the argument): logits (N, C) floating;
// target int64 labels (N,) or a probability matrix of the logits' shape, on their device; sample_weight None
// or (N,) floating on their device. Shared by the kernels and _cross_entropy_check (the Python front ends'
// checks, before dispatch, for every device).
void check_cross_entropy_args(const char* op, const HeadNames& names, const at::Tensor& logits,
                              const at::Tensor& target, const c10::optional<at::Tensor>& sample_weight);

// The error for a hard label outside [0, C) that is not ignore_index (a RuntimeError, as F.cross_entropy's).
[[noreturn]] void label_out_of_range(const char* op, const HeadNames& names, int64_t i, int64_t label, int64_t C,
                                     int64_t ignore_index);

}  // namespace tlkernels
