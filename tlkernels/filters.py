"""Filter banks for image descriptors: a Gabor bank, or the first conv layers of a pre-trained network."""
import math

import torch
import torch.nn as nn


class FilterBank:
    """Linear filter stages. Stage i applies `pre` (None or a frozen module, e.g. a network's stem) and then
    conv2d with `weight` (F_i, C, kh, kw); its histogram channels weigh 0.5 / F_i in the distance (Ge & Yu)."""

    def __init__(self, stages):
        if not stages:
            raise ValueError("FilterBank: needs at least one stage")
        self.stages = stages  # list of dicts: weight, stride, padding, pre

    @property
    def num_channels(self):
        """Histogram channels of a descriptor: the filters of every stage."""
        return sum(s["weight"].shape[0] for s in self.stages)

    def channel_weights(self):
        """(num_channels,) float32: each channel's weight in the descriptor distance, 0.5 / F_i for stage i."""
        return torch.cat([torch.full((s["weight"].shape[0],), 0.5 / s["weight"].shape[0]) for s in self.stages])

    @torch.no_grad()
    def stage_inputs(self, images):
        """Yields (stage dict, the stage's input) for (N, C, H, W) images (uint8 or float, any device)."""
        x = images.float()
        for s in self.stages:
            if s["pre"] is not None:
                s["pre"].to(x.device)  # the frozen stem follows the images (a no-op once it is there)
            yield s, (s["pre"](x) if s["pre"] is not None else x)

    def fingerprint_tensors(self):
        """The tensors that define the bank (its filters), hashed into descriptor-cache keys."""
        return [s["weight"] for s in self.stages]


def gabor_bank(scales=4, orientations=6, size=11, in_channels=3, wavelength0=3.0, octave_step=0.5):
    """Real and imaginary parts of a Gabor bank: scales x orientations x 2 filters (48 by default).

    Wavelength of scale s: wavelength0 * 2**(s * octave_step); sigma = 0.56 * wavelength (one-octave
    bandwidth); real parts are made zero-mean; every filter has unit L2 norm. For RGB inputs each filter
    is applied to the channel mean (weights replicated / in_channels)."""
    if scales < 1 or orientations < 1 or size < 3 or size % 2 == 0:
        raise ValueError(f"gabor_bank: need scales >= 1, orientations >= 1 and an odd size >= 3, got "
                         f"scales={scales}, orientations={orientations}, size={size}")
    r = size // 2
    y, x = torch.meshgrid(torch.arange(-r, r + 1, dtype=torch.float64), torch.arange(-r, r + 1, dtype=torch.float64),
                          indexing="ij")
    filters = []
    for s in range(scales):
        lam = wavelength0 * 2 ** (s * octave_step)
        sigma = 0.56 * lam
        for o in range(orientations):
            th = math.pi * o / orientations
            xr = x * math.cos(th) + y * math.sin(th)
            yr = -x * math.sin(th) + y * math.cos(th)
            env = torch.exp(-(xr ** 2 + yr ** 2) / (2 * sigma ** 2))
            re = env * torch.cos(2 * math.pi * xr / lam)
            im = env * torch.sin(2 * math.pi * xr / lam)
            re = re - env * (re.sum() / env.sum())  # zero DC response
            for f in (re, im):
                filters.append(f / f.norm())
    w = torch.stack(filters).float()[:, None].repeat(1, in_channels, 1, 1) / in_channels
    return FilterBank([dict(weight=w, stride=(1, 1), padding=(r, r), pre=None)])


def from_model(model, layers=2):
    """The first `layers` (1 or 2) conv layers of a torchvision-style ResNet as the bank, pre-activation
    responses (the paper's default). Stage 2 runs the frozen stem (conv1, bn1, relu, maxpool) first."""
    if layers not in (1, 2):
        raise ValueError(f"from_model: layers must be 1 or 2, got {layers}")
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d):
        raise ValueError(f"from_model: expected a ResNet-style model with a conv1 layer, got {type(model).__name__}")
    stages = [dict(weight=conv1.weight.detach().float().clone(), stride=conv1.stride, padding=conv1.padding, pre=None)]
    if layers == 2:
        try:
            stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
            conv2 = model.layer1[0].conv1
        except AttributeError as e:
            raise ValueError(f"from_model: layers=2 needs conv1/bn1/relu/maxpool/layer1 (torchvision ResNet): {e}")
        import copy
        stem = copy.deepcopy(stem).float().eval()
        for p in stem.parameters():
            p.requires_grad_(False)
        stages.append(dict(weight=conv2.weight.detach().float().clone(), stride=conv2.stride, padding=conv2.padding,
                           pre=stem))
    return FilterBank(stages)
