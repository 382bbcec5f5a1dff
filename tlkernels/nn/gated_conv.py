"""GatedConv2d: a drop-in for nn.Conv2d holding frozen pre-trained filters and trainable fine-tuned ones."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tlkernels.ops.gated_conv2d import gated_conv2d


class GatedConv2d(nn.Module):
    """y = (1 - g) * conv(x, weight_pre, bias_pre) + g * conv(x, weight, bias).

    Takes nn.Conv2d's constructor arguments. `weight`/`bias` are the trainable fine-tuned filters;
    `weight_pre`/`bias_pre` are frozen buffers (saved in state_dict, never trained).
    `forward(x, gate=None)`: without a gate it calls `self.gate_provider(x)`, so the module can
    stand in for nn.Conv2d inside model code that calls `conv(x)`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        # Reuse nn.Conv2d's argument validation and initialisation, then keep its tensors.
        proto = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          padding_mode, device=device, dtype=dtype)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(proto, attr))
        self.weight = proto.weight
        self.bias = proto.bias
        self.register_buffer("weight_pre", proto.weight.detach().clone())
        self.register_buffer("bias_pre", None if proto.bias is None else proto.bias.detach().clone())
        self.gate_provider = None
        self.hard = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "GatedConv2d":
        """A GatedConv2d whose frozen and fine-tuned filters both start as copies of `conv`'s (no shared storage)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"GatedConv2d.from_conv: conv must be an nn.Conv2d, got {type(conv).__name__}")
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(conv.weight)
            m.weight_pre.copy_(conv.weight)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
                m.bias_pre.copy_(conv.bias)
        m.weight.requires_grad_(conv.weight.requires_grad)
        return m

    def set_gate_provider(self, provider):
        """`provider(x) -> gate` is called by forward when no gate is passed."""
        if provider is not None and not callable(provider):
            raise TypeError(f"GatedConv2d.set_gate_provider: provider must be callable or None, "
                            f"got {type(provider).__name__}")
        self.gate_provider = provider
        return self

    def pad_input(self, x):
        """(input, padding) for the convolution: padding modes other than zeros pad the input first, as
        nn.Conv2d does."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    def forward(self, x, gate=None, hard=None):
        if gate is None:
            if self.gate_provider is None:
                raise RuntimeError("GatedConv2d: no gate given and no gate provider set; call conv(x, gate) "
                                   "with gate of shape (N,) or (N, C_out), or set conv.gate_provider")
            gate = self.gate_provider(x)
        hard = self.hard if hard is None else hard
        x, padding = self.pad_input(x)
        return gated_conv2d(x, self.weight_pre, self.weight, gate, self.bias_pre, self.bias, self.stride,
                            padding, self.dilation, self.groups, hard=hard)

    def extra_repr(self):
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * len(self.padding) if not isinstance(self.padding, str) else True:
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        return s.format(**self.__dict__)


def convert_conv2d(model: nn.Module, predicate=None) -> nn.Module:
    """Replace every nn.Conv2d in `model` (for which `predicate(name, conv)` is true) by GatedConv2d.from_conv.

    Works in place and returns the model, like SyncBatchNorm.convert_sync_batchnorm; when `model` is itself
    an nn.Conv2d the new module is returned.
    """
    if predicate is not None and not callable(predicate):
        raise TypeError(f"convert_conv2d: predicate must be callable(name, module) or None, "
                        f"got {type(predicate).__name__}")
    if isinstance(model, nn.Conv2d) and not isinstance(model, GatedConv2d):
        return GatedConv2d.from_conv(model) if predicate is None or predicate("", model) else model
    for name, child in list(model.named_modules()):
        for cname, sub in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if type(sub) is nn.Conv2d and (predicate is None or predicate(full, sub)):
                setattr(child, cname, GatedConv2d.from_conv(sub))
    return model
