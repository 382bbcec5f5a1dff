"""Device-to-host reads of the CUDA paths, counted on CPU tensors and pinned at their minimum.

On a GPU every read of a device value (`.item()`, `float(t)`, `nonzero`, `equal`, ...) stalls the host until
the stream drains, and breaks CUDA-graph capture. `emulate_cuda()` makes CPU tensors take the CUDA tensors' path
choice, and the profiler sees every ATen op the C++ kernels dispatch, so the reads are counted here by name.
"""
import collections
import contextlib

import pytest
import torch
import torch.nn as nn

from tlkernels.ops import gated_conv2d, gated_conv2d_reference
from tlkernels.ops.gated_conv2d import emulate_cuda

# The ATen ops that read device memory on the host (each one a stream synchronisation on CUDA).
READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero")


def reads(fn):
    """(result of fn(), {read op: count}) with every ATen op fn dispatches profiled (C++ kernels' included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    counts = collections.Counter(e.name for e in prof.events() if e.name in READS)
    return out, dict(counts)


def convs(fn):
    """Convolutions fn runs (forward convolutions and convolution backwards: each one conv-equivalent or two)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return names.count("aten::convolution"), names.count("aten::convolution_backward")


def case(gate_shape, hard, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 9, 9, generator=gen, dtype=torch.float64)
    wp = torch.randn(8, 6, 3, 3, generator=gen, dtype=torch.float64) * 0.3
    wf = torch.randn(8, 6, 3, 3, generator=gen, dtype=torch.float64) * 0.3
    g = torch.rand(gate_shape, generator=gen, dtype=torch.float64)
    if hard and len(gate_shape) == 1:
        g[0], g[1] = 0.9, 0.1  # both copies in use
    for t in (x, wp, wf, g):
        t.requires_grad_(requires_grad)
    return x, wp, wf, g


@pytest.mark.parametrize("gate_shape,hard,expected", [
    ((4, 8), True, 0),    # AdaFilter's eval (0/1 per-filter gates, hard=True)
    ((4, 8), False, 0),   # soft per-filter gates
    ((4,), False, 0),     # soft per-image gates
    ((4,), True, 1),      # SpotTune: routed, one read for the parts' sizes
])
def test_forward_reads_at_most_what_routing_needs(gate_shape, hard, expected):
    x, wp, wf, g = case(gate_shape, hard)
    with emulate_cuda():
        y, n = reads(lambda: gated_conv2d(x, wp, wf, g, padding=1, hard=hard))
    assert sum(n.values()) == expected, n
    torch.testing.assert_close(y, gated_conv2d_reference(x, wp, wf, g, padding=1, hard=hard))


@pytest.mark.parametrize("gate_shape,hard,expected", [((4, 8), True, 0), ((4, 8), False, 0), ((4,), False, 0),
                                                       ((4,), True, 2)])  # (routed: one read forward, one backward)
def test_training_step_reads_at_most_what_routing_needs(gate_shape, hard, expected):
    x, wp, wf, g = case(gate_shape, hard, requires_grad=True)

    def step():
        y = gated_conv2d(x, wp, wf, g, padding=1, hard=hard)
        return torch.autograd.grad(y.square().sum(), (x, wp, wf, g))

    with emulate_cuda():
        grads, n = reads(step)
    assert sum(n.values()) == expected, n
    y = gated_conv2d_reference(x, wp, wf, g, padding=1, hard=hard)
    for a, b in zip(grads, torch.autograd.grad(y.square().sum(), (x, wp, wf, g))):
        torch.testing.assert_close(a, b)


def test_a_nan_hard_gate_is_not_routed_and_stays_nan():
    x, wp, wf, g = case((4,), True)
    g[2] = float("nan")
    with emulate_cuda():
        y, n = reads(lambda: gated_conv2d(x, wp, wf, g, padding=1, hard=True))
    assert sum(n.values()) == 1, n  # the routing read finds the NaN: the blend path gives it
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()
    torch.testing.assert_close(y, gated_conv2d_reference(x, wp, wf, g, padding=1, hard=True), equal_nan=True)


def test_the_cpu_policy_inspects_gates_and_the_cuda_policy_does_not():
    """The control: the counting sees the CPU path's reads (gate inspection), so a zero above is not blindness."""
    x, wp, wf, g = case((4, 8), True)
    _, n = reads(lambda: gated_conv2d(x, wp, wf, g, padding=1, hard=True))
    assert sum(n.values()) >= 1, n
    with emulate_cuda():
        _, n = reads(lambda: gated_conv2d(x, wp, wf, g, padding=1, hard=True))
    assert n == {}


def test_emulation_is_undone_on_exit():
    with emulate_cuda():
        with emulate_cuda():
            pass
        assert torch.ops.tlkernels._emulate_cuda(True) is True  # still on inside the outer block
    assert torch.ops.tlkernels._emulate_cuda(False) is False


def test_soft_gate_training_step_on_cuda_costs_the_naive_conv_count():
    """Soft per-filter gates on CUDA: the forward's concat computes both branches and keeps their difference,
    so dL/dg needs no convolution in the backward. 5 conv-equivalents, as the naive way: one conv over
    [Wp; Wf] (2), dx through both (2), dWf (1); without the saved difference a conv with Wf - Wp comes on top."""
    x, wp, wf, g = case((4, 8), False, requires_grad=True)
    wp.requires_grad_(False)

    def step():
        y = gated_conv2d(x, wp, wf, g, padding=1)
        torch.autograd.grad(y.square().sum(), (x, wf, g))

    with emulate_cuda():
        fwd, bwd = convs(step)
    assert (fwd, bwd) == (1, 2), (fwd, bwd)


def _adafilter_resnet():
    import torchvision
    from tlkernels.methods import AdaFilter
    m = AdaFilter(torchvision.models.resnet18(num_classes=5), hidden_size=8).eval()
    return m


def test_adafilter_fused_eval_reads_nothing_per_layer():
    m = _adafilter_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), emulate_cuda():
        y, n = reads(lambda: m(x))
    assert n == {}, n
    m.set_fused(False)
    with torch.no_grad():
        torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-4)


def test_spottune_routed_eval_reads_once_per_block():
    import torchvision
    from tlkernels.methods import SpotTune
    m = SpotTune(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, n = reads(lambda: m(x))
    blocks = len(m.blocks)
    assert n.get("aten::nonzero", 0) == 0 and sum(n.values()) <= blocks, (n, blocks)


# ----------------------------------------------------------------------------- the trainer's steps
def _train_reads(tmp_path, cache, steps, *args):
    from tlkernels.train import loop
    from test_train import FAST  # (the demo's few-step options)
    argv = ["--cache_dir", cache, *FAST, "--target_per_class", "10", "--batch_size", "4",
            "--stop_after", str(steps), *args]
    if not (tmp_path / "warm").exists():  # (warm: the cached pre-training and the measured choices are not counted)
        loop.main(["--out_dir", str(tmp_path / "warm"), *argv])
    with emulate_cuda():
        return reads(lambda: loop.main(["--out_dir", str(tmp_path / f"run{steps}"), *argv]))


@pytest.mark.parametrize("method", ["l2sp", "adafilter"])  # (adafilter: finetune's step plus gated convolutions)
def test_training_steps_read_nothing_between_log_points(tmp_path, demo_cache, method):
    """The losses of a step stay on the device until a read every --log_every steps: 5 steps read what 2 do
    (a read per step would add 3 x 5 reads), and the records are still one per step, values filled in."""
    res2, n2 = _train_reads(tmp_path, demo_cache, 2, "--method", method, "--log_every", "100")
    res5, n5 = _train_reads(tmp_path, demo_cache, 5, "--method", method, "--log_every", "100")
    assert n5 == n2, (n2, n5)
    history = res5[method][0][1]
    assert [h["step"] for h in history] == list(range(1, 6))
    assert all(isinstance(h["loss"], float) and 0 <= h["train_acc"] <= 1 for h in history)
