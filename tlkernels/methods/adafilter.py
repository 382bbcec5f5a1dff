"""AdaFilter (Guo, Li, Rosing et al., AAAI 2020): per image and output filter, a gate picks the fine-tuned or
the frozen pre-trained filter; gates come from one LSTM shared by all layers, fed with the global average
pool of each layer's input; each branch has its own BatchNorm ("gated batch norm"). No public code exists;
our choices (README "Method choices"):
- gates: G_l = binarize(sigmoid(W_l h_l)) with a straight-through estimator (forward hard 0/1, backward the
  sigmoid's gradient); G = 1 selects the fine-tuned filter.
- LSTM input: proj_l(GAP(x_l)), a per-layer linear projection of the layer input to the shared LSTM width;
  the LSTM state runs across layers in execution order and restarts for each batch.
- gated BN: both branch BNs are ordinary BatchNorm2d layers initialised from the pre-trained BN, trainable,
  batch statistics in training; only the frozen branch's conv filters are fixed.
- training computes both branches (two convolutions, the frozen one without weight gradient, each with
  its BN) - batch statistics need both full outputs; eval folds each branch's BN into its filters and bias,
  so a layer is one per-image blended convolution (tlkernels.ops.gated_conv2d).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from tlkernels.methods._blocks import bn_act_parts, conv_bn_pairs, get_parent
from tlkernels.nn.gated_conv import GatedConv2d
from tlkernels.ops._utils import autocast_dtype
from tlkernels.ops.gated_conv2d import gated_conv2d, keep_packed


class _Controller(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.lstm = nn.LSTMCell(hidden_size, hidden_size)
        self.proj = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.state = None

    def add_layer(self, in_channels, out_channels):
        self.proj.append(nn.Linear(in_channels, self.hidden_size))
        head = nn.Linear(self.hidden_size, out_channels)
        nn.init.zeros_(head.weight)
        nn.init.constant_(head.bias, 1.0)  # start near "fine-tuned everywhere" (sigmoid(1) = 0.73), trainable
        self.heads.append(head)
        return len(self.heads) - 1

    def gate(self, index, x):
        z = self.proj[index](x.mean((2, 3)))
        h, c = self.lstm(z, self.state)
        self.state = (h, c)
        soft = torch.sigmoid(self.heads[index](h))
        hard = (soft > 0.5).to(soft.dtype)
        return hard + soft - soft.detach() if self.training else hard


class AdaFilterConv(nn.Module):
    """conv + gated BN: G * BN_ft(conv(x, W_ft)) + (1 - G) * BN_pre(conv(x, W_pre))."""

    def __init__(self, conv, bn, controller, index):
        super().__init__()
        self.conv = GatedConv2d.from_conv(conv)
        self.bn_ft = bn
        self.bn_pre = None
        if bn is not None:
            import copy
            self.bn_pre = copy.deepcopy(bn)
        self._controller = [controller]  # not a submodule: shared by every layer, owned by AdaFilter
        self.index = index
        self.last_gate = None
        self.fused = True
        self._fold_cache = None  # (key, folded tensors); plain attribute: never in state_dict

    def _fold_sources(self):
        c = self.conv
        ts = [c.weight_pre, c.weight, c.bias_pre, c.bias]
        for bn in (self.bn_pre, self.bn_ft):
            if bn is not None:
                ts += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return ts

    def _folded(self, device_type):
        """Eval-mode BN folded into each branch's filters and bias, cached across eval calls (folding every
        conv at each forward is a visible part of the fused eval: benchmarks/test_bench_methods.py). The key holds
        each source tensor's storage and version counter (bumped by in-place changes: optimizer steps, ours
        included, load_state_dict, .to()), so a change to weights or BN parameters refolds. BN's running
        statistics are the exception: a train-mode forward updates them without bumping their version, so
        forward() drops the cache in train mode. Under autocast the cache keeps the folded tensors already cast
        as autocast casts them (the same values), instead of autocast casting them again at every call."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._fold()
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)
                    for t in self._fold_sources())
        key += (None if self.bn_ft is None else (self.bn_pre.eps, self.bn_ft.eps),
                autocast_dtype(device_type, torch.float32))  # (the cast the cached tensors took)
        if self._fold_cache is None or self._fold_cache[0] != key:
            # Ordinary tensors even in inference mode (they track their versions): the CPU engine keeps its packed
            # panels of the folded filters (keep_packed); not of the layer's own weights, which others may write.
            with torch.inference_mode(False), torch.no_grad():
                folded = tuple(t.to(autocast_dtype(device_type, t.dtype)) if isinstance(t, torch.Tensor) else t
                               for t in self._fold())
            self._fold_cache = (key, folded)
            own = {id(t) for t in self._fold_sources()}
            keep_packed(*(w for w in folded[:2] if id(w) not in own))
        return self._fold_cache[1]

    def _fold(self):
        c = self.conv
        if self.bn_ft is None:
            return c.weight_pre, c.weight, c.bias_pre, c.bias
        out = []
        for w, b, bn in ((c.weight_pre, c.bias_pre, self.bn_pre), (c.weight, c.bias, self.bn_ft)):
            scale = torch.rsqrt(bn.running_var + bn.eps)  # BN(y) = (y - mean) * scale * weight + bias
            if bn.weight is not None:  # affine=False: weight 1, bias 0
                scale = scale * bn.weight
            bias = (0 if bn.bias is None else bn.bias) - bn.running_mean * scale + (0 if b is None else b * scale)
            out.append((w * scale.view(-1, 1, 1, 1), bias))
        return out[0][0], out[1][0], out[0][1], out[1][1]

    def fold_bn_(self):
        """Folds each branch's eval-mode BN into the branch's filters and bias, in place, and drops the BNs: the
        layer then computes in eval what it computed before, with nothing left to fold at each call (what
        torch.export traces for model.pt2). A layer whose BNs use batch statistics keeps them."""
        if self.bn_ft is None or not self._foldable():
            return self
        c = self.conv
        with torch.no_grad():
            w_pre, w_ft, b_pre, b_ft = (t.detach().clone() for t in self._fold())
        c.weight_pre, c.bias_pre = w_pre, b_pre  # (buffers)
        c.weight = nn.Parameter(w_ft, requires_grad=c.weight.requires_grad)
        c.bias = nn.Parameter(b_ft, requires_grad=c.weight.requires_grad)
        self.bn_pre = self.bn_ft = None
        self._fold_cache = None
        return self

    def _two_branch(self, x, gate):
        """The papers'-code computation: two convolutions, two BNs, a blend (fused=False; benchmarks)."""
        c = self.conv
        x, padding = c.pad_input(x)
        y_pre = F.conv2d(x, c.weight_pre, c.bias_pre, c.stride, padding, c.dilation, c.groups)
        y_ft = F.conv2d(x, c.weight, c.bias, c.stride, padding, c.dilation, c.groups)
        if self.bn_ft is not None:
            y_pre, y_ft = self.bn_pre(y_pre), self.bn_ft(y_ft)
        g = gate[:, :, None, None].to(y_ft.dtype)
        return (1 - g) * y_pre + g * y_ft

    def _foldable(self):
        """Eval BN is affine only with running statistics (track_running_stats=False uses batch statistics)."""
        return self.bn_ft is None or (self.bn_ft.running_var is not None and self.bn_pre.running_var is not None)

    def forward(self, x):
        c = self.conv
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"AdaFilter: layer {self.index} ({c.in_channels} -> {c.out_channels} channels) expects "
                             f"input (N, {c.in_channels}, H, W), got shape {tuple(x.shape)}")
        gate = self._controller[0].gate(self.index, x)
        if not torch.compiler.is_exporting():  # (a deployed program keeps no statistics)
            self.last_gate = gate.detach()
        if self.training:
            self._fold_cache = None  # this forward updates BN running statistics in place, unversioned
        if not self.fused or self.training or not self._foldable():
            # Training needs each branch's batch statistics, so both branch outputs exist anyway; measured
            # on the CPU, two convs (no weight gradient for the frozen one) beat one GEMM over [W_pre; W_ft].
            return self._two_branch(x, gate)
        w_pre, w_ft, b_pre, b_ft = self._folded(x.device.type)
        x, padding = c.pad_input(x)
        # (eval gates are 0/1: hard=True tells the kernels so, and CUDA tensors then read nothing from the device)
        return gated_conv2d(x, w_pre, w_ft, gate.to(x.dtype), b_pre, b_ft, c.stride, padding, c.dilation, c.groups,
                            hard=True)


class AdaFilter(nn.Module):
    """Wraps a backbone: every nn.Conv2d (but those named in `skip`) becomes an AdaFilterConv; the BN that
    follows it becomes a gated BN pair (of timm's BatchNormAct2d, the batch norm: its activation stays in its
    place). `skip` defaults to the stem ("conv1")."""

    def __init__(self, backbone, hidden_size=64, skip=("conv1",), fused=True):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"AdaFilter: hidden_size must be > 0, got {hidden_size}")
        self.controller = _Controller(hidden_size)
        self.layers = []
        for full, bn_name in conv_bn_pairs(backbone):
            if full in skip:
                continue
            parent, conv_name = get_parent(backbone, full)
            conv = getattr(parent, conv_name)
            bn = backbone.get_submodule(bn_name) if bn_name else None
            after = nn.Identity()  # what stays in the BN's place
            parts = bn_act_parts(bn)
            if parts is not None:  # timm's BatchNormAct2d: its batch norm is gated, its activation stays
                bn, after = parts[0], nn.Sequential(*parts[1:])
            idx = self.controller.add_layer(conv.in_channels, conv.out_channels)
            layer = AdaFilterConv(conv, bn, self.controller, idx)
            setattr(parent, conv_name, layer)
            if bn_name:  # now applied inside the layer, right behind the conv (where the model applied it)
                bn_parent, bn_attr = get_parent(backbone, bn_name)
                setattr(bn_parent, bn_attr, after)
            self.layers.append((full, layer))
        if not self.layers:
            raise ValueError(f"AdaFilter: found no nn.Conv2d to gate in {type(backbone).__name__} (skip={skip})")
        self.backbone = backbone
        self.set_fused(fused)

    def set_fused(self, fused=True):
        """fused=False computes every layer as two convolutions, two BNs and a blend (the papers' way)."""
        for _, layer in self.layers:
            layer.fused = bool(fused)
        return self

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"AdaFilter: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        self.controller.state = None
        # Fused eval without autograd on CPU tensors runs channels_last (the input once): oneDNN's convolutions,
        # the stem's included, skip their per-call layout reorders (benchmarks/test_bench_methods.py). An exported
        # program keeps that layout change; torch.compile picks layouts itself.
        cl = (self.layers[0][1].fused and not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
              and (torch.compiler.is_exporting() or not torch.compiler.is_compiling()))
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            out = self.backbone(x)
        finally:
            self.controller.state = None
        return out.contiguous() if cl and out.dim() == 4 else out  # (a feature map back in the default layout)

    def fold_bn_(self):
        """Every layer's branch BNs folded into its filters and bias, in place (AdaFilterConv.fold_bn_): the
        model for inference and export, the same eval outputs. Returns self."""
        for _, layer in self.layers:
            layer.fold_bn_()
        return self

    def gate_usage(self):
        """{layer name: fraction of (image, filter) gates that selected the fine-tuned filter} of the last batch."""
        return {n: float(l.last_gate.float().mean()) for n, l in self.layers if l.last_gate is not None}
