#pragma once
// The CPU small-map engine of the gated convolution: our per-image gated GEMM (mixgemm.h; groups == 1; float32
// with our AVX2 / AVX-512 micro-kernels or oneDNN's BRGeMM ukernel, bfloat16 with our AVX-512 BF16 one or
// oneDNN's). Each image's 16-filter weight panel is blended in L1 inside the GEMM loop; with binary gates the
// AVX-512 kernels take each column from W_pre's or W_ft's panel as it is (on 4x4 maps in float32, weight rows
// are selected; the bfloat16 input gradient's panels take each row from W_pre or W_ft as it is); one
// convolution's FLOPs, no per-image library calls. On AVX-512 the forward runs its contraction tap by tap, each
// tap over the output pixels it reads inside the image (the padding's zero products skipped).
#include <ATen/ATen.h>

#include "ops/gated_conv2d_strategies.h"

namespace tlkernels {
namespace gconv {
namespace mix {

// Maps of at most this many output pixels are candidates (the engine lost to oneDNN's batched paths above).
constexpr int64_t kMaxPixels = 1024;

// The engine can run this call, forward or backward (groups == 1, small map, a CPU with AVX2 + FMA; float32, or
// bfloat16 where the CPU has AVX-512 BF16 and `cpu_isa` allows it: there the backward's weight gradients are
// the library's).
bool applicable(const at::Tensor& x, const ConvArgs& a, int64_t pixels);
// Where the engine applies, whether its micro-kernel can also be oneDNN's BRGeMM ukernel for x's dtype
// (float32: always; bfloat16: where oneDNN's build and ISA cap run bfloat16 BRGeMM, AMX tiles included).
bool brgemm_applicable(const at::Tensor& x);
// Registers w, a weight that is written only through ops that bump its version counter: the forward keeps its
// packed panels across calls while it lives and is unchanged (AdaFilter's folded eval weights).
void keep_packed(const at::Tensor& w);
// out = gated conv with effective (N, C_out) gates g; `binary`: every gate is 0 or 1. brgemm: the GEMM's
// micro-kernel is oneDNN's BRGeMM ukernel (JIT for the running ISA) instead of ours (AVX2 / AVX-512; for
// bfloat16 the AVX-512 BF16 one).
void forward(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf, const at::Tensor& g,
             const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& bf, const ConvArgs& a,
             at::Tensor& out, bool binary, bool brgemm = false);
// dx = conv_transpose(dy_n, (1 - g_n) Wp + g_n Wf) per image (float32, or bfloat16 summed in float32);
// `binary`: every gate is 0 or 1.
at::Tensor input_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                      const at::Tensor& g, const ConvArgs& a, bool binary, bool brgemm = false);
// dWp, dWf (as m asks) and the weight part of dL/dg in one pass.
void weight_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wp, const at::Tensor& wf,
                  const at::Tensor& g, const ConvArgs& a, const GradMask& m, at::Tensor& dwp, at::Tensor& dwf,
                  at::Tensor& dg);

}  // namespace mix
}  // namespace gconv
}  // namespace tlkernels
