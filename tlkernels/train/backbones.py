"""Pre-trained backbones for the trainer: every torchvision classification model (`--arch resnet50`) and every timm
model (`--arch timm/convnext_tiny` or `timm:convnext_tiny`; timm is an optional extra: pip install tlkernels[timm]).

The classifier is found through the model's own description, never by a fixed attribute: timm's
pretrained_cfg["classifier"] (the module get_classifier() returns), torchvision's last nn.Linear under `fc`,
`classifier`, `head` or `heads`. Preprocessing (normalisation, resize interpolation, crop fraction) comes from
timm's pretrained_cfg or torchvision's weights' transforms. Pre-trained weights come from torchvision or the
model hub where the network allows, or from --checkpoint (.pt/.pth state_dicts or .safetensors, with or without
the classifier), never unpickled as code.
"""
import dataclasses
import os

import torch
import torch.nn as nn

from tlkernels._io import CheckpointError, load
from tlkernels.methods._blocks import get_parent

TIMM_PREFIXES = ("timm/", "timm:")
CLASSIFIER_PARENTS = ("fc", "classifier", "head", "heads")


def split_arch(arch):
    """("timm", name) for timm/NAME or timm:NAME, else ("torchvision", arch)."""
    for p in TIMM_PREFIXES:
        if arch.startswith(p):
            return "timm", arch[len(p):]
    return "torchvision", arch


def _timm():
    try:
        import timm
    except ImportError as e:
        raise SystemExit(f"tlkernels-train: timm models need the timm package (pip install tlkernels[timm] or pip "
                         f"install timm): {e}")
    return timm


def torchvision_archs():
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_problem(arch):
    """None when --arch names a model this trainer builds, else what is wrong (with close matches)."""
    import difflib
    source, name = split_arch(arch)
    if source == "timm":
        timm = _timm()
        if timm.is_model(name):
            return None
        near = difflib.get_close_matches(name, timm.list_models(), n=3)
        return (f"{arch!r} is not a timm model" + (f" (did you mean {', '.join('timm/' + n for n in near)}?)"
                                                    if near else "") + "; timm.list_models() lists them")
    archs = torchvision_archs()
    if name in archs:
        return None
    near = difflib.get_close_matches(name, archs, n=3)
    return (f"{arch!r} is not a torchvision classification model" + (f" (did you mean {', '.join(near)}?)" if near
                                                                        else "")
            + f"; accepted: {', '.join(archs)}, or timm/NAME for a timm model")


@dataclasses.dataclass
class Preprocessing:
    """How the pre-trained weights saw their images: normalisation, the resize interpolation, and the centre crop
    as a fraction of the resized image (eval: resize to size / crop_pct, crop size)."""
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def preprocessing(arch):
    """The architecture's pre-trained preprocessing (timm's pretrained_cfg, torchvision's weights' transforms);
    ImageNet's where the architecture has no such metadata."""
    source, name = split_arch(arch)
    if source == "timm":
        _timm()
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(name)  # (the registered config: no model built, nothing downloaded)
        cfg = cfg.to_dict() if cfg is not None else {}
        return Preprocessing(tuple(cfg.get("mean", IMAGENET.mean)), tuple(cfg.get("std", IMAGENET.std)),
                             cfg.get("interpolation", "bicubic"), float(cfg.get("crop_pct", 0.875)))
    import torchvision
    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError):  # no weights metadata for this architecture
        return IMAGENET
    crop = t.crop_size[0] / t.resize_size[0]
    return Preprocessing(tuple(t.mean), tuple(t.std), t.interpolation.value, crop)


def create(arch, pretrained):
    """The model of --arch with its own classifier: pre-trained weights when `pretrained` (downloaded once by
    torchvision or the hub), else initialised. Auxiliary classifiers (GoogLeNet, Inception v3) are removed, as
    torchvision does for its pre-trained weights: the trainer trains one head."""
    source, name = split_arch(arch)
    try:
        if source == "timm":
            model = _timm().create_model(name, pretrained=pretrained)
        else:
            import torchvision
            weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
            model = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        raise SystemExit(f"tlkernels-train: pre-trained weights for --arch {arch} are not available ({type(e).__name__}: "
                         f"{e}); offline, pass --checkpoint PATH with its weights (.pt, .pth or .safetensors)")
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model


def pretrained_classes(arch):
    """The class names the pre-trained classifier of --arch predicts, or None: torchvision's weights' categories,
    timm's ImageNet label names (WordNet ids: the class folders of an ImageNet --source)."""
    source, name = split_arch(arch)
    if source == "torchvision":
        import torchvision
        try:
            return list(torchvision.models.get_model_weights(name).DEFAULT.meta.get("categories") or []) or None
        except (ValueError, AttributeError):
            return None
    _timm()
    from timm.data import ImageNetInfo, infer_imagenet_subset
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    try:
        subset = infer_imagenet_subset(cfg)
        return list(ImageNetInfo(subset).label_names()) if subset else None
    except (ValueError, KeyError, OSError):  # not an ImageNet classifier (or no label file)
        return None


def classifier_name(model):
    """The dotted name of the model's classifier (an nn.Linear): timm's pretrained_cfg["classifier"], else the last
    nn.Linear under fc / classifier / head / heads. ValueError when there is none."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        name = cfg["classifier"]
        name = name[0] if isinstance(name, (tuple, list)) else name  # (distilled models: the main head)
        candidates = [name]
    else:
        candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                      and n.split(".")[0] in CLASSIFIER_PARENTS]
    modules = dict(model.named_modules())
    if candidates and isinstance(modules.get(candidates[-1]), nn.Linear):
        return candidates[-1]
    found = modules.get(candidates[-1]) if candidates else None
    raise ValueError(f"{type(model).__name__}: no linear classifier found (looked for "
                     + (f"{candidates[-1]!r}, a {type(found).__name__}" if candidates else
                        f"an nn.Linear under {', '.join(CLASSIFIER_PARENTS)}")
                     + "); the trainer replaces the model's last linear layer with its own heads")


def _replace(model, name, module):
    parent, attr = get_parent(model, name)
    setattr(parent, attr, module)


def split_classifier(model):
    """(trunk, classifier, name): the model with its classifier replaced by nn.Identity (so it returns the
    features the classifier read), the classifier (an nn.Linear) and its dotted name."""
    name = classifier_name(model)
    fc = model.get_submodule(name)
    _replace(model, name, nn.Identity())
    return model, fc, name


def load_checkpoint(model, path, option="--checkpoint"):
    """Loads a pre-trained state_dict (.pt/.pth read with weights_only=True; .safetensors) into `model`. A state_dict
    without the classifier (a trunk: "with or without the classifier") loads too: then the classifier keeps its
    initialisation. Returns the names of the missing classifier tensors. SystemExit naming the option otherwise."""
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise SystemExit(f"tlkernels-train: {option} {path}: reading .safetensors needs the safetensors "
                                 f"package (pip install safetensors): {e}")
            if not os.path.isfile(path):
                raise CheckpointError(f"{option} {path}: no such file")
            state = load_file(path)
        else:
            state = load(path, option)
    except CheckpointError as e:
        raise SystemExit(f"tlkernels-train: {e}")
    except Exception as e:  # a corrupt .safetensors header, ...
        raise SystemExit(f"tlkernels-train: {option} {path}: cannot read it ({type(e).__name__}: {e})")
    if not isinstance(state, dict):
        raise SystemExit(f"tlkernels-train: {option} {path}: expected a state_dict (a dict of tensors), got "
                         f"{type(state).__name__}")
    for key in ("model", "state_dict", "model_state_dict"):  # the usual training-checkpoint wrappers
        if isinstance(state.get(key), dict):
            state = state[key]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}  # (DDP-saved)
    name = classifier_name(model)
    head = name + "."
    fc, w = model.get_submodule(name), state.get(head + "weight")
    if torch.is_tensor(w) and w.dim() == 2 and tuple(w.shape) != tuple(fc.weight.shape) and w.shape[1] == fc.in_features:
        # a classifier over other classes (a model fine-tuned before): the model takes its shape
        _replace(model, name, nn.Linear(fc.in_features, w.shape[0], bias=head + "bias" in state))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise SystemExit(f"tlkernels-train: {option} {path} is not a state_dict of this model "
                         f"({type(model).__name__}): {e}")
    wrong = [k for k in missing if not k.startswith(head)]
    if wrong or unexpected:
        raise SystemExit(f"tlkernels-train: {option} {path} is not a state_dict of this model "
                         f"({type(model).__name__}): " + "; ".join(
                             s for s in (f"missing {_few(wrong)}" if wrong else "",
                                         f"unexpected {_few(unexpected)}" if unexpected else "") if s))
    return [k for k in missing if k.startswith(head)]


def _few(keys, n=5):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ----------------------------------------------------------------------------- depth, for --layer_decay
def depth_units(trunk):
    """The trunk's units of depth, in model order: its residual blocks (methods._blocks.residual_blocks), or,
    in a model without blocks (VGG, DenseNet), its convolutions."""
    from tlkernels.methods._blocks import residual_blocks
    blocks = [b for _, _, b in residual_blocks(trunk)]
    return blocks or [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]


def parameter_depths(model, units):
    """{id(parameter): depth} for the parameters of `model` (a module holding the trunk the `units` came from,
    wrapped or not): a parameter inside unit i has depth i + 1; one outside every unit takes the depth of the
    next unit in model order (the stem: 0; a stage's downsampling: its first block), and after the last,
    len(units) + 1. The modules the units are found by identity, so a method's wrapper around them (SpotTune's
    two copies, AdaFilter's gated convolutions) keeps their depth."""
    index = {id(u): i for i, u in enumerate(units)}
    depths, seen = {}, [0]  # seen[0]: units entered so far

    def visit(module, unit):
        if id(module) in index and unit is None:
            unit = index[id(module)]
            seen[0] = max(seen[0], unit + 1)
        for p in module.parameters(recurse=False):
            if unit is not None:
                depths.setdefault(id(p), unit + 1)
            else:
                depths.setdefault(id(p), 0 if seen[0] == 0 else min(seen[0] + 1, len(units) + 1))
        for child in module.children():
            visit(child, unit)

    visit(model, None)
    return depths
