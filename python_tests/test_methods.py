import copy
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import tlkernels
from tlkernels.methods import AdaFilter, SpotTune

from conftest import gloo_ranks, like_pretrained_bns  # noqa: E402


def _resnet(arch="resnet18", classes=5):
    torch.manual_seed(0)
    return like_pretrained_bns(getattr(torchvision.models, arch)(num_classes=classes)).double()


def _perturb_finetuned(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "policy" not in n and "controller" not in n:
                p.add_(0.05 * torch.randn_like(p))


# ----------------------------------------------------------------------------- SpotTune
def _spottune_reference(m, x, gates):
    """Both copies of every block computed and blended, by hand (what the official code does)."""
    blocks = {id(b): i for i, b in enumerate(m.blocks)}
    originals = {}

    def blended(block):
        def fwd(inp):
            g = gates[:, blocks[id(block)]].view(-1, 1, 1, 1)
            return (1 - g) * block.frozen(inp) + g * block.finetuned(inp)
        return fwd

    for b in m.blocks:
        originals[b] = b.forward
        b.forward = blended(b)
    try:
        return m.backbone(x)
    finally:
        for b, f in originals.items():
            b.forward = f


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_spottune_matches_reference_train_and_eval(arch):
    m = SpotTune(_resnet(arch)).double()
    assert len(m.blocks) == (8 if arch == "resnet18" else 16)
    _perturb_finetuned(m)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    m.eval()
    with torch.no_grad():
        routed = m(x)  # routed: each image through one copy
        gates = m.last_gates
        ref = _spottune_reference(m, x, gates)
    torch.testing.assert_close(routed, ref)
    # forced mixed gates: routing must still agree with blending
    fixed = (torch.arange(4 * len(m.blocks)).view(4, -1) % 3 == 0).double()
    m.policy.forward = lambda inp: torch.stack([1 - fixed, fixed], -1) * 10
    with torch.no_grad():
        torch.testing.assert_close(m(x), _spottune_reference(m, x, fixed))
    # train mode: straight-through Gumbel gates; same outputs and gradients as the reference
    m.train()
    torch.manual_seed(3)
    out = m(x)
    g = m.last_gates
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    ref = _spottune_reference(m, x, g)
    ref_grads = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)


BLOCK_FAMILIES = [  # (library, arch, block classes SpotTune must find, how many)
    ("torchvision", "mobilenet_v3_small", {"InvertedResidual"}, 11),
    ("torchvision", "efficientnet_b0", {"MBConv"}, 16),
    ("torchvision", "regnet_x_400mf", {"ResBottleneckBlock"}, 22),
    ("torchvision", "shufflenet_v2_x0_5", {"InvertedResidual"}, 16),
    ("torchvision", "mnasnet0_5", {"_InvertedResidual"}, 16),
    ("timm", "convnext_atto", {"ConvNeXtBlock"}, 12),
    ("timm", "efficientnet_b0", {"DepthwiseSeparableConv", "InvertedResidual"}, 16),
    ("timm", "resnet50d", {"Bottleneck"}, 16),
]


@pytest.mark.parametrize("lib,arch,kinds,count", BLOCK_FAMILIES, ids=[f"{l}-{a}" for l, a, _, _ in BLOCK_FAMILIES])
def test_spottune_finds_every_block_family_and_equals_the_original_at_initialisation(lib, arch, kinds, count):
    # Both copies start equal, so in float64 eval the wrapped model is the original whatever the gates pick;
    # routed (each image through one copy, BatchNorms folded) and blended alike. Training reaches the policy.
    if lib == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model(arch, pretrained=False)
    else:
        model = torchvision.models.get_model(arch)
    torch.manual_seed(0)
    model = like_pretrained_bns(model.double().eval(), affine=False)
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    sp = SpotTune(copy.deepcopy(model), policy_size=32).double().eval()
    assert {type(b.finetuned).__name__ for b in sp.blocks} == kinds and len(sp.blocks) == count
    with torch.no_grad():
        routed = sp(x)
        gates = sp.last_gates
        sp.route_eval = False
        blended = sp(x)
    assert 0 < gates.sum() < gates.numel()  # (both copies used)
    torch.testing.assert_close(routed, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(blended, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # (equal copies give the gates a zero gradient: move the fine-tuned ones apart)
        for b in sp.blocks:
            for p in b.finetuned.parameters():
                p.add_(0.01 * torch.randn_like(p))
    sp.train()
    sp(x).sum().backward()
    assert sp.policy.fc.weight.grad is not None and sp.policy.fc.weight.grad.abs().sum() > 0
    for b in sp.blocks:  # the frozen copy is frozen, except a projection shortcut shared with the fine-tuned one
        shared = {id(p) for p in getattr(b.finetuned, b.shortcut).parameters()} if b.shortcut else set()
        assert all(p.grad is None for p in b.frozen.parameters() if id(p) not in shared)


def test_spottune_routed_eval_folds_batchnorm_and_follows_weight_changes():
    m = SpotTune(_resnet()).double()
    _perturb_finetuned(m)
    keys = set(m.state_dict())
    fixed = (torch.arange(4 * len(m.blocks)).view(4, -1) % 3 == 0).double()
    m.policy.forward = lambda inp: torch.stack([1 - fixed, fixed], -1) * 10
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), _spottune_reference(m, x, fixed))
    folded = m.blocks[0]._folded.copies
    assert folded is not None and not any(isinstance(b, nn.BatchNorm2d) for b in folded[0].modules())
    # CPU eval runs channels_last: the copies' weights are stored so (the result above matched the reference)
    convs = [c for c in folded[0].modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert set(m.state_dict()) == keys  # the folded copies are not submodules
    # a weight changed in place (an optimizer step, load_state_dict): the next eval folds anew
    with torch.no_grad():
        m.blocks[0].finetuned.conv1.weight.mul_(1.5)
        m.blocks[0].finetuned.bn1.running_var.mul_(2.0)
        torch.testing.assert_close(m(x), _spottune_reference(m, x, fixed))
    assert m.blocks[0]._folded.copies is not folded
    # with autograd on (eval-mode fine-tuning), routing runs the block's own modules: gradients reach them
    m.blocks[0].finetuned.conv1.weight.grad = None
    m(x).square().sum().backward()
    assert m.blocks[0].finetuned.conv1.weight.grad is not None
    m.train()
    assert all(b._folded.copies is None for b in m.blocks)
    # a BatchNorm left in training mode under eval cannot be folded: that block runs as it is
    m.eval()
    m.blocks[0].finetuned.bn1.train()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
    assert m.blocks[0]._folded.copies is None and m.blocks[1]._folded.copies is not None
    assert m._policy_folded.copies is None  # (its forward is replaced on the instance: it runs as it is)
    # a forward hook on a copy (feature extraction): that block runs its own modules, so the hook is called
    calls = []
    m.blocks[1].finetuned.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    with torch.no_grad():
        m(x)
    assert calls == [int(fixed[:, 1].sum())] and m.blocks[1]._folded.copies is None


class _InputDecisions(nn.Module):
    """The policy network run as it is (its BNs are part of what is folded), its decisions replaced by ones read
    off each image (the sign of a pixel per block): a mix of both copies in every block, for any batch size."""

    def __init__(self, policy, num_blocks):
        super().__init__()
        self.policy, self.num_blocks = policy, num_blocks

    def forward(self, x):
        g = (x.flatten(1)[:, :self.num_blocks] > 0).to(x.dtype)
        return self.policy(x) * 0 + torch.stack([1 - g, g], -1) * 10


def test_spottune_export_folds_its_bns_into_the_copies_and_routes_channels_last():
    """fold_batchnorm (what the trainer exports as model.pt2) folds the BNs of the policy and of each block's
    copies into their convolutions (SpotTune.fold_bn_; the model keeps its own), and the exported program routes
    each image through one copy in channels_last on CPU tensors: its outputs are the eager eval's, for a batch
    size other than the example's too."""
    from tlkernels.train.export import _FrozenBN, export_program, fold_batchnorm
    m = SpotTune(_resnet().float())
    _perturb_finetuned(m)
    m.policy = _InputDecisions(m.policy, len(m.blocks))
    m.eval()
    x = torch.randn(6, 3, 48, 48)
    folded = fold_batchnorm(m)
    bns = lambda mod: [b for b in mod.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    assert not any(bns(b) for b in folded.blocks) and not bns(folded.policy)
    assert all(bns(b.finetuned) for b in m.blocks) and bns(m.policy)
    with torch.no_grad():
        want = m(x)
        program = export_program(folded, x)
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        # BNs left: the stem's and the policy's last (behind a ReLU): not routed, each one inference batch norm
        left = [n for n, b in folded.named_modules() if isinstance(b, _FrozenBN)]
        assert left == ["backbone.bn1", "policy.policy.layers.3"], left
        assert sum("batch_norm" in t for t in targets) == 2, targets
        assert sum("nonzero" in t for t in targets) == 2 * len(m.blocks), targets  # every block routes
        assert any(n.kwargs.get("memory_format") == torch.channels_last for n in program.graph.nodes
                   if n.op == "call_function"), targets
        torch.testing.assert_close(program.module()(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        torch.testing.assert_close(program.module()(x[:5]), m(x[:5]), rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_spottune_fast_eval_keeps_the_output_layout():
    """Eval on CPU runs channels_last inside; a backbone returning feature maps gives them in the default layout,
    equal to the training-mode modules' blend in eval mode."""
    m = SpotTune(nn.Sequential(*list(_resnet().children())[:-2])).double()  # (no pooling, no head)
    _perturb_finetuned(m)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    m.eval()
    with torch.no_grad():
        out = m(x)
        assert out.dim() == 4 and out.is_contiguous()
        torch.testing.assert_close(out, _spottune_reference(m, x, m.last_gates))


def test_spottune_eval_folds_the_policy_batchnorms():
    m = SpotTune(_resnet()).double()
    with torch.no_grad():  # BatchNorm statistics away from the identity, so that folding them matters
        for mod in m.policy.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    m.eval()
    with torch.no_grad():
        m(x)
        folded = m._policy_folded.copies
        assert folded is not None
        convs = [c for c in folded[0].modules() if isinstance(c, nn.Conv2d)]
        assert convs and all(c.bias is not None for c in convs)  # each BN after a conv went into it
        torch.testing.assert_close(folded[0](x), m.policy(x), rtol=1e-10, atol=1e-10)
        assert torch.equal(m.last_gates, m.policy(x).argmax(-1).double())
        m.policy.fc.bias.add_(1.0)  # changed in place: folded anew
        m(x)
        assert m._policy_folded.copies is not folded
    m.train()
    assert m._policy_folded.copies is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride,groups,dilation,bias", [(1, 1, 1, True), (2, 1, 1, False), (1, 4, 2, True)])
def test_packed_conv_equals_the_conv_it_wraps(dtype, stride, groups, dilation, bias):
    """CPU eval convolutions of the folded copies on oneDNN-prepacked weights: the plain convolution's result
    and layout; inputs the packed kernel does not take run the Conv2d itself."""
    from tlkernels.methods.spottune import _PackedConv2d
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride, dilation, dilation, groups, bias).to(dtype)
    packed = _PackedConv2d(conv)
    x = torch.randn(3, 16, 9, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    runs_packed = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tol = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    with torch.no_grad():
        y = packed(x)
        torch.testing.assert_close(y, conv(x), **tol)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert set(packed._packed) == ({dtype} if runs_packed else set())
        first = packed._packed.get(dtype)
        torch.testing.assert_close(packed(x[:1]), conv(x[:1]), **tol)  # another batch size, same packed weight
        assert packed._packed.get(dtype) is first
        # the default layout comes back as the Conv2d gives it
        xc = x.contiguous()
        assert packed(xc).is_contiguous() and torch.equal(packed(xc), conv(xc))
    # with autograd on, the Conv2d runs: gradients reach its weight
    packed(x).float().sum().backward()
    assert conv.weight.grad is not None
    # an input oneDNN refuses: the Conv2d's own error, and that dtype runs the Conv2d from then on
    with torch.no_grad(), pytest.raises(RuntimeError, match="expected input.* to have 16 channels"):
        packed(torch.randn(3, 8, 9, 9, dtype=dtype).contiguous(memory_format=torch.channels_last))
    assert packed._packed.get(dtype, "never packed") in (None, "never packed")
    with torch.no_grad():
        torch.testing.assert_close(packed(x), conv(x), **tol)
    if dtype == torch.float32:  # under autocast: bfloat16 operands, as autocast gives the Conv2d
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            y, ref = packed(x), conv(x)
        assert y.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref, rtol=1.6e-2, atol=1e-2)
        assert (torch.bfloat16 in packed._packed) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_spottune_float32_eval_runs_prepacked_convolutions_and_copies_fold_anew():
    m = SpotTune(_resnet().float())
    _perturb_finetuned(m)
    fixed = (torch.arange(4 * len(m.blocks)).view(4, -1) % 3 == 0).float()
    m.policy.forward = lambda inp: torch.stack([1 - fixed, fixed], -1) * 10
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out, _spottune_reference(m, x, fixed), rtol=1e-4, atol=1e-4)
    from tlkernels.methods.spottune import _PackedConv2d
    packed = [c for c in m.blocks[0]._folded.copies[0].modules() if isinstance(c, _PackedConv2d)]
    assert packed and all(c._packed for c in packed)  # (each ran on its packed weight)
    # a copy of the model (or a pickle of it) carries no folded copies: they hold oneDNN tensors without storage
    m2 = copy.deepcopy(m)
    assert all(b._folded.copies is None for b in m2.blocks)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), out)
    assert m2.blocks[0]._folded.copies is not None
    del m.policy.forward  # (a lambda does not pickle)
    m3 = pickle.loads(pickle.dumps(m))
    assert all(b._folded.copies is None for b in m3.blocks) and m3._policy_folded.copies is None


def test_spottune_policy_gets_gradients_and_frozen_weights_do_not_move():
    m = SpotTune(_resnet()).double()
    frozen_before = {n: p.clone() for n, p in m.named_parameters() if ".frozen." in n and "downsample" not in n}
    bn_stats_before = {n: b.clone() for n, b in m.named_buffers() if ".frozen." in n and "running" in n
                       and "downsample" not in n}
    assert frozen_before and all(not p.requires_grad for n, p in m.named_parameters() if n in frozen_before)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (4,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.policy.parameters())
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    for n, b in m.named_buffers():
        if n in bn_stats_before:
            assert torch.equal(b, bn_stats_before[n]), n
    # the copies do not share storage
    b0 = m.blocks[0]
    assert b0.frozen.conv1.weight.data_ptr() != b0.finetuned.conv1.weight.data_ptr()
    usage = m.gate_usage(reset=True)
    assert usage.shape == (8,) and ((0 <= usage) & (usage <= 1)).all()


def test_spottune_state_dict_round_trip():
    m = SpotTune(_resnet()).double().eval()
    _perturb_finetuned(m)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sd = m.state_dict()
    m2 = SpotTune(_resnet()).double().eval()
    m2.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))


def test_spottune_bad_inputs():
    with pytest.raises(ValueError, match="SpotTune: found no residual blocks in Sequential"):
        SpotTune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    m = SpotTune(_resnet())
    with pytest.raises(ValueError, match=r"SpotTune: input must be 4-D \(N, C, H, W\), got shape \(3, 32, 32\)"):
        m(torch.randn(3, 32, 32, dtype=torch.float64))


# ----------------------------------------------------------------------------- AdaFilter
def _adafilter_reference(m, x):
    """Two convolutions, two BNs and a blend per layer, by hand; the same controller for the gates."""
    layers = [l for _, l in m.layers]
    saved = {}

    def two_branch(layer):
        def fwd(inp):
            gate = layer._controller[0].gate(layer.index, inp)
            c = layer.conv
            y_pre = F.conv2d(inp, c.weight_pre, c.bias_pre, c.stride, c.padding, c.dilation, c.groups)
            y_ft = F.conv2d(inp, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
            if layer.bn_ft is not None:
                y_pre, y_ft = layer.bn_pre(y_pre), layer.bn_ft(y_ft)
            g = gate[:, :, None, None]
            return (1 - g) * y_pre + g * y_ft
        return fwd

    for l in layers:
        saved[l] = l.forward
        l.forward = two_branch(l)
    try:
        m.controller.state = None
        return m.backbone(x)
    finally:
        for l, f in saved.items():
            l.forward = f


def _mixed_gates(m):
    with torch.no_grad():  # heads that give a mix of open and closed gates
        for h in m.controller.heads:
            h.weight.normal_(0, 1.0)
            h.bias.normal_(0, 0.5)


def test_adafilter_matches_two_branch_reference_train_and_eval():
    base = _resnet()
    m = AdaFilter(base, hidden_size=16).double()
    assert len(m.layers) == 19 and isinstance(m.backbone.layer1[0].bn1, nn.Identity)
    _perturb_finetuned(m)
    _mixed_gates(m)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    m.train()
    state = copy.deepcopy(m.state_dict())
    out = m(x)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), params)
    m.load_state_dict(state)  # BN running statistics moved: restore before the reference pass
    ref = _adafilter_reference(m, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    usage = m.gate_usage()
    assert 0 < sum(usage.values()) / len(usage) < 1
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), _adafilter_reference(m, x))  # folded BN + gated conv == two branches


def test_adafilter_float32_eval_matches_reference_and_refolds_after_changes():
    # float32 eval runs the gated convolution's small-map engine at every layer (64x64 input: 16x16 down to
    # 2x2 maps, the 4x4 ones on its row-selection path); the folded weights are cached across calls and
    # must follow in-place weight changes, BN statistics and load_state_dict.
    m = AdaFilter(_resnet().float(), hidden_size=16).eval()
    _perturb_finetuned(m)
    _mixed_gates(m)
    x = torch.randn(3, 3, 64, 64)

    def check():
        with torch.no_grad():
            out = m(x)
            # The reference gets the fused pass's gates: in float32 a gate whose logit is within rounding of
            # 0 can flip between two computations of the same layer input (hard gates are discontinuous).
            gates = {layer.index: layer.last_gate for _, layer in m.layers}
            m.controller.gate = lambda index, inp: gates[index]
            try:
                ref = _adafilter_reference(m, x)
            finally:
                del m.controller.gate
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            for _, layer in m.layers:  # a fresh fold computes the same: the cache is not stale
                layer._fold_cache = None
            assert torch.equal(m(x), out)

    check()
    check()  # second call: cached folded weights
    layer = m.layers[5][1]
    with torch.no_grad():
        layer.conv.weight.mul_(1.5)  # an optimizer step does the same: in place
    check()
    with torch.no_grad():
        layer.bn_pre.running_var.mul_(2.0)
        layer.bn_ft.bias.add_(0.3)
    check()
    state = copy.deepcopy(m.state_dict())
    _perturb_finetuned(m)
    check()
    m.load_state_dict(state)
    check()
    # Training between evals, as a trainer does: our fused optimizer writes the weights through data
    # pointers, and a train-mode forward moves BN running statistics without bumping their version
    # counters; both must refold.
    opt = tlkernels.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    m.train()
    F.cross_entropy(m(x), torch.tensor([0, 1, 2])).backward()
    opt.step()
    m.eval()
    check()
    m.train()
    with torch.no_grad():
        m(2 * x + 1)  # BN running statistics only
    m.eval()
    check()
    # Inference mode (serving) computes the same, and folds into ordinary tensors (which track their versions,
    # so the CPU engine keeps its packed panels of them for later calls)
    for _, layer in m.layers:
        layer._fold_cache = None
    with torch.inference_mode():
        out = m(x)
    assert not any(t.is_inference() for _, layer in m.layers for t in layer._fold_cache[1] if torch.is_tensor(t))
    with torch.no_grad():
        assert torch.equal(m(x), out)


def test_adafilter_export_folds_its_branch_bns_once_and_runs_channels_last():
    """fold_batchnorm (what the trainer exports as model.pt2) folds each layer's branch BNs into its filters and
    bias once (AdaFilter.fold_bn_): the copy's eval output is the model's, the model keeps its BNs, and the
    exported program computes no fold per call (no rsqrt) and runs channels_last on CPU tensors, as the eager
    eval does. A layer whose BN uses batch statistics keeps it."""
    from tlkernels.train.export import _FrozenBN, export_program, fold_batchnorm
    m = AdaFilter(_resnet().float(), hidden_size=16).eval()
    _perturb_finetuned(m)
    _mixed_gates(m)
    with torch.no_grad():
        for _, layer in m.layers:  # branch BNs unlike each other and unlike identity
            for bn in (layer.bn_pre, layer.bn_ft):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 64, 64)
    folded = fold_batchnorm(m)
    assert all(l.bn_ft is None and l.bn_pre is None for _, l in folded.layers)
    assert all(l.bn_ft is not None for _, l in m.layers)
    assert isinstance(folded.backbone.bn1, _FrozenBN)  # the stem (not gated) keeps its BN as an affine map
    with torch.no_grad():
        want = m(x)
        gates = {l.index: l.last_gate for _, l in m.layers}
        got = folded(x)
        assert all(torch.equal(gates[l.index], l.last_gate) for _, l in folded.layers)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        program = export_program(folded, x)
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert not any("rsqrt" in t for t in targets), targets
        assert any(n.kwargs.get("memory_format") == torch.channels_last for n in program.graph.nodes
                   if n.op == "call_function"), targets
        assert any(t.startswith("tlkernels.gated_conv2d") for t in targets), targets
        torch.testing.assert_close(program.module()(x), got, rtol=1e-5, atol=1e-5 * got.abs().max().item())
    batch_stats = AdaFilter(_resnet().float(), hidden_size=16)
    layer = batch_stats.layers[3][1]
    layer.bn_ft.track_running_stats = layer.bn_pre.track_running_stats = False
    layer.bn_ft.running_var = layer.bn_pre.running_var = None
    batch_stats.fold_bn_()
    assert layer.bn_ft is not None and batch_stats.layers[4][1].bn_ft is None


def test_adafilter_lstm_gets_gradients_and_frozen_filters_do_not_move():
    m = AdaFilter(_resnet(), hidden_size=16).double()
    _mixed_gates(m)
    _perturb_finetuned(m)  # identical branches would give the gates an exactly zero gradient
    before = {n: b.clone() for n, b in m.named_buffers() if n.endswith("weight_pre")}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (4,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        assert m.controller.lstm.weight_ih.grad.abs().sum() > 0
        assert any(p.grad.abs().sum() > 0 for p in m.controller.proj.parameters())
        opt.step()
    for n, b in m.named_buffers():
        if n in before:
            assert torch.equal(b, before[n]), n


def test_adafilter_state_dict_and_bad_inputs():
    m = AdaFilter(_resnet(), hidden_size=8).double().eval()
    _mixed_gates(m)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    m2 = AdaFilter(_resnet(), hidden_size=8).double().eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))
    with pytest.raises(ValueError, match="AdaFilter: found no nn.Conv2d to gate in Sequential"):
        AdaFilter(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="AdaFilter: input must be 4-D"):
        m(torch.randn(3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("method", ["spottune", "adafilter"])
def test_methods_under_torch_compile(method):
    from torchvision.models.resnet import BasicBlock, ResNet
    torch.manual_seed(0)
    base = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    # Two blocks: one without, one with a downsampling shortcut (every kind of block a ResNet-18 has; compiling
    # more of them repeats the same code)
    base.layer3, base.layer4, base.fc = nn.Identity(), nn.Identity(), nn.Linear(128, 5)
    m = SpotTune(base) if method == "spottune" else AdaFilter(base, hidden_size=8)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- DDP, 2 gloo processes
def _ddp_worker(rank, world, method, result_file):
    torch.set_num_threads(1)  # (one thread a rank: two ranks, two cores)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=5)
    m = SpotTune(base) if method == "spottune" else AdaFilter(base, hidden_size=8)
    ddp = torch.nn.parallel.DistributedDataParallel(m)  # find_unused_parameters=False: every param must be used
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01)
    torch.manual_seed(100 + rank)
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save((gathered[0] - gathered[1]).abs().max(), result_file)


@pytest.mark.parametrize("method", ["spottune", "adafilter"])
def test_methods_under_ddp_two_gloo_processes(method):
    with tempfile.TemporaryDirectory() as d:
        init, result = os.path.join(d, "init"), os.path.join(d, "result.pt")
        gloo_ranks(_ddp_worker, 2, init, method, result)
        assert torch.load(result).item() == 0.0  # replicas stay identical


def test_spottune_policy_sees_a_resized_input():
    import torchvision
    from tlkernels.methods import SpotTune
    seen = []
    st = SpotTune(torchvision.models.resnet18(num_classes=3))
    st.policy.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    st.eval()
    with torch.no_grad():
        st(torch.randn(2, 3, 96, 128))
        st(torch.randn(2, 3, 32, 32))
        st.policy_size = None
        st(torch.randn(2, 3, 96, 96))
    assert seen == [(64, 64), (32, 32), (96, 96)]
    with pytest.raises(ValueError, match="policy_size must be None or an int >= 8"):
        SpotTune(torchvision.models.resnet18(num_classes=3), policy_size=4)


def test_official_policy_network_structure():
    """The official agent: 3->32 stem without ReLU, blocks 64/128/256 stride 2 with parameter-free
    shortcuts (avg pool + zero channel padding), final BN + ReLU; the default of SpotTune."""
    from tlkernels.methods import OfficialPolicyNet
    from tlkernels.methods.spottune import _PolicyBlock, _ZeroPadShortcut
    p = OfficialPolicyNet(8)
    assert [type(m).__name__ for m in p.stem] == ["Conv2d", "BatchNorm2d"] and p.stem[0].out_channels == 32
    blocks = [m for m in p.layers if isinstance(m, _PolicyBlock)]
    assert [b.body[0].out_channels for b in blocks] == [64, 128, 256] and all(b.body[0].stride == (2, 2) for b in blocks)
    assert all(sum(q.numel() for q in b.shortcut.parameters()) == 0 for b in blocks)
    assert [type(m).__name__ for m in p.layers[3:]] == ["BatchNorm2d", "ReLU"]
    # the shortcut: average pooling by 2, then zeros for the new channels
    x = torch.randn(2, 32, 8, 8)
    s = _ZeroPadShortcut(32, 64, 2)(x)
    torch.testing.assert_close(s[:, :32], F.avg_pool2d(x, 2))
    assert s.shape == (2, 64, 4, 4) and torch.all(s[:, 32:] == 0)
    assert p(torch.randn(3, 3, 64, 64)).shape == (3, 8, 2)
    st = SpotTune(torchvision.models.resnet18(num_classes=3))
    assert isinstance(st.policy, OfficialPolicyNet)
    assert type(SpotTune(torchvision.models.resnet18(num_classes=3), policy="resnet").policy).__name__ == "PolicyNet"
    with pytest.raises(ValueError, match="SpotTune: policy must be 'official', 'resnet' or an nn.Module"):
        SpotTune(torchvision.models.resnet18(num_classes=3), policy="big")


def test_spottune_global_one_choice_per_block_budget_and_plain_network():
    from tlkernels.methods.spottune import SpotTuneGlobal
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=5)
    m = SpotTuneGlobal(copy.deepcopy(base), tau=5.0)
    with torch.no_grad():
        m.logits.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 4))  # blocks alternate fine-tuned / frozen
        for b in m.blocks:  # tell the copies apart: move the fine-tuned copies' first conv
            b.finetuned.conv1.weight.add_(0.05)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    assert m.gates().tolist() == [1.0, 0.0] * 4
    y = m(x)
    # the same network written out by hand: block i = its chosen copy
    ref = copy.deepcopy(base)
    blocks = [ref.layer1, ref.layer2, ref.layer3, ref.layer4]
    for i, b in enumerate(m.blocks):
        seq, j = blocks[i // 2], i % 2
        seq[j] = copy.deepcopy(b.finetuned if i % 2 == 0 else b.frozen)
    ref.eval()
    torch.testing.assert_close(y, ref(x))
    plain = m.to_plain().eval()
    assert not any(type(mod).__name__ == "SpotTuneBlock" for mod in plain.modules())
    torch.testing.assert_close(plain(x), y)
    fresh = torchvision.models.resnet18(num_classes=5)
    fresh.load_state_dict(plain.state_dict())  # torchvision's own names: an ordinary network
    # training: one sample per step shared by the batch, straight-through gradient to the logits
    m.train()
    out = m(x)
    out.sum().backward()
    assert m.logits.grad is not None and m.logits.grad.abs().sum() > 0
    # a budget: exactly k fine-tuned blocks, in eval and in every training sample
    k = SpotTuneGlobal(copy.deepcopy(base), budget=3)
    for _ in range(5):
        assert int(k.gates().detach().round().sum()) == 3
    k.eval()
    assert int(k.gates().sum()) == 3
    with pytest.raises(ValueError, match=r"SpotTuneGlobal: budget must be None or an int in \[0, 8\]"):
        SpotTuneGlobal(torchvision.models.resnet18(), budget=9)
