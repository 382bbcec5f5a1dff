"""Finding residual blocks and conv/BN pairs in a backbone."""
import torch.nn as nn


def residual_blocks(model):
    """(parent, child_name, block) for every residual block: torchvision BasicBlock / Bottleneck, or any
    module exposing `downsample` and at least two convolutions (ResNet-style code), outermost first."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
        known = (BasicBlock, Bottleneck)
    except ImportError:  # pragma: no cover
        known = ()
    found = []

    def visit(parent):
        for name, child in parent.named_children():
            convs = sum(isinstance(m, nn.Conv2d) for m in child.modules())
            if isinstance(child, known) or (hasattr(child, "downsample") and convs >= 2):
                found.append((parent, name, child))
            else:
                visit(child)

    visit(model)
    return found


def conv_bn_pairs(model):
    """(parent, conv_name, bn_name or None) for every nn.Conv2d: its BatchNorm2d is the next BatchNorm2d among
    the same parent's children with matching num_features (conv1->bn1, downsample.0->downsample.1)."""
    pairs = []
    for parent in model.modules():
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if type(child) is not nn.Conv2d:
                continue
            bn = None
            for later_name, later in children[i + 1:]:
                if type(later) is nn.Conv2d:
                    break
                if isinstance(later, nn.BatchNorm2d) and later.num_features == child.out_channels:
                    bn = later_name
                    break
            pairs.append((parent, name, bn))
    return pairs
