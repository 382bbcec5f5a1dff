"""Every tlkernels op under torch.autocast (csrc/ops/autocast/): the gated convolution runs in the autocast
dtype, cross-entropy and L2-SP in float32; forward and backward of the ops, modules and methods against
float32, within the flash-attention error budget: err(ours, bf16) <= 2 * err(pure PyTorch, bf16) + floor,
both measured against the float32 result."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from tlkernels.methods import AdaFilter, SpotTune
from tlkernels.nn import L2SP, GatedConv2d
from tlkernels.ops import cross_entropy, gated_conv2d, joint_cross_entropy, l2sp_penalty
from tlkernels.ops.gated_conv2d import gated_conv2d_reference

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def outputs_and_grads(fn, leaves, seed, autocast):
    """fn() -> output tensor; returns [output, d(sum(out * fixed weights))/d leaf ...] in float32."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    torch.manual_seed(seed)
    with torch.autocast(**BF16, enabled=autocast):
        out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.float() * w).sum(), leaves, allow_unused=True)
    return [out.float()] + [torch.zeros_like(l) if g is None else g.float() for l, g in zip(leaves, grads)], out.dtype


def check_budget(ours, ref, leaves, out_dtype=torch.bfloat16, seed=0):
    exact, _ = outputs_and_grads(ref, leaves, seed, autocast=False)
    low_ref, _ = outputs_and_grads(ref, leaves, seed, autocast=True)
    low, dtype = outputs_and_grads(ours, leaves, seed, autocast=True)
    assert dtype == out_dtype
    for i, (e, r, o) in enumerate(zip(exact, low_ref, low)):
        scale = e.abs().max().clamp(min=1e-6)
        ref_err, err = (r - e).abs().max() / scale, (o - e).abs().max() / scale
        assert torch.isfinite(o).all()
        assert err <= 2 * ref_err + 1e-3, f"tensor {i}: error {err:.2e} > 2 x reference's bf16 error {ref_err:.2e}"


@pytest.mark.parametrize("gate_kind", ["image", "filter"])
@pytest.mark.parametrize("hard", [False, True])
def test_gated_conv2d(gate_kind, hard):
    x, wp, wf = torch.randn(4, 8, 10, 10), torch.randn(16, 8, 3, 3) * 0.2, torch.randn(16, 8, 3, 3) * 0.2
    g = torch.rand(4) if gate_kind == "image" else torch.rand(4, 16)
    b = torch.randn(16)
    check_budget(lambda *a: gated_conv2d(*a, hard=hard, padding=1, stride=2),
                 lambda *a: gated_conv2d_reference(*a, hard=hard, padding=1, stride=2), [x, wp, wf, g, b, b])


def test_gated_conv2d_mixed_dtypes_only_under_autocast():
    x, w = torch.randn(2, 4, 6, 6).bfloat16(), torch.randn(4, 4, 3, 3)
    with torch.autocast(**BF16):
        assert gated_conv2d(x, w, w, torch.rand(2), padding=1).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="gated_conv2d: weight_pre must have dtype torch.bfloat16"):
        gated_conv2d(x, w, w, torch.rand(2), padding=1)


def test_gated_conv_module():
    m = GatedConv2d(8, 16, 3, padding=1)
    ref = copy.deepcopy(m)

    def run(mod):
        def f(x, g):
            return mod(x, g)
        return f
    check_budget(run(m), lambda x, g: gated_conv2d_reference(x, ref.weight_pre, ref.weight, g, ref.bias_pre, ref.bias,
                                                             padding=1), [torch.randn(3, 8, 9, 9), torch.rand(3, 16)])


def _backbone():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5)


@pytest.mark.parametrize("train", [True, False])
def test_spottune(train):
    ours = SpotTune(_backbone()).train(train)
    ref = SpotTune(_backbone(), route=False).train(train)  # the blend of both copies: plain PyTorch ops
    ref.load_state_dict(ours.state_dict())
    check_budget(lambda x: ours(x), lambda x: ref(x), [torch.randn(4, 3, 48, 48)])


@pytest.mark.parametrize("train", [True, False])
def test_adafilter(train):
    ours = AdaFilter(_backbone(), hidden_size=16)
    torch.manual_seed(3)
    for h in ours.controller.heads:  # gates far from the 0.5 threshold, mixed per filter
        torch.nn.init.zeros_(h.weight)
        h.bias.data = torch.where(torch.rand_like(h.bias) < 0.5, -2.0, 2.0)
    ref = copy.deepcopy(ours).set_fused(False)  # two convolutions, two BNs, a blend: plain PyTorch ops
    ours.train(train), ref.train(train)
    check_budget(lambda x: ours(x), lambda x: ref(x), [torch.randn(4, 3, 48, 48)])


def test_cross_entropy_runs_in_float32():
    lin, y, w = torch.nn.Linear(12, 10), torch.randint(0, 10, (16,)), torch.rand(10)  # bf16 logits under autocast
    check_budget(lambda f: cross_entropy(lin(f), y, weight=w, label_smoothing=0.1),
                 lambda f: F.cross_entropy(lin(f), y, weight=w, label_smoothing=0.1), [torch.randn(16, 12)],
                 out_dtype=torch.float32)


def test_joint_cross_entropy():
    lin_t, lin_s = torch.nn.Linear(12, 5), torch.nn.Linear(12, 7)
    yt, ys = torch.randint(0, 5, (8,)), torch.randint(0, 7, (8,))

    def ours(f):
        return joint_cross_entropy(lin_t(f), yt, lin_s(f), ys, source_weight=0.5)

    def ref(f):
        return F.cross_entropy(lin_t(f), yt) + 0.5 * F.cross_entropy(lin_s(f), ys)
    check_budget(ours, ref, [torch.randn(8, 12)], out_dtype=torch.float32)


def test_l2sp_penalty_in_float32():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    reg = L2SP(net, alpha=0.1, beta=0.01, head=["2"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    want = reg()
    with torch.autocast(**BF16):
        got = reg()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_l2sp_fisher_weights_follow_their_params_dtype():
    """bf16 params and Fisher weights: autocast casts the params to float32 and the wrapper casts the weights
    (a Tensor?[] ATen's wrapper leaves alone) with them; value and gradients match the float32 formula."""
    p = [torch.randn(6, 5).bfloat16().requires_grad_(), torch.randn(40).bfloat16().requires_grad_()]
    r = [t.detach() + 0.1 for t in p]
    w = [torch.rand(6, 5).bfloat16(), None]
    with torch.autocast(**BF16):
        got = l2sp_penalty(p, r, 0.2, weights=w)
    assert got.dtype == torch.float32
    got.backward()
    pf = [t.detach().float().requires_grad_() for t in p]
    want = 0.1 * (w[0].float() * (pf[0] - r[0].float()) ** 2).sum() + 0.1 * ((pf[1] - r[1].float()) ** 2).sum()
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(p, pf):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=1e-2, atol=1e-2)


def test_autocast_kernel_registered_for_cuda_too():
    # The CUDA build runs the same registration; the dispatcher lists both keys wherever the library loaded.
    from tlkernels._extension import HAS_C
    if not HAS_C:
        pytest.skip("the compiled library is not built (the pure-PyTorch fallback autocasts through ATen's ops)")
    for name in ("gated_conv2d", "cross_entropy", "joint_cross_entropy", "filterbank_histogram", "l2sp_penalty"):
        table = torch._C._dispatch_dump_table(f"tlkernels::{name}")
        for key in ("AutocastCPU", "AutocastCUDA"):
            line = next(l for l in table.splitlines() if l.startswith(key + ":"))
            assert "fallthrough" not in line and "registered" in line, (name, key, line)
