// The gated convolution's kernels for CPU and CUDA tensors and the choice among its exact strategies. The
// strategies (gated_conv2d_forward.cpp, gated_conv2d_backward.cpp) are written on ATen ops so that one code
// runs oneDNN on CPU tensors and cuDNN on CUDA tensors (registered for both dispatch keys below; no nvcc).
//
// y = (1-g)*conv(x,Wp) + g*conv(x,Wf) is linear in the weights, so several exact strategies exist:
//  forward
//   * routed  - per-image binary gates ((N,), or (N, C_out) rows all 0 or all 1): split the batch by gate,
//               one weight set per part: exactly one convolution's work.
//   * mix     - CPU, groups == 1, small maps, float32 (AVX2 + FMA or AVX-512) or, in the forward, bfloat16
//               (AVX-512 BF16): our per-image gated GEMM (cpu/gated_conv2d_mix.h): one conv's FLOPs, no
//               per-image library calls.
//   * brgemm  - the same engine with oneDNN's BRGeMM ukernel (through ATen, JIT for the running ISA: AVX2,
//               AVX-512, AMX tiles for bfloat16, ...) as its micro-kernel in place of ours.
//   * blended - per image blend the weights (C_out*K values, tiny next to the conv) and run one conv on that
//               image. One conv's FLOPs, N library calls.
//   * grouped - the batch folded into groups with per-image blended weights: one grouped conv call.
//   * bmm     - 1x1 unpadded convs: per image the blended weights times the input's pixel matrix, one batched
//               GEMM (BLAS) with one conv's FLOPs and no per-image library calls.
//   * concat  - one conv over [Wp; Wf] (x read once, one large GEMM) and a fused lerp epilogue. Two convs'
//               FLOPs at full GEMM efficiency; returns diff = y_f - y_p for free (dL/dg then needs no conv).
//   * twoconv - the naive way's work: two library convolutions and a lerp (diff free). Every measured choice
//               has it as the candidate it may never be measured slower than.
//  backward
//   * routed  - one convolution backward per part.
//   * grouped - one grouped conv backward yields dx and the per-image weight gradients dW_b, from which
//               dWf = sum_b g_b dW_b, dWp = sum_b (1-g_b) dW_b and dg_b = <dW_b, Wf - Wp> follow by small
//               contractions: a training step with gate gradient costs 3 conv-equivalents.
//   * blended - per-image dx with blended weights, one batched weight gradient on g*dy.
//   * bmm     - (1x1) dx as one batched GEMM with the blended weights; weight gradients as blended's.
//   * mix     - dx and (with a gate gradient) dWf, dWp, dL/dg from the small-map engine (brgemm: its dx GEMM
//               on the BRGeMM ukernel).
//   * concat  - dx from one conv-transpose over [Wp; Wf] with ((1-g)dy, g dy).
//   * twoconv - one library convolution backward per branch with (1-g)dy and g dy.
// Choice (TLKERNELS_GATED_CONV): `auto` measures the applicable strategies once per call signature (shape,
// dtype, layout, gate kind, gradient mask, threads) on CPU tensors and keeps the fastest for the process,
// as cuDNN's benchmark mode does; on CUDA tensors it reads nothing from the device but the sizes of a routed
// call: routed for (N,) hard gates, concat otherwise (timing or inspecting gates would stall the stream; see
// inspect()). `heuristic` takes the fixed size rules below (the same
// strategy in every process). A strategy name forces that strategy wherever it applies (otherwise the
// automatic choice runs); `reference` (two convolutions and a blend) is taken by the Python front end.
//  both directions
//   * triton  - the Triton implicit GEMM (tlkernels/triton/gated_conv2d.py) for CUDA tensors (CPU tensors in
//               Triton's interpreter). Triton launches its kernels from Python, so the strategy calls the ops
//               tlkernels::gated_conv2d_{forward,backward}_triton, which tlkernels.ops.gated_conv2d defines
//               where Triton imports. Only the `triton` setting takes it (never measured or a heuristic pick).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/ConvUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "ops/cpu/gated_conv2d_mix.h"
#include "ops/gated_conv2d.h"
#include "ops/gated_conv2d_strategies.h"
#include "ops/config.h"
#include "ops/emulate_cuda.h"
#include "ops/measured_choice.h"

namespace tlkernels {
namespace gconv {
namespace {

// Heuristic rules (the `heuristic` setting), set from the timings of benchmarks/test_bench_gated_conv2d.py
// (N = 32, the ResNet-50 stage shapes, oneDNN):
// below this many output pixels per image, per-image conv calls cost more than the FLOPs they save.
constexpr int64_t kBlendMinPixels = 100;
// From this many output pixels up, a 1x1 conv's forward takes bmm (from 28x28 bmm is the closest to one plain
// conv's time; below, the small-map engine, which reuses each blended weight panel in L1, beats MKL's batched
// GEMM of few columns).
constexpr int64_t kBmmMinPixels = 784;
// The backward without a gate gradient takes bmm's dx from 14x14 up (with dL/dg the engine's weight pass
// gives dWf, dWp and dL/dg together: one GEMM less than bmm + weight gradients).
constexpr int64_t kBmmMinPixelsBackward = 196;
// From this many output pixels up, oneDNN's grouped conv (batch folded into groups) is efficient.
constexpr int64_t kGroupedMinPixels = 784;

constexpr const char* kNames[] = {"routed", "mix",  "blended", "grouped", "concat",
                                  "brgemm", "bmm", "twoconv", "triton"};
constexpr int kStrategies = 9;
const ChoiceNames kRegisterNames(kNames);

struct Setting {
  enum Mode { Auto, Heuristic, Forced } mode = Auto;
  Strategy forced = Strategy::Concat;
};

// The `gated_conv` setting (TLKERNELS_GATED_CONV; Python's tlkernels.ops.gated_conv2d documents the values):
// `reference` is taken by the Python front end before any kernel runs.
std::vector<std::string> gated_conv_choices() {
  std::vector<std::string> v{"auto", "heuristic"};
  v.insert(v.end(), kNames, kNames + kStrategies);
  v.push_back("reference");
  return v;
}
const config::Setting kGatedConvSetting("gated_conv", gated_conv_choices());

Setting setting() {
  const std::string& v = kGatedConvSetting.value();
  Setting s;
  if (v == "auto" || v == "reference") return s;
  if (v == "heuristic") {
    s.mode = Setting::Heuristic;
    return s;
  }
  for (int i = 0; i < kStrategies; ++i)
    if (v == kNames[i]) {
      s.mode = Setting::Forced;
      s.forced = static_cast<Strategy>(i);
      return s;
    }
  TORCH_CHECK(false, "gated_conv2d: unhandled gated_conv setting '", v, "'");
}

// A strategy among `cands`: forced where it applies, else the heuristic's (`heuristic`, and CUDA tensors),
// else the fastest candidate by measurement (CPU, `auto`), cached per `key` for the process.
template <class Run>
Strategy choose(const Setting& s, const std::vector<Strategy>& cands, Strategy heuristic, bool on_cpu,
                const std::string& key, const Run& run) {
  for (Strategy c : cands)
    if (s.mode == Setting::Forced && c == s.forced) return c;
  if (cands.size() == 1 || s.mode == Setting::Heuristic || !on_cpu) return heuristic;
  // (the heuristic stays unless another is clearly faster, and only where it beats twoconv, the naive way's
  // work, by measured_choice.h's margin)
  return measured_choice(key, cands, heuristic, kNames, run, std::optional<Strategy>(Strategy::TwoConv));
}

// The triton strategy (forced only): its op, defined where Triton imports.
bool triton_forced(const Setting& s) { return s.mode == Setting::Forced && s.forced == Strategy::Triton; }

template <class F>
c10::TypedOperatorHandle<F> triton_op(const char* name) {
  const auto h = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK_VALUE(h.has_value(), "gated_conv2d: the gated_conv setting 'triton' needs the Triton package, which "
                    "did not import (its kernels are defined at import of tlkernels); install triton or choose "
                    "another gated_conv setting");
  return h->typed<F>();
}

// The strategies the last forward and backward call on this thread took (diagnostics: tests check that a
// forced strategy ran; `python -m tlkernels.selfcheck` prints them).
thread_local std::string last_forward = "", last_backward = "";

// The strategies reshape weights freely and read them in the default layout, but the library convolutions of
// routed and twoconv (the naive way's work, which must cost what the naive way costs) take them as they come:
// a channels_last weight (model.to(memory_format=torch.channels_last)) is copied to the default layout once per
// call, on first use, and only where a strategy that needs it runs.
bool takes_any_layout(Strategy st) { return st == Strategy::Routed || st == Strategy::TwoConv; }

struct DenseWeights {
  const at::Tensor &pre_in, &ft_in;
  at::Tensor pre_d, ft_d;
  // (W_pre, W_ft) as strategy st reads them.
  std::pair<at::Tensor, at::Tensor> of(Strategy st) {
    if (takes_any_layout(st)) return {pre_in, ft_in};
    if (!pre_d.defined()) {
      pre_d = pre_in.contiguous();
      ft_d = ft_in.contiguous();
    }
    return {pre_d, ft_d};
  }
};

std::string call_key(const char* what, const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate,
                     const ConvArgs& a, bool binary, const std::string& extra) {
  std::ostringstream os;
  os << what << '|' << x.device().type() << '|' << x.scalar_type() << '|' << x.sizes() << '|'
     << (x.is_contiguous() ? 'c' : x.is_contiguous(at::MemoryFormat::ChannelsLast) ? 'l' : 's') << '|' << w.sizes()
     << '|' << a.stride << a.padding << a.dilation << a.groups << '|' << gate.dim() << binary << '|' << extra << '|'
     << at::get_num_threads();
  return os.str();
}

// Binary per-image gates as (N,): the (N,) gate itself, or the first column of (N, C_out) gates whose rows are
// all 0 or all 1; undefined otherwise.
at::Tensor per_image_binary(const at::Tensor& gate, bool binary) {
  if (!binary) return at::Tensor();
  if (gate.dim() == 1) return gate;
  const at::Tensor first = gate.narrow(1, 0, 1);
  return at::equal(gate, first.expand_as(gate)) ? first.squeeze(1).contiguous() : at::Tensor();
}

// What the kernels know of the gate before choosing a strategy. On CPU tensors reading values is free (no
// stream to stall), so the gate is inspected: all-0/1 soft gates and (N, C_out) gates with equal rows are
// detected. On CUDA tensors nothing is read but what routing needs: `hard` gates are binary by contract, and an
// (N,) hard gate is routed (one read for the parts' sizes, route()); a forced `routed` inspects as on the CPU.
struct GateView {
  bool binary = false;
  at::Tensor routed_gate;  // the (N,) binary per-image gate, or undefined
};

GateView inspect(const at::Tensor& gate, bool hard, bool on_cpu, const Setting& s) {
  GateView v;
  if (on_cpu || (s.mode == Setting::Forced && s.forced == Strategy::Routed)) {
    v.binary = gate_is_binary(gate, hard);
    v.routed_gate = per_image_binary(gate, v.binary);
  } else {
    v.binary = hard;
    if (hard && gate.dim() == 1) v.routed_gate = gate;
  }
  return v;
}

std::tuple<at::Tensor, at::Tensor> forward_kernel(
    const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft, const at::Tensor& gate,
    const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool hard, bool save_diff) {
  check_gated_conv2d_args(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                          groups);
  const Setting s = setting();
  if (triton_forced(s)) {
    last_forward = kNames[static_cast<int>(Strategy::Triton)];
    return triton_op<decltype(tlkernels::gated_conv2d_forward)>("tlkernels::gated_conv2d_forward_triton")
        .call(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard,
              save_diff);
  }
  const ConvArgs a{stride, padding, dilation, groups};
  DenseWeights dw{weight_pre, weight_ft};
  const auto sizes = at::native::conv_output_size(input.sizes(), weight_pre.sizes(), padding, stride, dilation);
  const auto fmt = input.suggest_memory_format();
  at::Tensor out = at::empty(sizes, input.options().memory_format(fmt));
  at::Tensor diff = at::empty({0}, input.options());
  if (input.size(0) == 0) return {out, diff};
  const int64_t P = sizes[2] * sizes[3];
  const bool on_cpu = cpu_path(input);
  const GateView gv = inspect(gate, hard, on_cpu, s);
  const bool binary = gv.binary;
  const bool need_diff = save_diff && s.mode != Setting::Forced;  // (y_f - y_p: concat and twoconv have it free)
  Route rt;
  const bool routable = gv.routed_gate.defined() && !need_diff && route(gv.routed_gate, rt);
  std::vector<Strategy> cands;
  Strategy heuristic;
  const bool mix_ok = on_cpu && mix::applicable(input, a, P);
  const bool bmm_ok = bmm_applicable(input, weight_pre, a);
  if (need_diff) {  // (the two paths that compute both branches)
    cands = {Strategy::Concat, Strategy::TwoConv};
    heuristic = Strategy::Concat;
  } else {
    // Routing is one convolution's FLOPs, but splitting the batch costs copies and smaller library calls:
    // where the gates allow it, it is measured against the others.
    if (routable) cands.push_back(Strategy::Routed);
    if (mix_ok) cands.push_back(Strategy::Mix);
    if (mix_ok && mix::brgemm_applicable(input)) cands.push_back(Strategy::Brgemm);
    if (bmm_ok) cands.push_back(Strategy::Bmm);
    cands.insert(cands.end(), {Strategy::Blended, Strategy::Grouped, Strategy::Concat, Strategy::TwoConv});
    heuristic = routable ? Strategy::Routed : !on_cpu ? Strategy::Concat
                : bmm_ok && P >= kBmmMinPixels ? Strategy::Bmm : mix_ok ? Strategy::Mix
                : P >= kBlendMinPixels ? Strategy::Blended : Strategy::Concat;
  }
  const at::Tensor g = effective_gate(gate, weight_pre.size(0), hard);
  const at::Tensor xin = input.contiguous(fmt);
  auto run = [&](Strategy st, at::Tensor& y, at::Tensor* d) {
    const auto [wp, wf] = dw.of(st);
    switch (st) {
      case Strategy::Routed: forward_routed(input, wp, wf, rt, bias_pre, bias_ft, a, y); break;
      case Strategy::Mix: mix::forward(xin, wp, wf, g, bias_pre, bias_ft, a, y, binary); break;
      case Strategy::Brgemm: mix::forward(xin, wp, wf, g, bias_pre, bias_ft, a, y, binary, /*brgemm=*/true); break;
      case Strategy::Blended: forward_blended(input, wp, wf, g, bias_pre, bias_ft, a, y); break;
      case Strategy::Grouped: forward_grouped(input, wp, wf, g, bias_pre, bias_ft, a, y); break;
      case Strategy::Bmm: forward_bmm(xin, wp, wf, g, bias_pre, bias_ft, a, y); break;
      case Strategy::Concat: forward_concat(input, wp, wf, g, bias_pre, bias_ft, a, y, d); break;
      case Strategy::TwoConv: forward_twoconv(input, wp, wf, g, bias_pre, bias_ft, a, y, d); break;
      case Strategy::Triton: TORCH_INTERNAL_ASSERT(false, "gated_conv2d: triton is never a candidate");
    }
  };
  // (routable gates have one candidate more: their own signature)
  const Strategy st = choose(s, cands, heuristic, on_cpu,
                             call_key("fwd", input, weight_pre, gate, a, binary,
                                      std::string(routable ? "r" : "") + (need_diff ? "d" : "")),
                             [&](Strategy c) {
                               at::Tensor y = at::empty_like(out);
                               run(c, y, nullptr);
                             });
  run(st, out, save_diff ? &diff : nullptr);
  last_forward = kNames[static_cast<int>(st)];
  if (save_diff && diff.numel() == 0) {  // the contract holds on every path
    c10::optional<at::Tensor> db;
    if (has(bias_pre) || has(bias_ft)) db = bias_or_zeros(bias_ft, weight_pre) - bias_or_zeros(bias_pre, weight_pre);
    diff = conv(input, weight_ft - weight_pre, db, a).contiguous(fmt);
  }
  return {out, diff};
}

Grads backward_kernel(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight_pre,
                            const at::Tensor& weight_ft, const at::Tensor& gate,
                            const c10::optional<at::Tensor>& bias_pre, const c10::optional<at::Tensor>& bias_ft,
                            const at::Tensor& diff, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, bool hard, c10::List<bool> output_mask) {
  check_gated_conv2d_args(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                          groups);
  TORCH_CHECK(output_mask.size() == 6, "gated_conv2d_backward: output_mask must have 6 values, got ",
              output_mask.size());
  const Setting s = setting();
  if (triton_forced(s)) {
    last_backward = kNames[static_cast<int>(Strategy::Triton)];
    return triton_op<decltype(tlkernels::gated_conv2d_backward)>("tlkernels::gated_conv2d_backward_triton")
        .call(grad_output, input, weight_pre, weight_ft, gate, bias_pre, bias_ft, diff, stride, padding,
              dilation, groups, hard, output_mask);
  }
  const GradMask m = GradMask::of(output_mask);
  const ConvArgs a{stride, padding, dilation, groups};
  DenseWeights dw{weight_pre, weight_ft};
  const at::Tensor& x = input;
  const at::Tensor& dy = grad_output;
  const int64_t N = x.size(0), C = weight_pre.size(0);
  const bool on_cpu = cpu_path(x);
  Grads r;
  if (N == 0) {
    r = {at::zeros_like(x), at::zeros_like(weight_pre), at::zeros_like(weight_ft), at::zeros_like(gate),
         at::zeros({C}, x.options()), at::zeros({C}, x.options())};
  } else {
    const GateView gv = inspect(gate, hard, on_cpu, s);
    const bool binary = gv.binary;
    Route rt;
    const bool routable = gv.routed_gate.defined() && route(gv.routed_gate, rt);
    const int64_t P = dy.size(2) * dy.size(3);
    const bool has_diff = diff.numel() == dy.numel();
    std::vector<Strategy> cands;
    Strategy heuristic;
    const bool mix_ok = on_cpu && mix::applicable(x, a, P);
    const bool bmm_ok = bmm_applicable(x, weight_pre, a);
    if (routable) cands.push_back(Strategy::Routed);  // (measured against the others, as forward)
    if (mix_ok) cands.push_back(Strategy::Mix);
    if (mix_ok && mix::brgemm_applicable(x)) cands.push_back(Strategy::Brgemm);
    if (bmm_ok) cands.push_back(Strategy::Bmm);
    cands.insert(cands.end(), {Strategy::Blended, Strategy::Grouped, Strategy::Concat, Strategy::TwoConv});
    heuristic = routable ? Strategy::Routed
                : !on_cpu ? Strategy::Concat
                : bmm_ok && !m.gate && P >= kBmmMinPixelsBackward ? Strategy::Bmm
                : P >= kGroupedMinPixels ? Strategy::Grouped
                : mix_ok ? Strategy::Mix
                : P >= kBlendMinPixels ? Strategy::Blended
                                       : Strategy::Concat;
    const at::Tensor g = effective_gate(gate, C, hard);
    auto run = [&](Strategy st) -> Grads {
      const auto [wp, wf] = dw.of(st);
      if (st == Strategy::Routed) return backward_routed(dy, x, wp, wf, rt, bias_pre, bias_ft, a, m, gate.dim() == 2);
      // With a gate gradient and no saved y_f - y_p, the mix engine's weight pass gives dWf, dWp and dL/dg
      // together (one weight-gradient's FLOPs instead of a weight gradient plus a conv with Wf - Wp).
      const bool wmix = (st == Strategy::Mix || st == Strategy::Brgemm) && m.gate && !has_diff &&
                        x.scalar_type() == at::kFloat;  // (mix::weight_grads: float32)
      Grads q = st == Strategy::Grouped   ? backward_grouped(dy, x, wp, wf, g, a, m)
                : st == Strategy::TwoConv ? backward_twoconv(dy, x, wp, wf, g, bias_pre, bias_ft, diff, a, m)
                                          : backward_general(dy, x, wp, wf, g, bias_pre, bias_ft, diff, a, m, st, wmix,
                                                             binary);
      const bool bias_in_dg = m.gate && (has(bias_pre) || has(bias_ft)) && (st == Strategy::Grouped || wmix);
      if (m.bias_pre || m.bias_ft || bias_in_dg) {
        const at::Tensor sum = dy.sum({2, 3});
        if (m.bias_pre) std::get<4>(q) = (sum * (1 - g)).sum(0);
        if (m.bias_ft) std::get<5>(q) = (sum * g).sum(0);
        if (bias_in_dg) std::get<3>(q) = std::get<3>(q) + gate_grad_bias(sum, bias_pre, bias_ft, weight_pre);
      }
      if (m.gate && gate.dim() == 1) std::get<3>(q) = std::get<3>(q).sum(1);
      return q;
    };
    std::ostringstream mk;
    for (int i = 0; i < 6; ++i) mk << m[i];
    mk << has_diff << (routable ? "r" : "");
    const Strategy st = choose(s, cands, heuristic, on_cpu, call_key("bwd", x, weight_pre, gate, a, binary, mk.str()),
                               [&](Strategy c) { run(c); });
    r = run(st);
    last_backward = kNames[static_cast<int>(st)];
  }
  // Masked-out gradients come back as empty tensors (the schema has no optional outputs).
  at::Tensor* t[6] = {&std::get<0>(r), &std::get<1>(r), &std::get<2>(r),
                      &std::get<3>(r), &std::get<4>(r), &std::get<5>(r)};
  // Each gradient dense in its tensor's suggested memory format, whatever the strategy (the fake says so too).
  const at::Tensor* like[6] = {&x, &weight_pre, &weight_ft, &gate, nullptr, nullptr};
  for (int i = 0; i < 6; ++i) {
    if (!m[i] || !t[i]->defined()) {
      *t[i] = at::empty({0}, x.options());
      continue;
    }
    *t[i] = t[i]->contiguous(like[i] ? like[i]->suggest_memory_format() : at::MemoryFormat::Contiguous);
    for (int j = 0; j < i; ++j)  // outputs are fresh tensors (the concat path slices dWp, dWf from one buffer)
      if (t[j]->numel() && t[i]->is_alias_of(*t[j])) *t[i] = t[i]->clone();
  }
  return r;
}

std::vector<std::string> last_strategies() { return {last_forward, last_backward}; }

// Where the forward computes both branches anyway, keeping their difference saves the backward a convolution
// for dL/dg. CUDA tensors: every gate but an (N,) hard one takes concat (both branches). CPU tensors: the
// small-map concat path for per-filter gates (below kBlendMinPixels output pixels), except float32 with
// groups 1, where the small-map engine blends the branches in the forward and computes dL/dg with the weight
// gradient in the backward. The Triton kernels compute dL/dg themselves. Sizes may be symbolic (torch.compile).
bool keeps_diff_rule(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& gate, bool hard,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!cpu_path(input)) return !(hard && gate.dim() == 1);
  if (gate.dim() != 2 || (input.scalar_type() == at::kFloat && groups == 1)) return false;
  const auto out = at::native::conv_output_size(input.sym_sizes(), weight.sym_sizes(), c10::fromIntArrayRefSlow(padding),
                                                c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(dilation));
  return out[2] * out[3] < kBlendMinPixels;
}

// The training plans of a CPU call whose per-filter gate needs a gradient, measured forward and backward
// together: `recompute_diff` (the forward keeps nothing; the backward forms dL/dg itself) and `keep_diff` (the
// forward computes both branches in one convolution over [Wp; Wf] and keeps y_f - y_p: the naive way's work,
// the candidate the choice may never be slower than).
enum class Plan { Recompute, Keep };
constexpr const char* kPlanNames[] = {"recompute_diff", "keep_diff"};
const ChoiceNames kRegisterPlanNames(kPlanNames);

// Tensors whose values the kernels can read now (not fake, functorch-wrapped or symbolic: torch.compile's
// tracing takes the rule).
bool concrete(const at::Tensor& t) {
  return t.has_storage() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

bool measured_keeps_diff(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                         const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                         const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool hard, bool rule) {
  // the gradients autograd will ask for: those of the arguments that require one
  c10::List<bool> mask({input.requires_grad(), weight_pre.requires_grad(), weight_ft.requires_grad(), true,
                        has(bias_pre) && bias_pre->requires_grad(), has(bias_ft) && bias_ft->requires_grad()});
  std::ostringstream mk;
  for (bool b : mask) mk << b;
  const ConvArgs a{stride, padding, dilation, groups};
  const std::string key =
      call_key("plan", input, weight_pre, gate, a, gate_is_binary(gate, hard), mk.str() + (hard ? "h" : ""));
  at::NoGradGuard no_grad;  // (the kernels run below autograd: nothing here is recorded)
  at::AutoDispatchBelowADInplaceOrView below;
  at::Tensor dy;  // (ones: no draw from the random generator, which the caller's training may depend on)
  const Plan p = measured_choice(
      key, std::vector<Plan>{Plan::Recompute, Plan::Keep}, rule ? Plan::Keep : Plan::Recompute, kPlanNames,
      [&](Plan c) {
        auto [y, diff] = forward_kernel(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding,
                                        dilation, groups, hard, c == Plan::Keep);
        if (!dy.defined()) dy = at::ones_like(y);
        backward_kernel(dy, input, weight_pre, weight_ft, gate, bias_pre, bias_ft, diff, stride, padding, dilation,
                        groups, hard, mask);
      },
      std::optional<Plan>(Plan::Keep));
  return p == Plan::Keep;
}

}  // namespace
}  // namespace gconv

// Whether a forward whose gate needs a gradient keeps diff = y_f - y_p. CPU tensors in the `auto` setting, with
// per-filter gates and a batch: measured (measured_keeps_diff), so that a training step is never measured
// slower than the naive way's work; elsewhere the fixed rule (keeps_diff_rule).
bool gated_conv2d_keeps_diff(const at::Tensor& input, const at::Tensor& weight_pre, const at::Tensor& weight_ft,
                             const at::Tensor& gate, const c10::optional<at::Tensor>& bias_pre,
                             const c10::optional<at::Tensor>& bias_ft, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, bool hard) {
  const gconv::Setting s = gconv::setting();
  if (gconv::triton_forced(s)) return false;  // (the Triton kernels compute dL/dg themselves)
  // (arguments the kernel will refuse: no diff, and the kernel's check reports them)
  if (input.dim() != 4 || weight_pre.dim() != 4 || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2)
    return false;
  for (int d = 0; d < 2; ++d)
    if (stride[d] < 1 || dilation[d] < 1) return false;
  const bool rule = gconv::keeps_diff_rule(input, weight_pre, gate, hard, stride, padding, dilation, groups);
  bool measurable = s.mode == gconv::Setting::Auto && cpu_path(input) && gate.dim() == 2;
  for (const at::Tensor* t : {&input, &weight_pre, &weight_ft, &gate})
    measurable = measurable && gconv::concrete(*t);
  if (!measurable || input.sym_size(0) == 0) return rule;
  return gconv::measured_keeps_diff(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                                    groups, hard, rule);
}

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def("_gated_conv2d_last_strategies() -> str[]", &gconv::last_strategies);
  // Registers weights whose packed panels the CPU engine keeps across calls (gated_conv2d_mix.h, keep_packed).
  m.def("_gated_conv2d_keep_packed(Tensor[] weights) -> ()", [](const std::vector<at::Tensor>& weights) {
    for (const at::Tensor& w : weights) gconv::mix::keep_packed(w);
  });
  // Sets whether CPU tensors on this thread take CUDA tensors' path choices (ops/emulate_cuda.h); returns the
  // previous setting.
  m.def("_emulate_cuda(bool on) -> bool", [](bool on) {
    const bool was = emulate_cuda();
    emulate_cuda() = on;
    return was;
  });
}

// The same strategies serve CPU tensors (oneDNN, plus the small-map engine) and CUDA tensors (cuDNN).
TORCH_LIBRARY_IMPL(tlkernels, CPU, m) {
  m.impl("gated_conv2d_forward", &gconv::forward_kernel);
  m.impl("gated_conv2d_backward", &gconv::backward_kernel);
}

TORCH_LIBRARY_IMPL(tlkernels, CUDA, m) {
  m.impl("gated_conv2d_forward", &gconv::forward_kernel);
  m.impl("gated_conv2d_backward", &gconv::backward_kernel);
}

}  // namespace tlkernels
