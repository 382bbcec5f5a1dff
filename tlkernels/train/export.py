"""Exports of a trained model for deployment.

model.pt2  torch.export of the eval model (float32; batch size dynamic, and image height and width where the
           model allows: the accepted sizes are in summary.json and inside the file, which load_program reads
           to check each input with a clear error): SpotTune routes each image through
           the block copy its policy picks (data-dependent shapes, exported with unbacked sizes), AdaFilter
           runs its gated convolutions (the tlkernels op: load with `import tlkernels` first); both with their
           BNs folded into the convolutions before them (fold_batchnorm) and channels_last on CPU tensors.
plain.pt   for methods whose trained model is the unmodified architecture (finetune, l2sp, soft, selective,
           spottune_global: each block its chosen copy):
           a state_dict that loads into the unmodified architecture (its classifier = the target head) with no tlkernels.
"""
import copy
import json
import os

import torch
import torch.nn as nn

from tlkernels._io import atomic_save, atomic_write
from tlkernels.methods._blocks import is_plain_bn, replace_children, split_bn_act


class _FrozenBN(nn.Module):
    """An eval-mode BatchNorm2d for export: aten's inference batch norm on the running statistics, called
    directly. Why: aten's batch_norm tests for an empty batch, a guard torch.export cannot take on the
    data-dependent batch size of a routed part (SpotTune); the inference kernel needs no such test, and its
    output follows the input's dtype (bfloat16 under autocast) as BatchNorm2d's does."""

    def __init__(self, bn):
        super().__init__()
        self.eps = bn.eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name)
            self.register_buffer(name, None if t is None else t.detach().clone())

    def forward(self, x):
        return torch.ops.aten._native_batch_norm_legit_no_training(x, self.weight, self.bias, self.running_mean,
                                                                   self.running_var, 0.0, self.eps)[0]


def fold_batchnorm(model):
    """A copy of `model` for export: modules with their own fold (`fold_bn_`: AdaFilter's branch BNs into its
    gated convolutions, SpotTune's BNs into the convolutions of its policy and block copies) fold, and every
    other BatchNorm2d with running statistics becomes a _FrozenBN. timm's BatchNormAct2d is split into its
    batch norm and its activation first (split_bn_act); another BatchNorm2d subclass with a forward of its
    own stays as it is."""
    model = copy.deepcopy(model)
    replace_children(model, split_bn_act)

    def fold(m):  # (the outermost module with a fold: it folds its parts)
        if callable(getattr(m, "fold_bn_", None)):
            m.fold_bn_()
        else:
            for c in m.children():
                fold(c)
    fold(model)
    replace_children(model, lambda c: _FrozenBN(c) if is_plain_bn(c) and c.running_var is not None else None)
    return model


def plain_state_dict(net):
    """The trunk's weights under the architecture's own names, with the target head as its classifier."""
    sd = {k[len("trunk."):]: v.detach().cpu() for k, v in net.state_dict().items() if k.startswith("trunk.")}
    sd.update({f"{net.classifier}.{k}": v.detach().cpu() for k, v in net.head.state_dict().items()})
    return sd


def example_input(run):
    """A probe batch of 3 images of the run's input shape, on its device."""
    size = run.cfg.image_size if run.cfg.target else 32
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, run.target.channels, size, size, generator=g).to(run.device)


MAX_SIDE = 1 << 14  # the largest image side an exported program is asked to accept


def _bound(v, unbounded):
    """A sympy range bound as an int (`unbounded` for an infinite one)."""
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return unbounded


def _input_ranges(program):
    """{"height": [lo, hi], "width": [lo, hi]} of the image sizes `program` accepts (hi None: unbounded)."""
    x = [n for n in program.graph.nodes if n.op == "placeholder"][-1].meta["val"]
    out = {}
    for name, size in (("height", x.shape[2]), ("width", x.shape[3])):
        if isinstance(size, int):
            out[name] = [size, size]
            continue
        vr = program.range_constraints.get(size.node.expr)
        out[name] = [_bound(vr.lower, 1) if vr is not None else 1, _bound(vr.upper, None) if vr is not None else None]
    return out


def _accepts(module, x, h, w):
    """True when the exported `module` runs one image of x's channels at h x w (its guards pass)."""
    try:
        with torch.no_grad():
            module(torch.zeros(1, x.shape[1], h, w, dtype=x.dtype, device=x.device))
        return True
    except Exception:
        return False


def accepted_sizes(program, x):
    """{"height": [lo, hi], "width": [lo, hi]} (hi None: unbounded) of the image sizes `program`, exported at
    x's size, runs. The range constraints alone do not say it: a CNN's global pooling guards that its final map
    stays larger than 1 x 1 (or stays 1 x 1), a guard torch.export keeps beside the ranges. So each side is
    probed with one-image calls, the other side at the example's size: the smallest size accepted (binary
    search below the example's), and the largest (unbounded when twice the example's size passes and the
    ranges set no bound)."""
    module, ranges = program.module(), _input_ranges(program)
    out = {}
    for d, name in ((2, "height"), (3, "width")):
        ex, (lo_r, hi_r) = x.shape[d], ranges[name]
        if lo_r == hi_r:
            out[name] = [lo_r, hi_r]
            continue

        def ok(s):
            return _accepts(module, x, *((s, x.shape[3]) if d == 2 else (x.shape[2], s)))
        lo, hi = max(lo_r, 1), ex
        while lo < hi:  # the smallest accepted size (the example's is)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        top = min(2 * ex, hi_r or MAX_SIDE, MAX_SIDE)
        if ok(top):
            high = hi_r if top == 2 * ex or top == hi_r else top
        else:
            a, b = ex, top - 1
            while a < b:  # the largest accepted size
                mid = (a + b + 1) // 2
                a, b = (mid, b) if ok(mid) else (a, mid - 1)
            high = a
        out[name] = [lo, high]
    return out


def export_program(net, x):
    """torch.export of net.eval() with a dynamic batch dimension and, where the model allows it, dynamic image
    height and width (Dim.AUTO: a model whose size cannot vary exports at the example's size; accepted_sizes
    says which sizes the program runs)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():  # an inference program: no grad-mode switches inside it
        return torch.export.export(net.eval(), (x,), dynamic_shapes=({0: batch, 2: torch.export.Dim.AUTO,
                                                                         3: torch.export.Dim.AUTO},))


SPEC = "tlkernels.json"  # the input contract, stored inside model.pt2 (torch.export's extra_files)


class ExportedModel(nn.Module):
    """A model.pt2 program with its input contract checked first: a clear ValueError naming the file, what the
    program accepts and what came, instead of torch.export's guard failure."""

    def __init__(self, program, spec, path):
        super().__init__()
        self.program, self.module, self.spec, self.path = program, program.module(), spec, path

    def forward(self, x):
        spec, what = self.spec, f"model.pt2 {self.path}"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = f"{x.dim()}-D shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what}: expects a batch of images (N, C, H, W), got {got}")
        c, (hlo, hhi), (wlo, whi) = spec["input"][0], spec["sizes"]["height"], spec["sizes"]["width"]
        h, w = x.shape[2], x.shape[3]
        if x.shape[1] != c or not (hlo <= h <= (hhi or h)) or not (wlo <= w <= (whi or w)):
            def rng(lo, hi):
                return str(lo) if lo == hi else f">= {lo}" if hi is None else f"{lo} to {hi}"
            raise ValueError(f"{what}: accepts images of {c} channels, height {rng(hlo, hhi)} and width "
                             f"{rng(wlo, whi)} (normalised with mean {spec['mean']}, std {spec['std']}), got shape "
                             f"{tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise ValueError(f"{what}: expects float32 images, got {x.dtype}")
        try:
            return self.module(x)
        except AssertionError as e:  # a guard of the program beyond the sizes probed at export
            raise ValueError(f"{what}: the program does not run images of shape {tuple(x.shape)} ({e}); it was "
                             f"exported at {spec['input'][1]} x {spec['input'][2]}") from None


def load_program(path):
    """model.pt2 as an ExportedModel (eval, float32): the tlkernels ops registered first (an AdaFilter program
    calls them), the input contract checked on every call; a file that cannot be read raises CheckpointError
    naming it."""
    import tlkernels  # noqa: F401  (registers the ops the program may call)
    from tlkernels._io import CheckpointError
    extra = {SPEC: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except FileNotFoundError:
        raise CheckpointError(f"model.pt2 {path}: no such file") from None
    except Exception as e:
        raise CheckpointError(f"model.pt2 {path} cannot be loaded as a torch.export program: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    try:
        spec = json.loads(extra[SPEC])
    except ValueError:
        raise CheckpointError(f"model.pt2 {path} holds no tlkernels input contract ({SPEC}); it was not written "
                              f"by the tlkernels trainer (use torch.export.load for other programs)") from None
    return ExportedModel(program, spec, path)


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
        info["sizes"] = accepted_sizes(program, x)
        atomic_write(path, "wb", ".pt2", lambda fh: torch.export.save(program, fh,
                                                                      extra_files={SPEC: json.dumps(info)}))
        info.update(model_pt2="model.pt2", max_abs_diff=float((got - want).abs().max()),
                    load="tlkernels.train.export.load_program(path) (checks the input; or import tlkernels, then "
                         "torch.export.load(path))")
        if recipe.plain:
            atomic_save(plain_state_dict(recipe.plain_net(net)), os.path.join(out, "plain.pt"))
            info["plain_pt"] = "plain.pt"
    finally:
        net.train(was_training)
    return info
