"""Exports of a trained model for deployment.

model.pt2  torch.export of the eval model (float32, batch size dynamic): SpotTune routes each image through
           the block copy its policy picks (data-dependent shapes, exported with unbacked sizes; its BNs as
           their eval-mode affine maps), AdaFilter runs its BN-folded gated convolutions (the tlkernels op:
           load with `import tlkernels` first).
plain.pt   for methods whose trained model is the unmodified architecture (finetune, l2sp, soft, selective,
           spottune_global: each block its chosen copy):
           a state_dict that loads into the torchvision model (`fc` = the target head) with no tlkernels.
"""
import copy
import os

import torch
import torch.nn as nn

from tlkernels._io import atomic_save, atomic_write


class _FrozenBN(nn.Module):
    """An eval-mode BatchNorm2d as the affine map it is: y = x * scale + shift (per channel)."""

    def __init__(self, bn):
        super().__init__()
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = (0 if bn.bias is None else bn.bias) - bn.running_mean * scale
        self.register_buffer("scale", scale.detach().view(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.detach().view(1, -1, 1, 1).clone())

    def forward(self, x):
        return x * self.scale + self.shift


def fold_batchnorm(model):
    """A copy of `model` whose BatchNorm2d layers (with running statistics) are their eval-mode affine maps.
    Why: aten's batch_norm tests for an empty batch, a guard torch.export cannot take on the data-dependent
    batch size of a routed part; the affine map needs no such test."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and child.running_var is not None:
                setattr(parent, name, _FrozenBN(child))
    return model


def plain_state_dict(net):
    """The trunk's weights under the torchvision names, with the target head as `fc`."""
    sd = {k[len("trunk."):]: v.detach().cpu() for k, v in net.state_dict().items() if k.startswith("trunk.")}
    sd.update({f"fc.{k}": v.detach().cpu() for k, v in net.head.state_dict().items()})
    return sd


def example_input(run):
    """A probe batch of 3 images of the run's input shape, on its device."""
    size = run.cfg.image_size if run.cfg.target else 32
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, run.target.channels, size, size, generator=g).to(run.device)


def export_program(net, x):
    """torch.export of net.eval() with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():  # an inference program: no grad-mode switches inside it
        return torch.export.export(net.eval(), (x,), dynamic_shapes=({0: batch},))


def write(net, recipe, run, out):
    """Writes model.pt2 (and plain.pt where the model is plain) into `out`; returns what it wrote, with the
    largest difference between the exported program's and the model's outputs on a probe batch."""
    x = example_input(run)
    was_training = net.training
    info = {"num_classes": len(run.target.classes), "classes": list(run.target.classes),
            "input": [run.target.channels, x.shape[-2], x.shape[-1]], "mean": run.target.mean, "std": run.target.std}
    try:
        with torch.no_grad():
            want = net.eval()(x)
        program = export_program(recipe.export_model(net), x)
        with torch.no_grad():
            got = program.module()(x)
        path = os.path.join(out, "model.pt2")
        atomic_write(path, "wb", ".pt2", lambda fh: torch.export.save(program, fh))
        info.update(model_pt2="model.pt2", max_abs_diff=float((got - want).abs().max()))
        if recipe.plain:
            atomic_save(plain_state_dict(recipe.plain_net(net)), os.path.join(out, "plain.pt"))
            info["plain_pt"] = "plain.pt"
    finally:
        net.train(was_training)
    return info
