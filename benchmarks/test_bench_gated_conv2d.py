"""Gated convolution, N=32, ResNet-50 stage shapes, float32 and bfloat16 (`bf16` in the group name: input,
weights and gates in bfloat16), on each device of conftest.bench_devices. Providers:
naive     two F.conv2d and a blend (what the papers' code does)
grouped   batch folded into groups with per-image blended weights (CondConv-style code)
plain     one F.conv2d (the floor)
tlkernels tlkernels.ops.gated_conv2d
Run: python -m pytest benchmarks/test_bench_gated_conv2d.py --benchmark-json=.benchmarks/gated.json
     python benchmarks/report.py .benchmarks/gated.json
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import run
from tlkernels.ops import gated_conv2d

N = 32
SHAPES = [(64, 56, 3), (64, 56, 1), (128, 28, 3), (128, 28, 1), (256, 14, 3), (256, 14, 1), (512, 7, 3), (512, 7, 1)]
MODES = ["fwd_hard_filter", "fwd_hard_image", "fwd_soft", "fwdbwd_gate_grad", "fwdbwd_no_gate_grad"]
PROVIDERS = ["naive", "grouped", "plain", "tlkernels"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive(x, wp, wf, g, p):
    g4 = g.reshape(g.shape[0], -1, 1, 1)
    return (1 - g4) * F.conv2d(x, wp, padding=p) + g4 * F.conv2d(x, wf, padding=p)


def grouped(x, wp, wf, g, p):
    n, c = x.shape[0], wp.shape[0]
    g4 = g.reshape(n, -1, 1, 1, 1).expand(n, c, 1, 1, 1)
    w = (wp + g4 * (wf - wp)).reshape(n * c, *wp.shape[1:])
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, padding=p, groups=n)
    return y.reshape(n, c, *y.shape[2:])


def plain(x, wp, wf, g, p):
    return F.conv2d(x, wf, padding=p)


def ours(x, wp, wf, g, p, hard=False):
    return gated_conv2d(x, wp, wf, g, padding=p, hard=hard)  # (0/1 gates: hard=True, as the methods pass it)


FN = {"naive": naive, "grouped": grouped, "plain": plain, "tlkernels": ours}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}ch{s[1]}px{s[2]}x{s[2]}")
@pytest.mark.parametrize("precision", DTYPES)
def test_gated_conv2d(benchmark, precision, shape, mode, provider, device):
    c, hw, k = shape
    dt = DTYPES[precision]
    benchmark.group = f"gated_conv2d {c}ch {hw}x{hw} {k}x{k} {mode}" + ("" if precision == "fp32" else f" {precision}")
    benchmark.extra_info["provider"] = provider
    x = torch.randn(N, c, hw, hw, device=device, dtype=dt)
    wp = torch.randn(c, c, k, k, device=device, dtype=dt) * 0.05
    wf = (wp + 0.01 * torch.randn_like(wp)).requires_grad_(mode.startswith("fwdbwd"))
    if mode == "fwd_hard_image":
        g = (torch.rand(N, device=device) > 0.5).to(dt)
    elif mode == "fwd_hard_filter":
        g = (torch.rand(N, c, device=device) > 0.5).to(dt)
    else:
        g = torch.rand(N, c, device=device, dtype=dt)
    g.requires_grad_(mode == "fwdbwd_gate_grad")
    fn, p = FN[provider], k // 2
    if provider == "tlkernels" and mode.startswith("fwd_hard"):
        fn = functools.partial(ours, hard=True)
    if mode.startswith("fwd_"):
        def step():
            with torch.no_grad():
                return fn(x, wp, wf, g, p)
    else:
        x.requires_grad_()
        inputs = [t for t in (x, wf, g) if t.requires_grad]

        def step():
            y = fn(x, wp, wf, g, p)
            return torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)  # plain ignores g
    run(benchmark, step, rounds=5, pair=("naive", "plain") if provider == "tlkernels" else None)  # (targets' refs)
    if provider == "tlkernels":  # the strategies the measured choice took in this process (forward, backward)
        taken = torch.ops.tlkernels._gated_conv2d_last_strategies()  # (the backward's is stale in fwd_ modes)
        benchmark.extra_info["strategies"] = taken[0] if mode.startswith("fwd_") else "/".join(taken)
