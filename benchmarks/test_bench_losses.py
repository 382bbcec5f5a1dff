"""L2-SP penalty, fused optimizer step and joint cross-entropy, on each device of conftest.bench_devices.

Run: python -m pytest benchmarks/test_bench_losses.py --benchmark-json=.benchmarks/losses.json
     python benchmarks/report.py .benchmarks/losses.json
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import tlkernels
from conftest import run
from peakmem import peak_extra_mb


def resnet50_params(device="cpu"):
    torch.manual_seed(0)
    m = torchvision.models.resnet50().to(device)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    refs = [p.detach() + 0.01 * torch.randn_like(p) for p in params]
    return params, refs


_R50 = {}


@pytest.fixture
def r50(device):
    """ResNet-50's parameters and references on `device`, made once per device (the last device's only)."""
    if device not in _R50:
        _R50.clear()
        _R50[device] = resnet50_params(device)
    return _R50[device]


# ----------------------------------------------------------------------------- L2-SP value + gradient
# Two uses. "fresh": gradients as new tensors (.grad None before). "into_grad": the training use, the task
# loss's backward has filled .grad and the penalty's gradient is added to it.
L2SP_CASES = [("fresh", p) for p in ("naive", "foreach", "tlkernels", "tlkernels_autograd", "triad")] + \
             [("into_grad", p) for p in ("naive", "foreach", "tlkernels", "triad")]


def _l2sp_provider(provider, mode, params, refs, alpha, weights=None):
    """The provider's value + gradient pass; weights: L2-SP-Fisher's per-element weights (one per tensor)."""
    fresh = mode == "fresh"

    def clear():
        if fresh:
            for p in params:
                p.grad = None

    if provider == "naive":  # the Transfer-Learning-Library way: the penalty in the loss, autograd
        def fn():
            clear()
            loss = 0.0
            for i, (p, r) in enumerate(zip(params, refs)):
                sq = (p - r).pow(2)
                loss = loss + 0.5 * alpha * (sq if weights is None else weights[i] * sq).sum()
            loss.backward()
            return loss
    elif provider == "foreach":
        def fn():
            with torch.no_grad():
                d = torch._foreach_sub([p.detach() for p in params], refs)
                if weights is None:
                    value = 0.5 * alpha * torch.stack(torch._foreach_norm(d)).pow(2).sum()
                else:  # sum w d^2 and the gradient's w d
                    wd = torch._foreach_mul(d, weights)
                    value = 0.5 * alpha * torch.stack([t.sum() for t in torch._foreach_mul(wd, d)]).sum()
                    d = wd
                if fresh:
                    torch._foreach_mul_(d, alpha)
                    return value, d
                torch._foreach_add_([p.grad for p in params], d, alpha=alpha)
                return value
    elif provider == "tlkernels":
        def fn():
            return tlkernels.ops.l2sp_value_and_grad(params, refs, alpha, accumulate=not fresh, weights=weights)
    elif provider == "tlkernels_autograd":
        def fn():
            clear()
            loss = tlkernels.ops.l2sp_penalty(params, refs, alpha, weights=weights)
            loss.backward()
            return loss
    else:  # memory-bandwidth yardstick: c = a + s*b over the same sizes into preallocated outputs
        outs = [torch.empty_like(p) for p in params]

        def fn():
            with torch.no_grad():
                for p, r, o in zip(params, refs, outs):
                    torch.add(p, r, alpha=alpha, out=o)
    return fn


@pytest.mark.parametrize("mode,provider", L2SP_CASES)
def test_l2sp_value_and_grad(benchmark, r50, mode, provider, device):
    params, refs = r50
    n = sum(p.numel() for p in params)
    what = "" if mode == "fresh" else " added into .grad,"
    benchmark.group = f"l2sp value+grad{what} resnet50 ({n / 1e6:.1f}M in {len(params)} tensors)"
    benchmark.extra_info["provider"] = provider
    for p in params:
        p.grad = None if mode == "fresh" else torch.randn_like(p)  # as left by the task loss's backward
    result = run(benchmark, _l2sp_provider(provider, mode, params, refs, 0.1), rounds=5 if mode == "fresh" else 7)
    for p in params:
        p.grad = None
    if mode == "fresh":  # one read of p, one of p0 and one write: the same for the fused pass and the triad
        benchmark.extra_info["GB/s (3 streams)"] = round(3 * 4 * n / benchmark.stats.stats.median / 1e9, 2)
    else:  # minimum traffic: the triad reads two tensors and writes one; the task reads p, p0, g, writes g
        streams = 3 if provider == "triad" else 4
        benchmark.extra_info["GB/s (minimum traffic)"] = round(streams * 4 * n / benchmark.stats.stats.median / 1e9, 2)
    return result


# ----------------------------------------------------------------------------- L2-SP-Fisher value + gradient
@pytest.mark.parametrize("provider", ["naive", "foreach", "tlkernels"])
def test_l2sp_fisher_into_grad(benchmark, r50, provider, device):
    """alpha/2 sum F (p - p0)^2 with a Fisher diagonal F on every tensor, its gradient added into .grad (the
    training use): the autograd loop, torch._foreach_*, and the fused pass (reads p, p0, F, g; writes g)."""
    params, refs = r50
    fisher = [torch.rand_like(p) for p in params]
    n = sum(p.numel() for p in params)
    benchmark.group = f"l2sp-fisher value+grad added into .grad, resnet50 ({n / 1e6:.1f}M in {len(params)} tensors)"
    benchmark.extra_info["provider"] = provider
    for p in params:
        p.grad = torch.randn_like(p)
    fn = _l2sp_provider(provider, "into_grad", params, refs, 0.1, weights=fisher)
    run(benchmark, fn, rounds=7)
    for p in params:
        p.grad = None
    benchmark.extra_info["GB/s (minimum traffic)"] = round(5 * 4 * n / benchmark.stats.stats.median / 1e9, 2)


# ----------------------------------------------------------------------------- optimizer step
@pytest.mark.parametrize("provider", ["naive", "torch_fused", "tlkernels"])
def test_sgd_l2sp_step(benchmark, provider, device):
    """SGD with momentum + the L2-SP gradient over ResNet-50: torch.optim.SGD (foreach=True: `naive`; fused=True:
    `torch_fused`) after adding alpha*(p - p0) to the gradients with torch._foreach_* (the fastest plain way),
    against the one fused step."""
    torch.manual_seed(0)
    m = torchvision.models.resnet50().to(device)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    l2 = tlkernels.nn.L2SP(m, head="fc", scope="kernels")
    benchmark.group = "sgd momentum + l2sp step resnet50"
    benchmark.extra_info["provider"] = provider
    if provider == "tlkernels":
        opt = tlkernels.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, l2sp=l2)

        def fn():
            opt.step()
    else:
        kind = {"foreach": True} if provider == "naive" else {"fused": True}
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, **kind)
        grads = [p.grad for p in l2.params]

        def fn():
            with torch.no_grad():
                torch._foreach_add_(grads, torch._foreach_sub([p.detach() for p in l2.params], l2.refs),
                                    alpha=l2.alpha)
                opt.step()
    run(benchmark, fn, rounds=5, pair=("naive", "torch_fused") if provider == "tlkernels" else None)


# ----------------------------------------------------------------------------- joint cross-entropy
N, CT, CS = 256, 100, 1000

_SETUP = f"""
import torch, torch.nn.functional as F, tlkernels
torch.manual_seed(0)
def naive(xt, yt, xs, ys):
    return 0.5 * F.cross_entropy(xt, yt) + 0.5 * F.cross_entropy(xs, ys)
def ours(xt, yt, xs, ys):
    return tlkernels.ops.joint_cross_entropy(xt, yt, xs, ys, source_weight=0.5, target_weight=0.5)
for s in (2, {N}):
    xt = torch.randn(s, {CT}, requires_grad=True); yt = torch.randint(0, {CT}, (s,))
    xs = torch.randn(s, {CS}, requires_grad=True); ys = torch.randint(0, {CS}, (s,))
    if s == 2:
        PROVIDER(xt, yt, xs, ys).backward()
"""


@pytest.mark.parametrize("provider", ["naive", "tlkernels"])
def test_joint_cross_entropy(benchmark, provider, device):
    torch.manual_seed(0)
    xt = torch.randn(N, CT, requires_grad=True, device=device)
    yt = torch.randint(0, CT, (N,), device=device)
    xs = torch.randn(N, CS, requires_grad=True, device=device)
    ys = torch.randint(0, CS, (N,), device=device)
    benchmark.group = f"joint cross-entropy fwd+bwd N={N} target {CT} source {CS} classes"
    benchmark.extra_info["provider"] = provider
    if provider == "naive":
        def fn():
            loss = 0.5 * F.cross_entropy(xt, yt) + 0.5 * F.cross_entropy(xs, ys)
            return torch.autograd.grad(loss, [xt, xs])
    else:
        def fn():
            loss = tlkernels.ops.joint_cross_entropy(xt, yt, xs, ys, source_weight=0.5, target_weight=0.5)
            return torch.autograd.grad(loss, [xt, xs])
    run(benchmark, fn, rounds=20, iterations=50)  # (unpaired: pairing needs one call per round)
    if device != "cpu":
        return  # (peak memory: the CPU process's, measured in a subprocess)
    fname = "naive" if provider == "naive" else "ours"
    benchmark.extra_info["peak extra MB"] = round(peak_extra_mb(
        _SETUP.replace("PROVIDER", fname), f"torch.autograd.grad({fname}(xt, yt, xs, ys), [xt, xs])"), 2)
