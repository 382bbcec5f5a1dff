// C++ smoke test of the op library built by CMake: every op is reachable through the dispatcher
// under torch::ops-style lookup and agrees with plain ATen on a small case.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "ops/gated_conv2d.h"
#include "ops/measured_choice.h"

#include <cstdio>
#include <cstdlib>

static int failures = 0;

static void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

int main() {
  at::manual_seed(0);
  auto x = at::randn({2, 3, 8, 8}, at::kDouble);
  auto wp = at::randn({4, 3, 3, 3}, at::kDouble);
  auto wf = at::randn({4, 3, 3, 3}, at::kDouble);
  auto g = at::rand({2, 4}, at::kDouble);
  auto y = tlkernels::gated_conv2d(x, wp, wf, g, std::nullopt, std::nullopt, {1, 1}, {1, 1}, {1, 1}, 1, false);
  auto g4 = g.view({2, 4, 1, 1});
  auto ref = (1 - g4) * at::conv2d(x, wp, {}, 1, 1) + g4 * at::conv2d(x, wf, {}, 1, 1);
  expect(at::allclose(y, ref, 1e-10, 1e-10), "gated_conv2d matches two convs and a blend");
  // gradients through the op's C++ autograd (the gate's too)
  auto xg = x.clone().requires_grad_(), gg = g.clone().requires_grad_();
  tlkernels::gated_conv2d(xg, wp, wf, gg, std::nullopt, std::nullopt, {1, 1}, {1, 1}, {1, 1}, 1, false)
      .sum()
      .backward();
  auto xr = x.clone().requires_grad_(), gr = g.clone().requires_grad_();
  auto gr4 = gr.view({2, 4, 1, 1});
  ((1 - gr4) * at::conv2d(xr, wp, {}, 1, 1) + gr4 * at::conv2d(xr, wf, {}, 1, 1)).sum().backward();
  expect(at::allclose(xg.grad(), xr.grad(), 1e-10, 1e-10) && at::allclose(gg.grad(), gr.grad(), 1e-10, 1e-10),
         "gated_conv2d's input and gate gradients match autograd through two convs and a blend");
  bool threw = false;
  try {
    tlkernels::gated_conv2d(x, wp, wf, at::rand({8, 32}, at::kDouble), std::nullopt, std::nullopt, {1, 1}, {1, 1},
                            {1, 1}, 1, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("gate must have shape") != std::string::npos;
  }
  expect(threw, "gated_conv2d rejects a bad gate shape with a message naming the argument");
  // the autocast kernels are part of the library (csrc/sources.txt lists csrc/ops/autocast)
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("tlkernels::gated_conv2d", "");
  expect(handle.hasKernelForDispatchKey(c10::DispatchKey::AutocastCPU), "gated_conv2d has its AutocastCPU kernel");
  // the measured choice's rule: the fixed rule's pick stays against noise, but only where it beats the
  // naive-equivalent candidate (index 2 here) by kBeatsNaive
  using tlkernels::pick_measured;
  expect(pick_measured({1.0, 0.9, 0.95}, 0, -1) == 0 && pick_measured({1.0, 0.8, 0.95}, 0, -1) == 1,
         "measured choice: the kept pick stays unless another is clearly faster");
  expect(pick_measured({1.0, 0.9, 0.95}, 0, 2) == 1 && pick_measured({1.0, 2.0, 0.97}, 0, 2) == 2 &&
             pick_measured({0.9, 2.0, 0.97}, 0, 2) == 0 && pick_measured({0.96, 2.0, 0.97}, 0, 2) == 2 &&
             pick_measured({3.0, 0.5, 1.1}, 2, 2) == 1,
         "measured choice: a pick that does not beat the naive-equivalent candidate loses to the fastest that does");
  std::printf("%d passed, %d failed\n", 6 - failures, failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
