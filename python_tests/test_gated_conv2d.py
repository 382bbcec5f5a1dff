
import pytest
import torch
import torch.nn.functional as F

import tlkernels
from tlkernels.ops import gated_conv2d, gated_conv2d_reference

OP = torch.ops.tlkernels.gated_conv2d.default

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
SHAPES = [
    (3, 4, 6, 8, 8, 1, 1, 0, 1, 1),      # 1x1
    (2, 3, 5, 9, 7, 3, 1, 1, 1, 1),      # 3x3, odd, non-square
    (2, 3, 4, 15, 15, 7, 2, 3, 1, 1),    # 7x7 stride 2 (ResNet stem)
    (2, 4, 4, 11, 11, 3, 1, 2, 2, 1),    # dilation
    (1, 4, 6, 12, 12, 3, 2, 1, 1, 2),    # N=1, groups, stride 2 (6x6 out: concat path)
    (2, 2, 3, 12, 12, 3, 1, 1, 1, 1),    # 144 output pixels: per-image blended path
    (2, 4, 6, 29, 28, 3, 1, 1, 1, 2),    # 812 output pixels: grouped backward, with groups
    (0, 3, 4, 6, 6, 3, 1, 1, 1, 1),      # empty batch
]
GATES = ["image_soft", "filter_soft", "image_hard", "filter_hard", "hard_flag", "zeros", "ones"]


def make_gate(kind, n, c, dtype=torch.float64):
    if kind == "image_soft":
        return torch.rand(n, dtype=dtype), False
    if kind == "filter_soft":
        return torch.rand(n, c, dtype=dtype), False
    if kind == "image_hard":
        return (torch.arange(n) % 2).to(dtype), False
    if kind == "filter_hard":
        return (torch.rand(n, c) > 0.5).to(dtype), False
    if kind == "hard_flag":
        return torch.rand(n, c, dtype=dtype), True
    if kind == "zeros":
        return torch.zeros(n, c, dtype=dtype), False
    return torch.ones(n, dtype=dtype), False


def make_case(shape, gate_kind, dtype=torch.float64, bias=True):
    n, ci, co, h, w, k, s, p, d, g = shape
    x = torch.randn(n, ci, h, w, dtype=dtype)
    wp = torch.randn(co, ci // g, k, k, dtype=dtype)
    wf = torch.randn(co, ci // g, k, k, dtype=dtype)
    gate, hard = make_gate(gate_kind, n, co, dtype)
    bp = torch.randn(co, dtype=dtype) if bias else None
    bf = torch.randn(co, dtype=dtype) if bias else None
    return (x, wp, wf, gate, bp, bf), dict(stride=s, padding=p, dilation=d, groups=g, hard=hard)


def grads(fn, tensors, kw, dy=None):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves, **kw)
    if dy is None:
        dy = torch.randn_like(y)
    want = [t for t in leaves if t is not None]
    gs = torch.autograd.grad(y, want, dy, allow_unused=True) if y.numel() else [torch.zeros_like(t) for t in want]
    return y, [torch.zeros_like(t) if gr is None else gr for gr, t in zip(gs, want)], dy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gate_kind", GATES)
def test_matches_reference_float64(shape, gate_kind):
    tensors, kw = make_case(shape, gate_kind)
    y_ref, g_ref, dy = grads(gated_conv2d_reference, tensors, kw)
    y, g, _ = grads(gated_conv2d, tensors, kw, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate_kind", ["zeros", "ones"])
def test_constant_gates_are_plain_convs(gate_kind):
    (x, wp, wf, gate, bp, bf), kw = make_case((2, 3, 5, 10, 10, 3, 1, 1, 1, 1), gate_kind)
    y = gated_conv2d(x, wp, wf, gate, bp, bf, padding=1)
    w, b = (wp, bp) if gate_kind == "zeros" else (wf, bf)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate_kind", ["image_soft", "filter_soft", "filter_hard", "image_hard"])
@pytest.mark.parametrize("hw", [5, 11])
def test_gradcheck(gate_kind, hw):
    (x, wp, wf, gate, bp, bf), kw = make_case((2, 2, 3, hw, hw, 3, 1, 1, 1, 1), gate_kind)
    leaves = [t.requires_grad_() for t in (x, wp, wf, gate, bp, bf)]
    assert torch.autograd.gradcheck(lambda *a: gated_conv2d(*a, **kw), leaves, eps=1e-6, atol=1e-6)


def test_frozen_weight_gets_no_gradient_work():
    (x, wp, wf, gate, bp, bf), kw = make_case((2, 3, 4, 6, 6, 3, 1, 1, 1, 1), "filter_soft")
    mask = [True, False, True, True, False, True]
    out = torch.ops.tlkernels.gated_conv2d_backward(torch.randn(2, 4, 6, 6, dtype=x.dtype), x, wp, wf, gate, bp,
                                                    bf, x.new_empty(0), [1, 1], [1, 1], [1, 1], 1, False, mask)
    for t, m in zip(out, mask):
        assert (t.numel() > 0) == m
    # autograd asks only for what requires grad
    x.requires_grad_()
    wf.requires_grad_()
    y = gated_conv2d(x, wp, wf, gate, bp, bf, padding=1)
    y.sum().backward()
    assert wp.grad is None and x.grad is not None and wf.grad is not None


def test_torch_compile_fullgraph():
    conv = tlkernels.nn.GatedConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    gate = torch.rand(2, 4, requires_grad=True)

    def f(x, gate):
        return conv(x, gate).relu().sum()

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, gate)
    gx, gg = torch.autograd.grad(out, [x, gate])
    ref = f(x, gate)
    rx, rg = torch.autograd.grad(ref, [x, gate])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gg, rg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate_kind", ["filter_soft", "image_hard"])
@pytest.mark.parametrize("hw", [6, 12])
def test_low_precision_error_within_twice_reference(dtype, gate_kind, hw):
    tensors, kw = make_case((2, 8, 8, hw, hw, 3, 1, 1, 1, 1), gate_kind)
    exact = gated_conv2d_reference(*tensors, **kw)
    low = [t.to(dtype) if t is not None else None for t in tensors]
    ref_err = (gated_conv2d_reference(*low, **kw).double() - exact).abs().max().item()
    err = (gated_conv2d(*low, **kw).double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3 * exact.abs().max().item(), (err, ref_err)


def test_noncontiguous_and_channels_last():
    (x, wp, wf, gate, bp, bf), kw = make_case((2, 4, 6, 12, 12, 3, 1, 1, 1, 1), "filter_soft")
    ref = gated_conv2d_reference(x, wp, wf, gate, bp, bf, padding=1)
    xcl = x.contiguous(memory_format=torch.channels_last)
    ycl = gated_conv2d(xcl, wp, wf, gate, bp, bf, padding=1)
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ycl, ref)
    xnc = torch.randn(2, 12, 12, 4, dtype=x.dtype).permute(0, 3, 1, 2)  # non-contiguous view
    xnc.copy_(x)
    gnc = torch.rand(6, 2, dtype=x.dtype).t()
    torch.testing.assert_close(gated_conv2d(xnc, wp, wf, gnc, bp, bf, padding=1),
                               gated_conv2d_reference(x, wp, wf, gnc, bp, bf, padding=1))


@pytest.mark.parametrize("k,dil", [(3, 1), (4, 1), (2, 3)])
def test_padding_same_and_valid(k, dil):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    wp, wf = torch.randn(2, 4, 3, k, k, dtype=torch.float64)
    gate = torch.rand(2, 4, dtype=torch.float64)
    for pad in ("same", "valid"):
        y = gated_conv2d(x, wp, wf, gate, padding=pad, dilation=dil)
        g = gate[:, :, None, None]
        ref = (1 - g) * F.conv2d(x, wp, padding=pad, dilation=dil) + g * F.conv2d(x, wf, padding=pad, dilation=dil)
        torch.testing.assert_close(y, ref)


def test_reference_backend_env(settings):
    tensors, kw = make_case((2, 3, 4, 6, 6, 3, 1, 1, 1, 1), "filter_soft")
    fast = gated_conv2d(*tensors, **kw)
    settings(backend="reference")
    torch.testing.assert_close(gated_conv2d(*tensors, **kw), fast)
    with pytest.raises(ValueError, match="tlkernels.config: backend must be one of auto, reference, got 'bogus'"):
        settings(backend="bogus")
    torch.testing.assert_close(gated_conv2d(*tensors, **kw), fast)  # (a refused value changes nothing)


BAD = [
    ("gate", lambda a: a.update(gate=torch.rand(8, 32)), r"gate must have shape \(N,\) or \(N, C_out\) = \(2, 4\), got \(8, 32\)"),
    ("weight_ft", lambda a: a.update(weight_ft=torch.randn(4, 3, 1, 1)), "weight_ft must have the shape of weight_pre"),
    ("dtype", lambda a: a.update(gate=a["gate"].double()), "gate must have dtype torch.float32"),
    ("weight dtype", lambda a: a.update(weight_pre=a["weight_pre"].half()), "weight_pre must have dtype"),
    ("device", lambda a: a.update(bias_ft=torch.randn(4, device="meta")), "bias_ft must be on device cpu"),
    ("rank", lambda a: a.update(input=a["input"][0]), "input must be 4-D"),
    ("channels", lambda a: a.update(input=torch.randn(2, 5, 6, 6)), "input must have C_in"),
    ("bias shape", lambda a: a.update(bias_pre=torch.randn(3)), r"bias_pre must have shape \(4,\)"),
    ("stride", lambda a: a.update(stride=0), "stride must be >= 1"),
    ("padding", lambda a: a.update(padding="full"), "padding must be an int, a pair of ints, 'same' or 'valid'"),
    ("groups", lambda a: a.update(groups=2), "input must have C_in"),
    ("type", lambda a: a.update(input=[1.0]), "input must be a torch.Tensor"),
    ("too small", lambda a: a.update(input=torch.randn(2, 3, 1, 1)), r"input spatial size \(1, 1\) with padding \(0, 0\) is smaller than the dilated kernel"),
]


@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(name, mutate, msg):
    args = dict(input=torch.randn(2, 3, 6, 6), weight_pre=torch.randn(4, 3, 3, 3), weight_ft=torch.randn(4, 3, 3, 3),
                gate=torch.rand(2, 4), bias_pre=None, bias_ft=torch.randn(4))
    mutate(args)
    with pytest.raises((ValueError, TypeError), match="gated_conv2d: " + msg):
        gated_conv2d(**args)


def test_cpp_kernel_checks_name_the_argument():
    """The op's checks are the front end's (one home, C++): the same ValueError / TypeError either way."""
    x, wp = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"gated_conv2d: gate must have shape \(N,\) or \(N, C_out\) = \(2, 4\), got \(8, 32\)"):
        OP(x, wp, wp, torch.rand(8, 32), None, None, [1, 1], [0, 0], [1, 1], 1, False)


# ---------------------------------------------------------------- float32 small-map engine (csrc/ops/cpu/mixgemm.h)
# Per-filter gates in float32 with groups == 1 on maps up to 28x28 run our own AVX2 GEMM on the CPU; the
# float64 tests above never reach it. Shapes chosen for its edges: 4x4 (row-selection engine for hard
# gates), 7x7 (uneven pixel tiles), 14x14, stride 2, dilation, a 1x1 conv read in place, C_out not a
# multiple of 6 or 16, K = C_in*kH*kW and C_out above one 256-row block, odd batch (uneven image blocks),
# taps that reach part of the output or none of it (AVX-512: the forward skips their padding by tap).
MIX_SHAPES = [
    (5, 6, 20, 4, 4, 3, 1, 1, 1),
    (9, 30, 13, 7, 7, 3, 1, 1, 1),      # K = 270: two contraction blocks
    (3, 8, 300, 7, 7, 1, 1, 0, 1),      # 1x1 read in place; C_out = 300: two blocks in the input gradient
    (2, 5, 17, 14, 14, 3, 1, 1, 1),
    (3, 7, 11, 15, 13, 3, 2, 1, 1),     # stride 2, odd non-square
    (2, 4, 6, 11, 11, 3, 1, 2, 2),      # dilation
    (4, 12, 16, 8, 8, 1, 2, 0, 1),      # 1x1 stride 2 -> 4x4
    (1, 3, 5, 2, 3, 3, 1, 1, 1),        # 6 pixels, N = 1
    (2, 4, 9, 5, 3, 3, 1, 1, 1),        # 15 pixels: row-selection engine with a padded pixel
    (3, 8, 10, 5, 3, 1, 1, 0, 1),       # the same with a 1x1 conv (copied, not read in place)
    (2, 3, 5, 28, 28, 3, 1, 1, 1),      # 784 pixels: the largest map the engine takes
    (2, 4, 8, 3, 3, 3, 1, 2, 1),        # padding 2: corner taps reach a 3x3 corner of the 5x5 output
    (2, 6, 10, 9, 9, 5, 2, 2, 1),       # 5x5 taps, stride 2
    (2, 4, 6, 1, 1, 3, 2, 1, 1),        # a 1x1 output: six of the nine taps read only padding
]


# The engine with each micro-kernel: ours (mix) and oneDNN's BRGeMM ukernel (brgemm), forced.
ENGINES = ["mix", "brgemm"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", MIX_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gate_kind", ["filter_soft", "filter_hard", "hard_flag"])
@pytest.mark.parametrize("gate_grad", [False, True])
def test_float32_small_map_engine_matches_reference(settings, engine, shape, gate_kind, gate_grad):
    settings(gated_conv=engine)
    n, ci, co, h, w, k, s, p, d = shape
    torch.manual_seed(sum(shape))
    (x, wp, wf, gate, bp, bf), kw = make_case((n, ci, co, h, w, k, s, p, d, 1), gate_kind)
    exact_y, exact_g, dy = grads(gated_conv2d_reference, (x, wp, wf, gate, bp, bf), kw)
    f32 = [t.float() for t in (x, wp, wf, gate, bp, bf)]
    ref_y, ref_g, _ = grads(gated_conv2d_reference, f32, kw, dy.float())

    leaves = [t.clone().requires_grad_(i != 1 and (i != 3 or gate_grad)) for i, t in enumerate(f32)]
    y = gated_conv2d(*leaves, **kw)
    y.backward(dy.float())
    assert list(torch.ops.tlkernels._gated_conv2d_last_strategies()) == [engine, engine]  # it ran both ways
    assert leaves[1].grad is None  # frozen weight_pre: no gradient
    assert (leaves[3].grad is not None) == gate_grad

    def close(ours, ref, exact):
        err = (ours.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * exact.abs().max().item(), (err, ref_err)

    close(y, ref_y, exact_y)
    for i in (0, 2, 3, 4, 5):
        if leaves[i].grad is not None:
            close(leaves[i].grad, ref_g[i], exact_g[i])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("hw", [4, 7])
def test_float32_small_map_engine_channels_last_and_strided(settings, engine, hw):
    settings(gated_conv=engine)
    (x, wp, wf, gate, bp, bf), kw = make_case((3, 5, 10, hw, hw, 3, 1, 1, 1, 1), "filter_hard", dtype=torch.float32)
    ref = gated_conv2d_reference(x, wp, wf, gate, bp, bf, padding=1)
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    ycl = gated_conv2d(xcl, wp, wf, gate, bp, bf, padding=1)
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ycl, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ref)
    ycl.backward(dy)
    xr = x.clone().requires_grad_()
    gated_conv2d_reference(xr, wp, wf, gate, bp, bf, padding=1).backward(dy)
    torch.testing.assert_close(xcl.grad, xr.grad, rtol=1e-5, atol=1e-5)
    xs = torch.randn(3, 5, hw, 2 * hw)[..., ::2]  # every other column: W stride 2
    torch.testing.assert_close(gated_conv2d(xs, wp, wf, gate, bp, bf, padding=1),
                               gated_conv2d_reference(xs.contiguous(), wp, wf, gate, bp, bf, padding=1),
                               rtol=1e-5, atol=1e-5)


def test_float32_small_map_engine_binary_gates_are_exact_selection():
    # (1-g)*wp + g*wf with g in {0, 1} is exactly wp or wf: the engine must equal a plain conv with the
    # selected filters up to GEMM summation order, also where wp and wf differ by many orders of magnitude.
    x = torch.randn(4, 6, 7, 7)
    wp, wf = torch.randn(8, 6, 3, 3) * 1e6, torch.randn(8, 6, 3, 3) * 1e-6
    gate = torch.zeros(4, 8)
    gate[:, ::2] = 1
    y = gated_conv2d(x, wp, wf, gate, padding=1)
    want = torch.where(gate[..., None, None] > 0.5, F.conv2d(x, wf, padding=1), F.conv2d(x, wp, padding=1))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want[:, 1::2].abs().max().item())
    torch.testing.assert_close(y[:, ::2], want[:, ::2], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [MIX_SHAPES[1], MIX_SHAPES[2], MIX_SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_float32_small_map_engine_all_gradients(settings, engine, shape):
    settings(gated_conv=engine)
    # every input requires grad, weight_pre too: the engine's weight pass then writes dWp, dWf and dL/dg
    n, ci, co, h, w, k, s, p, d = shape
    torch.manual_seed(7)
    (x, wp, wf, gate, bp, bf), kw = make_case((n, ci, co, h, w, k, s, p, d, 1), "filter_soft")
    exact_y, exact_g, dy = grads(gated_conv2d_reference, (x, wp, wf, gate, bp, bf), kw)
    f32 = [t.float() for t in (x, wp, wf, gate, bp, bf)]
    _, ref_g, _ = grads(gated_conv2d_reference, f32, kw, dy.float())
    _, ours, _ = grads(gated_conv2d, f32, kw, dy.float())
    for a, r, e in zip(ours, ref_g, exact_g):
        err, ref_err = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * e.abs().max().item(), (err, ref_err)
