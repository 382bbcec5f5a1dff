"""Finding residual blocks and conv/BN pairs in a backbone."""
import torch
import torch.fx
import torch.nn as nn


# The residual block classes of torchvision and timm, by module and class name (no import needed to match):
# each maps a feature map to a feature map, so a per-image choice between two copies of it is well defined.
BLOCK_CLASSES = {
    "torchvision.models.resnet": ("BasicBlock", "Bottleneck"),
    "torchvision.models.mobilenetv2": ("InvertedResidual",),
    "torchvision.models.mobilenetv3": ("InvertedResidual",),
    "torchvision.models.efficientnet": ("MBConv", "FusedMBConv"),
    "torchvision.models.convnext": ("CNBlock",),
    "torchvision.models.regnet": ("ResBottleneckBlock",),
    "torchvision.models.shufflenetv2": ("InvertedResidual",),
    "torchvision.models.mnasnet": ("_InvertedResidual",),
    "timm.models.resnet": ("BasicBlock", "Bottleneck"),
    "timm.models.regnet": ("Bottleneck",),
    "timm.models.convnext": ("ConvNeXtBlock",),
    "timm.models._efficientnet_blocks": ("DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual",
                                         "CondConvResidual", "UniversalInvertedResidual"),
    "timm.models.byobnet": ("BasicBlock", "BottleneckBlock", "DarkBlock", "EdgeBlock", "RepVggBlock"),
}
# Attributes that hold a block's shortcut branch (shared by SpotTune's two copies, as in the official code).
SHORTCUT_NAMES = ("downsample", "shortcut", "proj")


def is_known_block(module):
    """True for an instance of one of BLOCK_CLASSES."""
    return type(module).__name__ in BLOCK_CLASSES.get(type(module).__module__, ())


def shortcut_name(block):
    """The attribute of `block` holding a shortcut with parameters (a projection), or None."""
    for name in SHORTCUT_NAMES:
        m = getattr(block, name, None)
        if isinstance(m, nn.Module) and any(True for _ in m.parameters()):
            return name
    return None


def residual_blocks(model):
    """(parent, child_name, block) for every residual block, model order: the torchvision and timm block
    classes (BLOCK_CLASSES: BasicBlock/Bottleneck, inverted residuals and MBConv, ConvNeXt, RegNet blocks), and
    otherwise, in ResNet-style code, the innermost modules with a `downsample` attribute and two or more
    convolutions (a stage that holds blocks is not itself one)."""
    found = []

    def visit(parent):
        for name, child in parent.named_children():
            if is_known_block(child):
                found.append((parent, name, child))
                continue
            before = len(found)
            visit(child)
            convs = sum(isinstance(m, nn.Conv2d) for m in child.modules())
            if len(found) == before and hasattr(child, "downsample") and convs >= 2:
                found.append((parent, name, child))

    visit(model)
    return found


def is_plain_bn(m):
    """A BatchNorm2d that computes BatchNorm2d's forward (a subclass such as timm's BatchNormAct2d adds an
    activation, which a BN folded into filters would drop)."""
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward


def is_bn_act(m):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward is the batch norm, then its `drop`, then its
    `act`."""
    return (isinstance(m, nn.BatchNorm2d) and type(m).__name__ == "BatchNormAct2d"
            and type(m).__module__.startswith("timm.") and isinstance(getattr(m, "act", None), nn.Module)
            and isinstance(getattr(m, "drop", None), nn.Module))


def bn_act_parts(m):
    """timm's BatchNormAct2d (is_bn_act) as (a plain BatchNorm2d holding its parameters and statistics, drop,
    act), in its mode; None for any other module."""
    if not is_bn_act(m):
        return None
    bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(m, name))
    return bn.train(m.training), m.drop, m.act


def split_bn_act(m):
    """timm's BatchNormAct2d as nn.Sequential(plain BatchNorm2d, drop, act) (bn_act_parts); None for any other
    module. Why: split, the batch norm is one torch.fx sees, so it can fold into the convolution before it."""
    parts = bn_act_parts(m)
    return None if parts is None else nn.Sequential(*parts).train(m.training)


def replace_children(model, replacement):
    """Every submodule of `model` for which replacement(child) gives a module replaced by it, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)


class _PairTracer(torch.fx.Tracer):
    """torch.fx's tracer that keeps timm's BatchNormAct2d as one call (a leaf), so its conv can pair with it."""

    def is_leaf_module(self, m, qualified_name):
        return is_bn_act(m) or super().is_leaf_module(m, qualified_name)


def _pairable(m):
    """A module AdaFilter can apply as a gated BN behind a conv: a plain BatchNorm2d or timm's BatchNormAct2d
    (its activation then follows the gated layer)."""
    return is_plain_bn(m) or is_bn_act(m)


def conv_bn_pairs(model):
    """(conv name, BN name or None) for every nn.Conv2d of `model` (qualified names, model order); the BN is a
    plain BatchNorm2d or timm's BatchNormAct2d (batch norm and activation).

    A BN is paired with a conv only where the model provably feeds that conv's output, and nothing else, to
    that BN, and uses neither elsewhere: then applying the BN right behind the conv (AdaFilter's gated BN)
    computes exactly what the model computed. The data flow is read from a torch.fx trace of the model; a
    model that cannot be traced is read by nn.Sequential order (a conv and the BN right after it, the only
    order a container guarantees). Declaration order alone proves nothing (`conv1, conv2, bn1, bn2`, or
    `Sequential(conv, ReLU, BN)`), so other convs get no BN: they are gated without branch BNs."""
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    modules = dict(model.named_modules())
    pairs = {}
    try:
        graph = _PairTracer().trace(model)
    except Exception:
        graph = None
    if graph is not None:
        calls = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        for name in convs:
            nodes = calls.get(name, [])
            if len(nodes) != 1 or len(nodes[0].users) != 1:
                continue
            user = next(iter(nodes[0].users))
            bn = modules.get(user.target) if user.op == "call_module" else None
            if (_pairable(bn) and len(calls[user.target]) == 1 and user.args[:1] == (nodes[0],)
                    and len(user.args) == 1 and not user.kwargs and bn.num_features == modules[name].out_channels):
                pairs[name] = user.target
    else:
        for parent_name, parent in model.named_modules():
            if not isinstance(parent, nn.Sequential):
                continue
            children = list(parent.named_children())
            for (a, conv), (b, bn) in zip(children, children[1:]):
                if (type(conv) is nn.Conv2d and _pairable(bn)
                        and bn.num_features == conv.out_channels):
                    pairs[f"{parent_name}.{a}".lstrip(".")] = f"{parent_name}.{b}".lstrip(".")
        # a module reachable under two names (shared) is used twice: no pairing can be proven for it
        counts = {}
        for _, m in model.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        pairs = {c: b for c, b in pairs.items() if counts[id(modules[c])] == 1 and counts[id(modules[b])] == 1}
    return [(name, pairs.get(name)) for name in convs]


def get_parent(model, name):
    """(parent module, attribute name) of the submodule called `name` (a qualified name)."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
