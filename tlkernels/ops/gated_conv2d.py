"""Per-example gated convolution: y = (1 - g) * conv2d(x, W_pre, b_pre) + g * conv2d(x, W_ft, b_ft).

gate g: (N,) per image (SpotTune) or (N, C_out) per image and output filter (AdaFilter); g = 1
selects the fine-tuned filter. `hard=True` uses (g >= 0.5) in the forward pass and passes the
gradient to g as for the blend (straight-through). On CPU tensors all-0/1 soft gates are detected and get the
same fast paths; on CUDA tensors the kernels read no gate values (that would stall the stream) but the sizes of a
routed call, so callers whose gates are 0/1 pass hard=True.

Kernels: exact strategies written on ATen ops in C++ (csrc/ops/gated_conv2d_aten.cpp), registered for CPU tensors
(oneDNN, plus the AVX2 small-map engine) and CUDA tensors (cuDNN): routed (per-image binary gates: one
convolution's work), blended, grouped, concat, bmm (1x1 convolutions as one batched GEMM over per-image blended
weights), mix and brgemm (the CPU small-map engine with our AVX2 / AVX-512 (bfloat16: AVX-512 BF16) or
oneDNN's BRGeMM micro-kernel, float32 or bfloat16: AMX tiles where the CPU has them),
twoconv (two library convolutions and a lerp: the naive way's work, which no measured choice may be slower than). The `gated_conv`
setting (tlkernels.config, TLKERNELS_GATED_CONV) chooses among them: `auto` (default: measured once per call
signature on CPU tensors; routed or concat on CUDA tensors), `heuristic` (fixed size rules: the same choice in
every process), a strategy name (`routed`, `mix`, `brgemm`, `blended`, `grouped`, `concat`, `bmm`, `twoconv`: forced wherever
it applies), `triton` (the Triton implicit GEMM of tlkernels/triton/gated_conv2d.py on CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1; the default nowhere) or `reference` (`gated_conv2d_reference`: two convolutions and a
blend, the oracle).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from tlkernels import config
from tlkernels._extension import HAS_C, use_reference
from tlkernels.ops._registry import COMPILED, ONE_KERNEL, define_like, op, register_op
from tlkernels.ops._utils import autocast_casts, check_tensor, compiled_checks, conv_output_hw, fail, pair

OP = "gated_conv2d"


# ----------------------------------------------------------------------------- reference (oracle)
def effective_gate(gate, hard):
    """Forward value of the gate: hard gates are rounded, with the gradient of the soft value."""
    if not hard:
        return gate
    return gate + ((gate >= 0.5).to(gate.dtype) - gate).detach()


def gated_conv2d_reference(input, weight_pre, weight_ft, gate, bias_pre=None, bias_ft=None, stride=1,
                           padding=0, dilation=1, groups=1, hard=False):
    """Two convolutions and a blend, as the papers' code computes it. Differentiable with autograd. The arguments
    are checked as the op checks them (its C++ checks: _gated_conv2d_check); without the compiled library only
    PyTorch's own checks apply."""
    _convert(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, groups)
    _check(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups)
    return _reference(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard)


def _reference(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard):
    g = effective_gate(gate, hard)
    y_pre = F.conv2d(input, weight_pre, bias_pre, stride, padding, dilation, groups)
    y_ft = F.conv2d(input, weight_ft, bias_ft, stride, padding, dilation, groups)
    g = g.reshape(g.shape[0], 1 if g.dim() == 1 else g.shape[1], 1, 1).to(y_ft.dtype)  # (autocast: conv's dtype)
    return (1 - g) * y_pre + g * y_ft


def _diff_reference(input, weight_pre, weight_ft, bias_pre, bias_ft, stride, padding, dilation, groups):
    """conv(x, Wf) - conv(x, Wp), bias included: the `diff` output of the op when save_diff is set."""
    db = None
    if bias_pre is not None or bias_ft is not None:
        db = (bias_ft if bias_ft is not None else 0) - (bias_pre if bias_pre is not None else 0)
    return F.conv2d(input, weight_ft - weight_pre, db, stride, padding, dilation, groups)


def _reference_forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation,
                       groups, hard, save_diff):
    with torch.no_grad():
        fmt = suggest_memory_format(input)
        y = gated_conv2d_reference(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding,
                                   dilation, groups, hard).contiguous(memory_format=fmt)
        diff = (_diff_reference(input, weight_pre, weight_ft, bias_pre, bias_ft, stride, padding, dilation, groups)
                .contiguous(memory_format=fmt) if save_diff else input.new_empty(0))
        return y, diff


def _reference_backward(grad_output, input, weight_pre, weight_ft, gate, bias_pre, bias_ft, diff, stride, padding,
                        dilation, groups, hard, output_mask):
    args = [input, weight_pre, weight_ft, gate, bias_pre, bias_ft]
    leaves = [a.detach().requires_grad_(m) if a is not None else None for a, m in zip(args, output_mask)]
    with torch.enable_grad():
        y = gated_conv2d_reference(*leaves, stride, padding, dilation, groups, hard)
        wanted = [a for a, m in zip(leaves, output_mask) if m and a is not None]
        grads = iter(torch.autograd.grad(y, wanted, grad_output, allow_unused=True) if wanted else [])
    out = []
    for a, m in zip(leaves, output_mask):
        if m and a is not None:
            gr = next(grads)
            out.append(torch.zeros_like(a) if gr is None else gr)
        else:
            out.append(input.new_empty(0))
    return tuple(out)


# ----------------------------------------------------------------------------- registration
def _triton_forward(*args):
    from tlkernels.triton.gated_conv2d import gated_conv2d_forward
    return gated_conv2d_forward(*args)


def _triton_backward(*args):
    from tlkernels.triton.gated_conv2d import gated_conv2d_backward
    return gated_conv2d_backward(*args)


def strategy():
    """The `gated_conv` setting (TLKERNELS_GATED_CONV; its choices are declared by the compiled library)."""
    return config.get("gated_conv")


def output_size(input, weight, stride, padding, dilation):
    """[N, C_out, H_out, W_out] of the convolution (F.conv2d's formula)."""
    return [input.shape[0], weight.shape[0]] + conv_output_hw(input, weight, stride, padding, dilation)


def _fake_forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups,
                  hard, save_diff):
    sizes = output_size(input, weight_pre, stride, padding, dilation)
    y = input.new_empty(sizes).contiguous(memory_format=suggest_memory_format(input))
    return y, (torch.empty_like(y) if save_diff else input.new_empty(0))


def _fake_backward(grad_output, input, weight_pre, weight_ft, gate, bias_pre, bias_ft, diff, stride, padding,
                   dilation, groups, hard, output_mask):
    likes = [input, weight_pre, weight_ft, gate, bias_pre, bias_ft]
    # each gradient dense in its tensor's suggested memory format, as every kernel returns it
    return tuple(t.new_empty(t.shape).contiguous(memory_format=suggest_memory_format(t)) if m and t is not None
                 else input.new_empty(0) for t, m in zip(likes, output_mask))


def _fake(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups, hard):
    return _fake_forward(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups,
                         hard, False)[0]


def _samples():
    """The public op's: per-filter soft gates with biases, per-image hard gates with groups and a 1x1 kernel,
    per-filter hard gates with stride 2 (float64; a frozen weight_pre, as in fine-tuning)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, cin, cout, h, k, s, p, d, groups, per_filter, hard, bias in (
            (2, 3, 4, 6, 3, 1, 1, 1, 1, True, False, True), (3, 4, 4, 12, 1, 1, 0, 1, 2, False, True, False),
            (2, 3, 4, 5, 3, 2, 1, 1, 1, True, True, True)):
        def t(*shape, grad=False, rand=torch.randn):
            return rand(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)
        x, wp, wf = t(n, cin, h, h, grad=True), t(cout, cin // groups, k, k), t(cout, cin // groups, k, k, grad=True)
        gate = t(*((n, cout) if per_filter else (n,)), grad=not hard, rand=torch.rand)
        bp, bf = (t(cout), t(cout, grad=True)) if bias else (None, None)
        out.append((x, wp, wf, gate, bp, bf, [s, s], [p, p], [d, d], groups, hard))
    return out


def _forward_samples():
    return [tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) + (save_diff,)
            for args in _samples() for save_diff in (False, True)]


def _backward_samples():
    out = []
    for x, wp, wf, gate, bp, bf, stride, padding, dilation, groups, hard, _ in _forward_samples()[::2]:
        y, diff = _reference_forward(x, wp, wf, gate, bp, bf, stride, padding, dilation, groups, hard, True)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        for mask, keep in (([True] * 6, True), ([True, False, True, True, False, bf is not None], False)):
            out.append((dy, x, wp, wf, gate, bp, bf, diff if keep else x.new_empty(0), stride, padding, dilation,
                        groups, hard, [m and (i < 4 or b is not None) for i, (m, b) in enumerate(
                            zip(mask, [x, wp, wf, gate, bp, bf]))]))
    return out


# The public op: one kernel below autograd for every device (csrc/ops/gated_conv2d_autograd.cpp), autograd in
# C++. Its kernels are the compiled library's strategies for CPU and CUDA tensors alike (ATen ops: oneDNN, cuDNN).
register_op("gated_conv2d", gated_conv2d_reference, cuda=ONE_KERNEL, fake=_fake, samples=_samples)
register_op("gated_conv2d_forward", _reference_forward, cuda=COMPILED, fake=_fake_forward, samples=_forward_samples)
register_op("gated_conv2d_backward", _reference_backward, cuda=COMPILED, fake=_fake_backward,
            samples=_backward_samples)
# The `triton` strategy's kernels (csrc/ops/gated_conv2d_aten.cpp calls them): ops of their own because Triton
# launches from Python; CUDA tensors, and CPU tensors in Triton's interpreter.
define_like("gated_conv2d_forward_triton", "gated_conv2d_forward", _triton_forward, _fake_forward)
define_like("gated_conv2d_backward_triton", "gated_conv2d_backward", _triton_backward, _fake_backward)


# ----------------------------------------------------------------------------- public API
@contextlib.contextmanager
def emulate_cuda():
    """CPU tensors on this thread take the path choices CUDA tensors take (csrc/ops/emulate_cuda.h: the gated
    convolution's strategy and whether it keeps diff, cross_entropy's backward): no gate inspection, no measured
    choice, no CPU engine, no read of a device value where CUDA reads none. Tests count that path's device reads
    and convolutions on the CPU (python_tests/test_host_syncs.py)."""
    was = torch.ops.tlkernels._emulate_cuda(True)
    try:
        yield
    finally:
        torch.ops.tlkernels._emulate_cuda(was)


def keep_packed(*weights):
    """Lets the CPU small-map engine keep its packed panels of these weights across calls while each lives and is
    unchanged (repacked after a change that bumps its version counter, as in-place ops do, ours included). Only
    for tensors that nothing writes without bumping it (not through `.data`, a NumPy view, or torch.compile's
    generated kernels, which rewrite their buffers): AdaFilter's folded eval weights. Tensors on other devices
    than the CPU, and calls without the compiled library, have nothing to keep."""
    cpu = [w for w in weights if isinstance(w, torch.Tensor) and w.device.type == "cpu"]
    if HAS_C and cpu:
        torch.ops.tlkernels._gated_conv2d_keep_packed(cpu)


def _resolve_padding(padding, weight, stride, dilation):
    """Returns (symmetric padding, extra right/bottom padding) for int, pair, 'valid' or 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), None
        if padding != "same":
            fail(OP, f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            fail(OP, f"padding='same' needs stride 1 (as in F.conv2d), got stride={stride}")
        if weight.dim() != 4:  # (the op's checks say what is wrong with it)
            return (0, 0), None
        total = [dilation[d] * (weight.shape[d + 2] - 1) for d in range(2)]
        left = tuple(t // 2 for t in total)
        extra = tuple(t - 2 * l for t, l in zip(total, left))
        return left, (extra if any(extra) else None)
    return pair(OP, "padding", padding, allow_zero=True), None


def _check(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups):
    """The op's argument checks (csrc/ops/gated_conv2d.cpp), run by the reference: TypeError/ValueError naming
    gated_conv2d, the argument, what was expected and what came."""
    # (under autocast the reference's convolutions cast the arguments: no common dtype yet)
    compiled_checks("_gated_conv2d_check", input, weight_pre, weight_ft, gate, bias_pre, bias_ft,
                    list(pair(OP, "stride", stride)), list(pair(OP, "padding", padding, allow_zero=True)),
                    list(pair(OP, "dilation", dilation)), groups, not autocast_casts(input))


def _convert(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, groups):
    """What the dispatcher cannot say clearly: the Python types (a tensor, an int that is not a bool)."""
    for name, t in (("input", input), ("weight_pre", weight_pre), ("weight_ft", weight_ft), ("gate", gate),
                    ("bias_pre", bias_pre), ("bias_ft", bias_ft)):
        if t is not None or not name.startswith("bias"):
            check_tensor(OP, name, t)
    if not isinstance(groups, int) or isinstance(groups, bool):
        fail(OP, f"groups must be a positive int, got {groups!r}")


def gated_conv2d(input, weight_pre, weight_ft, gate, bias_pre=None, bias_ft=None, stride=1, padding=0,
                 dilation=1, groups=1, hard=False):
    """y = (1 - g) * conv2d(x, weight_pre, bias_pre) + g * conv2d(x, weight_ft, bias_ft).

    input (N, C_in, H, W), any floating dtype, CPU or CUDA, contiguous or channels_last; weight_pre and
    weight_ft (C_out, C_in / groups, kH, kW) and gate, (N,) per image or (N, C_out) per image and filter,
    in input's dtype and device; bias_pre / bias_ft (C_out,) or None. stride, padding (an int, a pair,
    'same' or 'valid'), dilation and groups as in F.conv2d. hard=True uses g >= 0.5 in the forward pass (a
    NaN gate gives NaN outputs, as the formula) and passes the gradient to g as for the blend
    (straight-through). Gate values are not range-checked (that would need a device sync). Returns
    (N, C_out, H_out, W_out) in input's memory format. Gradients flow to every input that requires grad; a
    frozen weight_pre costs no weight-gradient work. The strategy follows TLKERNELS_GATED_CONV (module
    docstring). Raises TypeError for non-tensors or mismatched dtypes, ValueError for shapes, groups,
    stride/padding/dilation or an input smaller than the dilated kernel (the op's checks, in C++).
    """
    _convert(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, groups)
    stride = pair(OP, "stride", stride)
    dilation = pair(OP, "dilation", dilation)
    padding, extra = _resolve_padding(padding, weight_pre, stride, dilation)
    if extra is not None:  # 'same' with an even dilated kernel: the extra pixel goes right/bottom, as in F.conv2d
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    # (before the dispatcher picks a kernel by the tensors' devices: a stray meta or CPU tensor among them would
    # otherwise choose the kernel)
    _check(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups)
    if use_reference() or strategy() == "reference":
        return _reference(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, stride, padding, dilation, groups,
                          hard)
    return op("gated_conv2d")(input, weight_pre, weight_ft, gate, bias_pre, bias_ft, list(stride), list(padding),
                              list(dilation), groups, bool(hard))
