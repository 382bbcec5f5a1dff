"""SpotTune and AdaFilter on ResNet-18, on each device of conftest.bench_devices. Providers: naive = both copies /
branches computed and blended (the papers' code), tlkernels = routed SpotTune eval / fused AdaFilter,
tlkernels_pt2 = the torch.export program of tlkernels' eval model as the trainer exports it for model.pt2
(train.export.fold_batchnorm; here exported at the benchmark's input size), saved and loaded back. Eval
precisions: fp32; bf16 (model and input in bfloat16); autocast_bf16 (the float32 model under torch.autocast in
bfloat16, also the float32 model.pt2's way to serve in bf16).

Run: python -m pytest benchmarks/test_bench_methods.py --benchmark-json=.benchmarks/methods.json
     python benchmarks/report.py .benchmarks/methods.json
"""
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import run
from tlkernels.methods import AdaFilter, SpotTune
from tlkernels.train.export import fold_batchnorm

# (precision, provider) of the eval cases, baselines first (the ratios pair each round with them): the exported
# program is float32 (served in bf16 under autocast)
PRECISIONS = ("fp32", "bf16", "autocast_bf16")


def _eval_cases(baselines):
    return [(p, v) for p in PRECISIONS for v in baselines + ("tlkernels", "tlkernels_pt2")
            if not (p == "bf16" and v == "tlkernels_pt2")]


def _in_precision(m, x, precision):
    if precision == "bf16":
        return m.to(torch.bfloat16), x.to(torch.bfloat16)
    return m, x


def _exported(m, x):
    """m's eval model as a torch.export program, saved and loaded back (a file's round trip, in memory)."""
    with torch.no_grad():
        program = torch.export.export(m.eval(), (x,))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    return torch.export.load(buf).module()


def _eval_call(m, x, precision):
    def fn():
        with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=precision == "autocast_bf16"):
            return m(x)
    return fn


def _group(name, precision):
    return name if precision == "fp32" else f"{name} {precision}"


class _MixedDecisions(torch.nn.Module):
    """The policy network, run as it is (its cost is part of SpotTune's eval), with its decisions replaced:
    half the images on the fine-tuned copy of each block (a trained policy's typical mix, and the case where
    routing saves least over a one-copy shortcut)."""

    def __init__(self, policy, n, num_blocks):
        super().__init__()
        self.policy = policy
        g = (torch.arange(n)[:, None] + torch.arange(num_blocks)[None]) % 2
        self.register_buffer("logits", torch.stack([1 - g, g], -1).float() * 10)

    def forward(self, x):
        return self.policy(x) * 0 + self.logits.narrow(0, 0, x.shape[0])


def _mixed_policy(m, n):
    m.policy = _MixedDecisions(m.policy, n, len(m.blocks))


@pytest.mark.parametrize("size,n", [(64, 64), (224, 16)])
@pytest.mark.parametrize("precision,provider", _eval_cases(("naive", "naive_channels_last")))
def test_spottune_eval(benchmark, provider, precision, size, n, device):
    """naive_channels_last: the naive way with the model and input in channels_last, the layout tlkernels' routed
    eval runs on CPU tensors: the ratio against it is what routing and folding give beyond the layout."""
    torch.manual_seed(0)
    m = SpotTune(torchvision.models.resnet18(num_classes=10), route=provider.startswith("tlkernels")).eval()
    _mixed_policy(m, n)
    m = m.to(device)
    x = torch.randn(n, 3, size, size, device=device)
    m, x = _in_precision(m, x, precision)
    if provider == "naive_channels_last":
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if provider == "tlkernels_pt2":
        m = _exported(fold_batchnorm(m), x)
    benchmark.group = _group(f"spottune resnet18 eval N={n} {size}x{size} (policy included)", precision)
    benchmark.extra_info["provider"] = provider
    run(benchmark, _eval_call(m, x, precision), rounds=7,
        pair=("naive", "naive_channels_last") if provider.startswith("tlkernels") else None)


def _adafilter(provider):
    torch.manual_seed(0)
    m = AdaFilter(torchvision.models.resnet18(num_classes=10), hidden_size=32, fused=provider != "naive")
    with torch.no_grad():
        for h in m.controller.heads:  # a mix of open and closed gates
            h.weight.normal_(0, 1.0)
            h.bias.zero_()
    return m


@pytest.mark.parametrize("precision,provider", _eval_cases(("naive",)))
def test_adafilter_eval(benchmark, provider, precision, device):
    m = _adafilter(provider).eval().to(device)
    x = torch.randn(32, 3, 112, 112, device=device)
    m, x = _in_precision(m, x, precision)
    if provider == "tlkernels_pt2":
        m = _exported(fold_batchnorm(m), x)
    benchmark.group = _group("adafilter resnet18 eval N=32 112x112", precision)
    benchmark.extra_info["provider"] = provider
    run(benchmark, _eval_call(m, x, precision), rounds=7)


@pytest.mark.parametrize("precision,provider", [(p, v) for p in ("fp32", "autocast_bf16")
                                                for v in ("naive", "tlkernels")])
def test_adafilter_serving(benchmark, provider, precision, device):
    """One image per call, as a server answers requests: per-call costs (weight packing, library calls) weigh
    most, and the engine parallelises over images."""
    m = _adafilter(provider).eval().to(device)
    x = torch.randn(1, 3, 224, 224, device=device)
    benchmark.group = _group("adafilter resnet18 serving N=1 224x224", precision)
    benchmark.extra_info["provider"] = provider
    run(benchmark, _eval_call(m, x, precision), rounds=15)


@pytest.mark.parametrize("provider", ["naive", "tlkernels"])
def test_adafilter_train_step(benchmark, provider, device):
    m = _adafilter(provider).train().to(device)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x, y = torch.randn(32, 3, 112, 112, device=device), torch.randint(0, 10, (32,), device=device)
    benchmark.group = "adafilter resnet18 train step N=32 112x112"
    benchmark.extra_info["provider"] = provider

    def fn():
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    run(benchmark, fn, rounds=3)
