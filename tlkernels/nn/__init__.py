"""Modules: GatedConv2d and convert_conv2d (more land with the loss and method issues)."""
from tlkernels.nn.gated_conv import GatedConv2d, convert_conv2d

__all__ = ["GatedConv2d", "convert_conv2d"]
