"""Serving a fine-tuned model in bfloat16 on the CPU: AdaFilter's fused eval and SpotTune's routed eval as bf16
models (contiguous and channels_last), as float32 models under torch.autocast, and as the trainer's exported
program (model.pt2, float32) run under torch.autocast. Each runs tlkernels' path (AdaFilter: the gated
convolution op; SpotTune: each image through one copy of each block) and stays within the flash-attention error
budget of the naive way in the same precision: err(ours) <= 2 * err(naive) + floor, both against float32.
benchmarks/test_bench_methods.py times the same cases."""
import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tlkernels.methods import AdaFilter, SpotTune
from tlkernels.train.export import export_program, fold_batchnorm

MODES = ["bf16", "bf16_channels_last", "autocast", "exported_autocast"]


class Work(TorchDispatchMode):
    """The tlkernels ops called, and the images convolved (the batch sizes of every convolution, summed)."""

    def __init__(self):
        super().__init__()
        self.ops, self.images = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("tlkernels."):
            self.ops.add(name)
        if func.overloadpacket is torch.ops.aten.convolution:
            self.images += args[0].shape[0]
        return func(*args, **(kwargs or {}))


def backbone():
    """A ResNet of torchvision's ResNet-18 family with one BasicBlock per stage (every layer kind of ResNet-18,
    downsampling blocks included, at half its depth: the paths are the same, the test costs half)."""
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)


def adafilter(fused):
    torch.manual_seed(0)
    m = AdaFilter(backbone(), hidden_size=16)
    torch.manual_seed(3)
    for h in m.controller.heads:  # gates far from the 0.5 threshold, mixed per filter
        torch.nn.init.zeros_(h.weight)
        h.bias.data = torch.where(torch.rand_like(h.bias) < 0.5, -2.0, 2.0)
    return m.set_fused(fused).eval()


def spottune(route):
    torch.manual_seed(0)
    m = SpotTune(backbone(), route=route).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # fine-tuned copies that differ from the frozen ones, so that a wrong route shows
        for b in m.blocks:
            for p in b.finetuned.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return m


MODELS = {"adafilter": adafilter, "spottune": spottune}


def run(model, x, mode):
    """model(x) in `mode`, as float32 (with the Work it did)."""
    model = copy.deepcopy(model)
    if mode.startswith("bf16"):
        model, x = model.to(torch.bfloat16), x.bfloat16()
        if mode == "bf16_channels_last":
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if mode == "exported_autocast":  # what the trainer writes (float32), saved and loaded back
        buf = io.BytesIO()
        torch.export.save(export_program(fold_batchnorm(model), x), buf)  # (as the recipes export)
        buf.seek(0)
        model = torch.export.load(buf).module()
    work = Work()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=mode.endswith("autocast")), work:
        y = model(x)
    assert y.dtype == torch.bfloat16, (mode, y.dtype)
    return y.float(), work


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", sorted(MODELS))
def test_bf16_inference_takes_our_path_within_the_budget(method, mode):
    make = MODELS[method]
    ours, naive = make(True), make(False)
    # (72 px: above SpotTune's policy_size, so that its policy sees a resized input)
    x = torch.randn(4, 3, 72, 72, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = naive(x)
    y, work = run(ours, x, mode)
    # (the naive way's error in this precision: eager under autocast stands for its exported program)
    y_naive, work_naive = run(naive, x, "autocast" if mode == "exported_autocast" else mode)
    scale = exact.abs().max()
    err, ref_err = (y - exact).abs().max() / scale, (y_naive - exact).abs().max() / scale
    assert torch.isfinite(y).all() and err <= 2 * ref_err + 1e-3, f"error {err:.2e} > 2 x naive's {ref_err:.2e}"
    if method == "adafilter":
        assert any(op.startswith("tlkernels.gated_conv2d") for op in work.ops), work.ops
        assert not work_naive.ops
    else:  # routed: each image through one copy of each block (the policy is a small network of its own)
        assert work.images < 0.7 * work_naive.images, (work.images, work_naive.images)


def test_adafilter_autocast_eval_caches_its_folded_weights_cast():
    """Under autocast the fused eval keeps each layer's folded weights and biases as autocast casts them (its
    rule: floating point but float64 to the autocast dtype), once, instead of autocast casting them at every
    call: the output is bit for bit the one autocast's own per-call cast gives."""
    m = adafilter(fused=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            y = m(x)
            assert all(t.dtype == torch.bfloat16 for _, layer in m.layers for t in layer._fold_cache[1])
            for _, layer in m.layers:  # the folded tensors handed over in float32: autocast casts them per call
                layer._folded = lambda device_type, layer=layer: layer._fold()
            y_cast_per_call = m(x)
            for _, layer in m.layers:
                del layer._folded
        assert torch.equal(y, y_cast_per_call)
        m(x)  # out of autocast: float32 again
        assert all(t.dtype == torch.float32 for _, layer in m.layers for t in layer._fold_cache[1])
