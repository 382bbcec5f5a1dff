"""SpotTune (Guo et al., CVPR 2019): per image and residual block, a policy network picks the fine-tuned
copy of the block or the frozen pre-trained copy.

Choices (see README "Method choices"):
- a block's projection shortcut (`downsample`, `shortcut` or `proj`) is shared by both copies and trainable, as
  in the official code; the rest of the block (convs, norms) is duplicated (separate storage).
- frozen copy: conv weights never train; its BN layers run with their pre-trained running statistics and
  frozen affine parameters unless train_frozen_bn=True (then they train, as in the official code).
- training: both copies for every image, blended with the straight-through Gumbel-softmax gate
  (forward hard one-hot, backward the soft sample's gradient), tau = 5.
- eval: argmax gates (deterministic) by default, Gumbel sampling with sample_at_eval=True; hard gates are
  routed: each image runs only its chosen copy of each block (about one backbone's work).
"""
import copy
import functools
import itertools

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse as _fx_fuse

from tlkernels.methods._blocks import replace_children, residual_blocks, shortcut_name, split_bn_act
from tlkernels.ops._utils import autocast_dtype


class _ZeroPadShortcut(nn.Module):
    """The official policy's parameter-free shortcut: average pooling by the stride, then the channels padded
    with zeros to the block's width."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.pool, self.extra = nn.AvgPool2d(stride), cout - cin

    def forward(self, x):
        x = self.pool(x)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class _PolicyBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the zero-padding shortcut, then ReLU (the official agent's block)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = _ZeroPadShortcut(cin, cout, stride)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class _Policy(nn.Module):
    """stem -> layers -> global average pool -> 2 logits per backbone block, (N, num_blocks, 2)."""

    def __init__(self, stem, layers, width, num_blocks):
        super().__init__()
        self.stem, self.layers, self.num_blocks = stem, layers, num_blocks
        self.fc = nn.Linear(width, 2 * num_blocks)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)).view(x.shape[0], self.num_blocks, 2)


class OfficialPolicyNet(_Policy):
    """The policy network of the official code (gyhui14/spottune, agent): a 3->32 conv3x3 + BN stem without
    ReLU, three blocks of 64/128/256 channels with stride 2 and parameter-free shortcuts (average pool + zero
    channel padding), a final BN + ReLU, global average pool, 2 logits per backbone block."""

    def __init__(self, num_blocks, in_channels=3):
        super().__init__(nn.Sequential(nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)),
                         nn.Sequential(_PolicyBlock(32, 64, 2), _PolicyBlock(64, 128, 2), _PolicyBlock(128, 256, 2),
                                       nn.BatchNorm2d(256), nn.ReLU(True)), 256, num_blocks)


class PolicyNet(_Policy):
    """A small torchvision-style ResNet policy (policy="resnet"): a 64-channel conv3x3-BN-ReLU stem, three
    BasicBlocks (64/128/256 channels, stride 2, 1x1 conv + BN shortcuts), then 2 logits per backbone block."""

    def __init__(self, num_blocks, in_channels=3):
        from torchvision.models.resnet import BasicBlock

        def block(cin, cout, stride):
            ds = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            return BasicBlock(cin, cout, stride, ds)

        super().__init__(nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                       nn.ReLU(True)),
                         nn.Sequential(block(64, 64, 2), block(64, 128, 2), block(128, 256, 2)), 256, num_blocks)


def _layout(x):
    """channels_last for a 4-D tensor stored that way (and not also contiguous), else the default layout."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _rows(x, idx):
    """x.index_select(0, idx) in x's layout (index_select itself returns the default layout)."""
    if _layout(x) == torch.channels_last:
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(0, idx)


def _runs_extra_code(module):
    """True when calling the module runs more than its class's forward: an instance forward or forward hooks."""
    return "forward" in vars(module) or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@functools.lru_cache(maxsize=None)
def _onednn_runs_bf16():
    """Whether torch runs bfloat16 convolutions on oneDNN on this CPU (the test torch applies itself)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packed_conv_dtype(x, weight):
    """The dtype a CPU eval convolution of x runs in on a prepacked oneDNN weight (autocast's cast for
    float32 / bfloat16 operands), or None where the plain convolution runs: another device, autograd, an input
    that is not channels_last (the packed kernel writes channels_last), float64, a bfloat16 convolution that
    oneDNN does not run on this CPU, or a torch without oneDNN."""
    if (x.device.type != "cpu" or torch.is_grad_enabled() or x.dim() != 4 or x.shape[0] == 0
            or not x.is_contiguous(memory_format=torch.channels_last) or not torch.backends.mkldnn.is_available()
            or not torch.backends.mkldnn.enabled):
        return None
    dtype = autocast_dtype("cpu", x.dtype)
    if autocast_dtype("cpu", weight.dtype) != dtype:
        return None
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _onednn_runs_bf16()):
        return dtype
    return None


class _PackedConv2d(nn.Module):
    """A Conv2d for eval without autograd whose weight oneDNN reorders into its own blocked layout once (per
    dtype, on the first call) instead of on every call: torch's oneDNN convolution on a prepacked weight, the
    kernel torch.compile's CPU freezing runs (benchmarks/test_bench_methods.py times SpotTune's eval). Inputs
    that _packed_conv_dtype turns away run the Conv2d as it is, and so do all inputs of a dtype whose packing or
    packed call oneDNN refused (the Conv2d then raises its own error for an input that is wrong). Holds the
    packed weights beside the Conv2d's."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self._packed = {}  # dtype -> (packed weight, bias in that dtype), or None: the Conv2d runs

    def forward(self, x):
        c = self.conv
        dtype = _packed_conv_dtype(x, c.weight)
        if dtype is None or self._packed.get(dtype, ()) is None:
            return c(x)
        args = (list(c.padding), list(c.stride), list(c.dilation), c.groups)
        try:
            if dtype not in self._packed:
                w = c.weight.detach().to(dtype)
                self._packed[dtype] = (torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *args, list(x.shape)),
                                       None if c.bias is None else c.bias.detach().to(dtype))
            weight, bias = self._packed[dtype]
            return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), weight, bias, *args, "none", [], "")
        except RuntimeError:
            self._packed[dtype] = None
            return c(x)


def _pack_convs(module):
    """module with each plain CPU Conv2d (zero padding given as numbers) inside it wrapped in _PackedConv2d."""
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Conv2d and child.padding_mode == "zeros" and not isinstance(child.padding, str)
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, _PackedConv2d(child))
    return module


# What torch.fx's conv-BN fusion raises for a module it cannot fold: not traceable (data-dependent control flow
# and the like), or a BatchNorm in training mode, which the fusion refuses and which must then run as it is.
_UNFOLDABLE = (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, AssertionError)


def _fuse_conv_bn(module):
    """A copy of `module` with each BatchNorm folded into the convolution before it (torch.fx's conv-BN fusion);
    timm's BatchNormAct2d is split first (split_bn_act), so its batch norm folds and its activation stays."""
    module = copy.deepcopy(module)
    replace_children(module, split_bn_act)
    return _fx_fuse(module, inplace=True)


def _fused_eval_copy(module):
    """`module` with each BatchNorm folded into the convolution before it (torch.fx's conv-BN fusion, traced in
    eval mode, returned in module's mode), or None where it cannot be folded."""
    was_training = module.training
    module.eval()
    try:
        return _fuse_conv_bn(module).train(was_training)
    except _UNFOLDABLE:
        return None
    finally:
        module.train(was_training)


class _FoldedCopies:
    """Copies of some modules with each BatchNorm folded into the convolution before it (torch.fx's conv-BN
    fusion; equal up to rounding), for eval without autograd: that saves one pass over every activation
    (benchmarks/test_bench_methods.py times SpotTune's eval), their CPU convolutions on prepacked weights
    (_PackedConv2d). Rebuilt when a parameter or buffer of the owner changed (in-place version, storage, dtype
    or device); `clear()` drops them (train()). A module torch.fx cannot trace or with a BatchNorm in training
    mode comes back as it is, and so does one whose forward is replaced on the instance (fx traces the
    class's) or with forward hooks on it or a submodule (the traced copy would not call them). Kept as a plain
    attribute: not in state_dict, not moved by .to(), not copied by copy.deepcopy or pickling (a copy folds
    anew); while kept the copies hold one more copy of the weights, and one packed copy per dtype run."""

    def __init__(self):
        self.entry = None  # (key, folded copies or None)

    def __getstate__(self):
        return {"entry": None}

    def get(self, owner, modules, memory_format=torch.contiguous_format):
        """The folded copies of `modules` (parameters and buffers of `owner` key them), their weights in
        memory_format; the modules themselves where they cannot be folded."""
        if any(_runs_extra_code(m) for m in modules):
            self.entry = None
            return tuple(modules)
        key = (memory_format,) + tuple((t.data_ptr(), t._version, t.dtype, t.device)
                                       for t in itertools.chain(owner.parameters(), owner.buffers()))
        if self.entry is None or self.entry[0] != key:
            try:
                copies = tuple(_pack_convs(_fuse_conv_bn(m).to(memory_format=memory_format)) for m in modules)
            except _UNFOLDABLE:
                copies = None
            self.entry = (key, copies)
        return self.entry[1] or tuple(modules)

    @property
    def copies(self):
        """The folded copies kept (None: none built, or the modules run as they are)."""
        return None if self.entry is None else self.entry[1]

    def clear(self):
        self.entry = None


class SpotTuneBlock(nn.Module):
    """A residual block with a frozen and a fine-tuned copy; its gate (N,) is set by SpotTune.forward."""

    def __init__(self, block, train_frozen_bn):
        super().__init__()
        self.finetuned = block
        self.frozen = copy.deepcopy(block)  # deep copy: no shared storage
        self.shortcut = shortcut_name(block)  # a projection shortcut is shared (official code)
        if self.shortcut is not None:
            setattr(self.frozen, self.shortcut, getattr(block, self.shortcut))
        shared = {id(p) for p in getattr(block, self.shortcut).parameters()} if self.shortcut else set()
        for n, p in self.frozen.named_parameters():
            if id(p) not in shared:
                is_bn = isinstance(self.frozen.get_submodule(n.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)
                p.requires_grad_(bool(train_frozen_bn and is_bn))
        self.train_frozen_bn = train_frozen_bn
        self.gate = None  # (N,) in {0, 1} forward values, straight-through gradient in training
        self.route = False
        self._folded = _FoldedCopies()

    def _eval_copies(self, x):
        """The (fine-tuned, frozen) copies that routed eval runs, BatchNorms folded (see _FoldedCopies), their
        weights in x's layout (channels_last: see SpotTune.forward)."""
        return self._folded.get(self, (self.finetuned, self.frozen), _layout(x))

    def fold_bn_(self):
        """Both copies with their BatchNorms folded into the convolutions before them, in place (where torch.fx
        can trace the block): for inference and export. Each copy then holds its own shortcut."""
        fused = [_fused_eval_copy(m) for m in (self.finetuned, self.frozen)]
        if None not in fused:
            self.finetuned, self.frozen = fused
            self.shortcut = None
            self._folded.clear()
        return self

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self._folded.clear()
        if not self.train_frozen_bn:  # the frozen copy's own BNs keep their pre-trained running statistics
            shared = set(getattr(self.frozen, self.shortcut).modules()) if self.shortcut else set()
            for m in self.frozen.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in shared:
                    m.eval()
        return self

    def forward(self, x):
        g = self.gate
        if g is None:
            raise RuntimeError("SpotTuneBlock: no gate set; call the SpotTune wrapper, not the backbone")
        # Hard gates, no gradient: each image runs one copy only. Under torch.compile the blend below is used
        # instead (both copies, same values for 0/1 gates): routing has data-dependent shapes. torch.export
        # takes them (unbacked sizes), so an exported program routes, without the all-one-copy shortcuts.
        exporting = torch.compiler.is_exporting()
        if self.route and (exporting or not torch.compiler.is_compiling()):
            idx1, idx0 = _split(g > 0.5, exporting)
            # (folded copies only without autograd: gradients must reach the block's own parameters)
            fold = not exporting and not torch.is_grad_enabled()
            finetuned, frozen = self._eval_copies(x) if fold else (self.finetuned, self.frozen)
            if not exporting and idx1.numel() == x.shape[0]:
                return finetuned(x)
            if not exporting and idx0.numel() == x.shape[0]:
                return frozen(x)
            y1 = finetuned(_rows(x, idx1))
            y0 = frozen(_rows(x, idx0))
            out = _empty_rows(y1, x.shape[0])
            out.index_copy_(0, idx1, y1)
            out.index_copy_(0, idx0, y0)
            return out
        g4 = g.view(-1, 1, 1, 1).to(x.dtype)
        return (1 - g4) * self.frozen(x) + g4 * self.finetuned(x)


def _empty_rows(y, n):
    """An uninitialised batch of n items shaped as y's, in y's dtype, device and layout. (new_empty: an exported
    program allocates in the dtype it runs in, bfloat16 under autocast, where torch.empty keeps the dtype it was
    exported in.)"""
    if _layout(y) == torch.channels_last:
        return y.new_empty((n,) + tuple(y.shape[2:]) + (y.shape[1],)).permute(0, 3, 1, 2)
    return y.new_empty((n,) + tuple(y.shape[1:]))


def _split(sel, exporting):
    """(idx1, idx0): the rows of a boolean batch mask that are set and not. One device read (the parts' sizes)
    eagerly; nonzero's unbacked sizes under torch.export."""
    if exporting:
        return sel.nonzero().squeeze(1), (~sel).nonzero().squeeze(1)
    n1 = int(sel.sum())
    return (torch.nonzero_static(sel, size=n1).squeeze(1),
            torch.nonzero_static(~sel, size=sel.shape[0] - n1).squeeze(1))


class SpotTune(nn.Module):
    """Wraps a backbone (torchvision ResNet-18/34/50 or any model whose residual blocks it finds)."""

    def __init__(self, backbone, policy="official", tau=5.0, train_frozen_bn=False, sample_at_eval=False, route=True,
                 policy_size=64):
        super().__init__()
        if policy_size is not None and (not isinstance(policy_size, int) or isinstance(policy_size, bool)
                                        or policy_size < 8):
            raise ValueError(f"SpotTune: policy_size must be None or an int >= 8, got {policy_size!r}")
        # The policy sees the input resized to policy_size x policy_size when it is larger (the official code
        # runs it on small Decathlon images; at 224 px it would cost more than a ResNet-18). None: full size.
        self.policy_size = policy_size
        self.route_eval = route  # False: eval computes both copies and blends (the official code's way)
        found = residual_blocks(backbone)
        if not found:
            raise ValueError(f"SpotTune: found no residual blocks in {type(backbone).__name__}; expected torchvision "
                             "or timm residual blocks (ResNet, inverted residual / MBConv, ConvNeXt, RegNet: "
                             "methods._blocks.BLOCK_CLASSES) or modules with a `downsample` attribute and two or more "
                             "convs")
        if tau <= 0:
            raise ValueError(f"SpotTune: tau must be > 0, got {tau}")
        self.blocks = []
        for parent, name, block in found:
            wrapped = SpotTuneBlock(block, train_frozen_bn)
            setattr(parent, name, wrapped)
            self.blocks.append(wrapped)
        self.backbone = backbone
        first_conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
        in_ch = first_conv.in_channels if first_conv is not None else 3
        if isinstance(policy, str) or policy is None:
            kinds = {"official": OfficialPolicyNet, "resnet": PolicyNet, None: OfficialPolicyNet}
            if policy not in kinds:
                raise ValueError(f"SpotTune: policy must be 'official', 'resnet' or an nn.Module, got {policy!r}")
            policy = kinds[policy](len(self.blocks), in_channels=in_ch)
        self.policy = policy
        self.tau, self.sample_at_eval = float(tau), sample_at_eval
        self.register_buffer("usage_sum", torch.zeros(len(self.blocks)), persistent=False)
        self.register_buffer("usage_count", torch.zeros(()), persistent=False)
        self.last_gates = None
        self._policy_folded = _FoldedCopies()
        self.train()

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self._policy_folded.clear()
        return self

    def fold_bn_(self):
        """The policy network's and every block copy's BatchNorms folded into the convolutions before them, in
        place (torch.fx's conv-BN fusion, as routed eval folds them; modules fx cannot trace stay as they are):
        the model for inference and export (model.pt2), the same eval outputs up to rounding. Returns self."""
        for b in self.blocks:
            b.fold_bn_()
        fused = _fused_eval_copy(self.policy)
        if fused is not None:
            self.policy = fused
        self._policy_folded.clear()
        return self

    def _routed_eval(self):
        """Routed eval without autograd (route=False keeps the official code's way throughout)."""
        return self.route_eval and not self.training and not torch.is_grad_enabled()

    def _fast_eval(self):
        """Routed eval outside torch.compile / export: the policy and the blocks' copies run with their
        BatchNorms folded."""
        return self._routed_eval() and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()

    def gates(self, x):
        """(N, num_blocks) gates: hard 0/1 values; in training (or sample_at_eval) a straight-through
        Gumbel-softmax sample at temperature tau, else the argmax."""
        if x.dim() != 4:
            raise ValueError(f"SpotTune: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        xp = x
        if self.policy_size is not None and max(x.shape[-2:]) > self.policy_size:
            low = x.dtype in (torch.bfloat16, torch.float16)  # (no half-precision antialiased resize on CPUs)
            xp = F.interpolate(x.float() if low else x, size=(self.policy_size, self.policy_size), mode="bilinear",
                               align_corners=False, antialias=True).to(x.dtype).contiguous(memory_format=_layout(x))
        policy = self._policy_folded.get(self.policy, (self.policy,), _layout(xp))[0] if self._fast_eval() else self.policy
        logits = policy(xp)
        if tuple(logits.shape) != (x.shape[0], len(self.blocks), 2):
            raise ValueError(f"SpotTune: policy must return (N, {len(self.blocks)}, 2) logits, got {tuple(logits.shape)}")
        if self.training or self.sample_at_eval:
            return F.gumbel_softmax(logits, tau=self.tau, hard=True, dim=-1)[..., 1]
        return logits.argmax(-1).to(logits.dtype)

    def forward(self, x):
        # Fast eval on CPU tensors runs channels_last (the input once; the folded copies' weights): oneDNN's
        # convolutions skip their per-call layout reorders (benchmarks/test_bench_methods.py). An exported
        # routed eval keeps that layout change.
        cl = (self._routed_eval() and (torch.compiler.is_exporting() or not torch.compiler.is_compiling())
              and x.device.type == "cpu" and x.dim() == 4)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        g = self.gates(x)
        # Route only in eval: in training the BNs need the whole batch through both copies (exact method).
        route = self.route_eval and not self.training and not (torch.is_grad_enabled() and g.requires_grad)
        for i, b in enumerate(self.blocks):
            b.gate, b.route = g[:, i], route
        try:
            out = self.backbone(x)
            if cl and out.dim() == 4:  # (a feature-map output comes back in the default layout)
                out = out.contiguous()
        finally:
            for b in self.blocks:
                b.gate = None
        if torch.compiler.is_exporting():  # a deployed program keeps no statistics
            return out
        with torch.no_grad():
            self.last_gates = g.detach()
            self.usage_sum += g.detach().float().sum(0)
            self.usage_count += g.shape[0]
        return out

    def gate_usage(self, reset=False):
        """Per block, the fraction of images that used the fine-tuned copy since the last reset."""
        u = self.usage_sum / self.usage_count.clamp(min=1)
        if reset:
            self.usage_sum.zero_()
            self.usage_count.zero_()
        return u.clone()


class SpotTuneGlobal(nn.Module):
    """SpotTune-Global (the paper's global variant): one learned choice per residual block for the whole data
    set instead of a policy per image. Per block two logits; training draws one straight-through
    Gumbel-softmax sample per step (tau) shared by every image of the batch; eval takes the argmax, or with
    `budget=k` the k blocks that prefer their fine-tuned copy most (training then samples the top k of the
    Gumbel-perturbed preferences). `to_plain()` returns the backbone with each block replaced by its chosen
    copy: an ordinary network."""

    def __init__(self, backbone, tau=5.0, budget=None, train_frozen_bn=False):
        super().__init__()
        found = residual_blocks(backbone)
        if not found:
            raise ValueError(f"SpotTuneGlobal: found no residual blocks in {type(backbone).__name__}")
        if tau <= 0:
            raise ValueError(f"SpotTuneGlobal: tau must be > 0, got {tau}")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                                   or not 0 <= budget <= len(found)):
            raise ValueError(f"SpotTuneGlobal: budget must be None or an int in [0, {len(found)}] (blocks), "
                             f"got {budget!r}")
        names = {id(m): n for n, m in backbone.named_modules()}
        self.block_names = [names[id(block)] for _, _, block in found]
        self.blocks = []
        for parent, name, block in found:
            wrapped = SpotTuneBlock(block, train_frozen_bn)
            setattr(parent, name, wrapped)
            self.blocks.append(wrapped)
        self.backbone, self.tau, self.budget = backbone, float(tau), budget
        self.logits = nn.Parameter(torch.zeros(len(self.blocks), 2))
        self.train()

    def gates(self):
        """(num_blocks,) hard 0/1 choices (1 = fine-tuned); straight-through gradient in training."""
        pref = self.logits[:, 1] - self.logits[:, 0]
        if self.training:  # difference of two Gumbel draws: a logistic draw (2-class Gumbel-softmax)
            u = torch.rand_like(pref).clamp(1e-6, 1 - 1e-6)
            pref = pref + torch.log(u) - torch.log1p(-u)
        if self.budget is None:
            hard = (pref > 0).to(pref.dtype)
        else:
            hard = torch.zeros_like(pref)
            hard[pref.topk(self.budget).indices] = 1
        if not self.training:
            return hard
        soft = torch.sigmoid(pref / self.tau)
        return hard + soft - soft.detach()

    def forward(self, x):
        g = self.gates()
        route = not self.training  # one copy per block for every image: no blend
        for i, b in enumerate(self.blocks):
            b.gate, b.route = g[i].expand(x.shape[0]), route
        try:
            return self.backbone(x)
        finally:
            for b in self.blocks:
                b.gate = None

    def gate_usage(self):
        """(num_blocks,) the eval choice per block: 1 = fine-tuned copy, 0 = frozen copy."""
        with torch.no_grad():
            was = self.training
            self.eval()
            g = self.gates()
            self.train(was)
        return g

    def to_plain(self):
        """A copy of the backbone in which every block is its chosen copy (eval choice): no SpotTune left."""
        from tlkernels.methods._blocks import get_parent
        choice = self.gate_usage()
        plain = copy.deepcopy(self.backbone)
        for name, c in zip(self.block_names, choice.tolist()):
            parent, attr = get_parent(plain, name)
            wrapped = getattr(parent, attr)
            setattr(parent, attr, wrapped.finetuned if c > 0.5 else wrapped.frozen)
        for p in plain.parameters():
            p.requires_grad_(True)
        return plain
