"""Modules: GatedConv2d / convert_conv2d, and the transfer objectives L2SP, SoftJointLoss, TransferLoss."""
from tlkernels.nn.gated_conv import GatedConv2d, convert_conv2d
from tlkernels.nn.losses import L2SP, SoftJointLoss, TransferLoss, estimate_fisher

__all__ = ["GatedConv2d", "convert_conv2d", "L2SP", "SoftJointLoss", "TransferLoss", "estimate_fisher"]
