"""SpotTune and AdaFilter on ResNet-18, on each device of conftest.bench_devices. Providers: naive = both copies / branches computed and blended
(the papers' code), tlkernels = routed SpotTune eval / fused AdaFilter.

Run: python -m pytest benchmarks/test_bench_methods.py --benchmark-json=.benchmarks/methods.json
     python benchmarks/report.py .benchmarks/methods.json
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import run
from tlkernels.methods import AdaFilter, SpotTune


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
@pytest.mark.parametrize("provider", ["naive", "naive_channels_last", "tlkernels"])
def test_spottune_eval(benchmark, provider, size, n, device):
    """naive_channels_last: the naive way with the model and input in channels_last, the layout tlkernels' routed
    eval runs on CPU tensors: the ratio against it is what routing and folding give beyond the layout."""
    torch.manual_seed(0)
    m = SpotTune(torchvision.models.resnet18(num_classes=10), route=provider == "tlkernels").eval()
    _mixed_policy(m, n)
    m = m.to(device)
    x = torch.randn(n, 3, size, size, device=device)
    if provider == "naive_channels_last":
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    benchmark.group = f"spottune resnet18 eval N={n} {size}x{size} (policy included)"
    benchmark.extra_info["provider"] = provider

    def fn():
        with torch.no_grad():
            return m(x)
    run(benchmark, fn, rounds=7, pair=("naive", "naive_channels_last") if provider == "tlkernels" else None)


def _adafilter(provider):
    torch.manual_seed(0)
    m = AdaFilter(torchvision.models.resnet18(num_classes=10), hidden_size=32, fused=provider == "tlkernels")
    with torch.no_grad():
        for h in m.controller.heads:  # a mix of open and closed gates
            h.weight.normal_(0, 1.0)
            h.bias.zero_()
    return m


@pytest.mark.parametrize("provider", ["naive", "tlkernels"])
def test_adafilter_eval(benchmark, provider, device):
    m = _adafilter(provider).eval().to(device)
    x = torch.randn(32, 3, 112, 112, device=device)
    benchmark.group = "adafilter resnet18 eval N=32 112x112"
    benchmark.extra_info["provider"] = provider

    def fn():
        with torch.no_grad():
            return m(x)
    run(benchmark, fn, rounds=7)


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
