"""The optimizer side of a run: parameter groups with their learning-rate scales (--head_lr_mult,
--layer_decay), the optimizer (--opt), the warm-up + cosine schedule (--warmup_epochs), gradient clipping
(--clip_grad), frozen BatchNorms (--freeze_bn) and the moving average of the weights (--model_ema)."""
import copy
import math

import torch
import torch.nn as nn

from tlkernels.nn.losses import under
from tlkernels.train.backbones import parameter_depths

HEADS = ("head", "source_head")  # the classifier heads the trainer adds (scaled by --head_lr_mult when new)


def lr_scales(cfg, net, units, new):
    """{id(parameter): learning-rate scale}. The backbone's parameters: layer_decay^(D + 1 - depth) (depths from
    backbones.parameter_depths over the D `units`; depth D + 1, after the last unit: 1); what pre-training did
    not provide (`new`: name prefixes, the new head and the methods' own modules): 1, the new heads times
    --head_lr_mult. Only trainable parameters are scaled: frozen ones (SpotTune's frozen copy) take no place in
    the depth order."""
    depths = parameter_depths(net, units)
    top = len(units) + 1
    scales = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if under(name, new):
            scales[id(p)] = cfg.head_lr_mult if under(name, [h for h in HEADS if h in new]) else 1.0
        else:
            scales[id(p)] = cfg.layer_decay ** (top - depths.get(id(p), top))
    return scales


def scaled_groups(groups, scales, lr):
    """The recipe's parameter groups split by learning-rate scale: each keeps its options, its lr (the group's
    own, else `lr`) times the scale, and `lr_scale`."""
    out = []
    for g in groups:
        by_scale = {}
        for p in g["params"]:
            by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
        for scale, params in sorted(by_scale.items(), reverse=True):
            out.append({**g, "params": params, "lr": g.get("lr", lr) * scale, "lr_scale": scale})
    return out


def make_optimizer(cfg, groups, l2sp):
    """tlkernels.optim.SGD or AdamW (--opt) over `groups`, with the fused L2-SP step when l2sp is given."""
    from tlkernels.optim import SGD, AdamW
    if cfg.opt == "adamw":
        return AdamW(groups, lr=cfg.lr, l2sp=l2sp)
    return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, l2sp=l2sp)


def lr_factor(step, total, warmup):
    """The schedule's factor at `step` of `total`: linear warm-up over the first `warmup` steps (reaching 1 at
    step warmup - 1), then cosine decay from 1 to 0 over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    rest = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, rest) / rest))


def freeze_batchnorm(net, new):
    """--freeze_bn: the pre-trained BatchNorms (every _BatchNorm outside the `new` modules) lose their trainable
    affine parameters; returns them, for `keep_frozen` after each train()."""
    frozen = [m for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not under(n, new)]
    for m in frozen:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return frozen


def keep_frozen(bns):
    """Puts the frozen BatchNorms back in eval mode (running statistics used, not updated)."""
    for m in bns:
        m.eval()


def clip_gradients(cfg, optimizer, scaler):
    """--clip_grad: the gradients' global norm clipped (after unscaling under fp16). Returns the norm, or None."""
    if not cfg.clip_grad:
        return None
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)


class ModelEMA:
    """--model_ema: an exponential moving average of the model's floating-point parameters and buffers
    (integer buffers, such as BatchNorm's batch counts, copied), updated after each optimizer step with decay
    min(decay, (1 + t) / (10 + t)) at update t, so that early averages do not hold the initial weights (timm's
    ModelEmaV3 warm-up). `module` is an eval copy of the model."""

    def __init__(self, net, decay):
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, net):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        mine, theirs = self.module.state_dict(), net.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k].detach() for k in floats], 1.0 - d)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(theirs[k])

    def state_dict(self):
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
