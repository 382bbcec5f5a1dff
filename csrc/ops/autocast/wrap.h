#pragma once
// Autocast kernels of the tlkernels ops (the pattern of torchvision/csrc/ops/autocast/, one file per op, each
// ending in its registration): under torch.autocast the dispatcher reaches these first; each casts its
// floating-point tensor arguments and calls the op again below the autocast key, so autograd records the casts
// and gradients come back in the arguments' own dtypes.
//   gated_conv2d                 -> the autocast dtype (bf16 / fp16), as aten::conv2d: oneDNN / cuDNN and our
//                                   kernels accumulate in float32 and round the result once.
//   cross_entropy, joint_cross_entropy, filterbank_histogram, l2sp_penalty, l2sp_value_and_grad
//                                -> float32, as aten::cross_entropy / log_softmax / norm: sums over many terms.
// The optimizer and other in-place ops get no autocast kernel: they run in their tensors' own dtypes
// (parameters and optimizer state stay float32 under autocast, as with torch.optim).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace tlkernels {
namespace autocast {

// ATen's own autocast wrapper: excludes the device's autocast key, casts every eligible (floating, on that
// device) tensor argument, tensor lists included, and calls F (a function of the op's declared type).
template <at::autocast::CastPolicy policy, c10::DeviceType device, class Sig, Sig* F>
constexpr auto wrap() {
  return &at::autocast::WrapFunction<policy, device, Sig, Sig, F>::type::call;
}

}  // namespace autocast
}  // namespace tlkernels
