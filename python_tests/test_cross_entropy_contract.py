"""tlkernels.ops.cross_entropy against F.cross_entropy on PyTorch's own OpInfo sample inputs (values and
gradients, float64 and float32), through every path: the C++ CPU kernel, the Triton kernel (interpreted,
standing in for the CPU kernel), and the pure-PyTorch reference. Plus label smoothing, class weights and dense
targets beyond OpInfo's samples, joint_cross_entropy with per-head options, and the trainer's loss options."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db

from tlkernels import config
from tlkernels.ops import cross_entropy, joint_cross_entropy
from tlkernels.ops.cross_entropy import _ref_impl, _triton_impl

OPINFO = next(o for o in op_db if o.name == "nn.functional.cross_entropy")


@contextlib.contextmanager
def path(name, monkeypatch):
    """Run the op's CPU dispatch through one implementation."""
    if name == "kernel":
        yield
    elif name == "reference":
        with config.override(backend="reference"):
            yield
    else:
        impl = {"triton": _triton_impl, "reference_kernel": _ref_impl}[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel" (restored on exit)
            with torch.library._scoped_library("tlkernels", "IMPL") as lib:
                lib.impl("cross_entropy", impl, "CPU")
                yield


def _compare(fn_ours, x, args, kwargs, rtol, atol):
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    want = F.cross_entropy(xa, *args, **kwargs)
    got = fn_ours(xb, *args, **kwargs)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
    seed = torch.randn_like(want)
    (gw,) = torch.autograd.grad(want, xa, seed)
    (gg,) = torch.autograd.grad(got, xb, seed)
    torch.testing.assert_close(gg, gw, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("impl", ["kernel", "reference", "triton", "reference_kernel"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_opinfo_sample_matches_f_cross_entropy(impl, dtype, monkeypatch):
    samples = list(OPINFO.sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) >= 21
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    with path(impl, monkeypatch):
        for s in samples:
            _compare(cross_entropy, s.input, s.args, s.kwargs, **tol)


SHAPES = [((6, 5), (6,)), ((3, 4, 7), (3, 7)), ((2, 3, 4, 5), (2, 4, 5)), ((5,), ())]


@pytest.mark.parametrize("impl", ["kernel", "reference", "triton"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_class_weights_dense_targets(impl, soft, weighted, smoothing, reduction, monkeypatch):
    torch.manual_seed(3)
    with path(impl, monkeypatch):
        for xs, ts in SHAPES:
            C = xs[0] if len(xs) == 1 else xs[1]
            x = torch.randn(xs, dtype=torch.float64)
            if soft:
                t = torch.softmax(torch.randn(xs, dtype=torch.float64), 0 if len(xs) == 1 else 1)
            else:
                t = torch.randint(0, C, ts)
                if t.dim() and t.numel() > 2:
                    t.view(-1)[1] = -100  # an ignored element
            kw = dict(reduction=reduction, label_smoothing=smoothing)
            if weighted:
                kw["weight"] = torch.rand(C, dtype=torch.float64) + 0.1
            _compare(cross_entropy, x, (t,), kw, rtol=1e-7, atol=1e-7)


def test_ignore_index_inside_the_class_range_and_legacy_reduction_args():
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 1])
    for kw in (dict(ignore_index=1), dict(ignore_index=1, label_smoothing=0.2, weight=torch.rand(4).double()),
               dict(size_average=False), dict(reduce=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # size_average/reduce are deprecated in PyTorch too
            _compare(cross_entropy, x, (y,), kw, rtol=1e-7, atol=1e-7)


def test_all_ignored_batch_with_smoothing_is_nan_like_pytorch():
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.full((3,), -100)
    assert torch.isnan(cross_entropy(x, y, label_smoothing=0.1)) and torch.isnan(F.cross_entropy(x, y, label_smoothing=0.1))


# Degenerate batches: every row ignored, class weights that are zero for every counted row (the weighted
# mean's 0/0), some ignored and some zero-weight rows; F.cross_entropy's values and gradients (NaN or 0 by
# its rules) are the contract.
DEGENERATE_TARGETS = {"all_ignored": [-100, -100, -100, -100], "some_ignored": [0, -100, 2, -100],
                      "counted_weigh_zero": [0, 2, 0, 2]}
DEGENERATE_WEIGHTS = {"none": None, "positive": [1.0, 2.0, 0.5], "all_zero": [0.0, 0.0, 0.0],
                      "zero_where_counted": [0.0, 1.0, 0.0]}


@pytest.mark.parametrize("impl", ["kernel", "reference", "triton", "reference_kernel"])
@pytest.mark.parametrize("target", list(DEGENERATE_TARGETS))
@pytest.mark.parametrize("weight", list(DEGENERATE_WEIGHTS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_degenerate_batches_match_f_values_and_gradients(impl, target, weight, smoothing, monkeypatch):
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor(DEGENERATE_TARGETS[target])
    w = None if DEGENERATE_WEIGHTS[weight] is None else torch.tensor(DEGENERATE_WEIGHTS[weight], dtype=torch.float64)
    with path(impl, monkeypatch):
        for reduction in ("mean", "sum", "none"):
            kw = dict(weight=w, label_smoothing=smoothing, reduction=reduction)
            _compare(cross_entropy, x, (t,), kw, rtol=1e-7, atol=1e-7)
            # (N, C, d) logits: the same rows through the dense path
            _compare(cross_entropy, x.T.reshape(1, 3, 4), (t.reshape(1, 4),), kw, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kw,msg", [
    (dict(weight=torch.ones(3)), r"cross_entropy: weight \(class weights\) must have shape \(4,\)"),
    (dict(weight=torch.ones(4, dtype=torch.long)), "cross_entropy: weight must be a floating-point"),
    (dict(label_smoothing=1.5), r"label_smoothing must be a float in \[0, 1\]"),
    (dict(label_smoothing=-0.1), r"label_smoothing must be a float in \[0, 1\]"),
])
def test_bad_options(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        cross_entropy(torch.randn(2, 4), torch.tensor([0, 1]), **kw)


@pytest.mark.parametrize("x,t,msg", [
    (torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long), r"target must have shape \(2, 3\) for logits of shape"),
    (torch.randn(2, 4, 3), torch.rand(2, 3, 4), r"target must have shape \(2, 4, 3\) for logits .* \(soft labels\)"),
    (torch.randn(4), torch.tensor([1]), r"target must have shape \(\) for unbatched logits"),
    (torch.tensor(1.0), torch.tensor(0), "must have a class dimension"),
    (torch.randn(2, 4, 3), torch.full((2, 3), 7), r"out of range \[0, 4\)"),
])
def test_bad_dense_shapes(x, t, msg):
    with pytest.raises((ValueError, RuntimeError), match=msg):
        cross_entropy(x, t, label_smoothing=0.1 if "range" in msg else 0.0)


def test_label_out_of_range_with_smoothing_or_weights_is_a_clear_error():
    for kw in (dict(label_smoothing=0.1), dict(weight=torch.ones(3))):
        with pytest.raises(RuntimeError, match=r"cross_entropy: target\[1\] = 5 is out of range \[0, 3\)"):
            cross_entropy(torch.randn(2, 3), torch.tensor([0, 5]), **kw)


def test_joint_cross_entropy_per_head_options():
    torch.manual_seed(0)
    xt, yt = torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (4, 5))
    xs, ys = torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 7, (6,))
    cw = torch.rand(3, dtype=torch.float64) + 0.5
    a = [xt.clone().requires_grad_(), xs.clone().requires_grad_()]
    b = [xt.clone().requires_grad_(), xs.clone().requires_grad_()]
    got = joint_cross_entropy(a[0], yt, a[1], ys, source_weight=0.3, target_weight=0.7, target_class_weight=cw,
                              target_label_smoothing=0.1, source_label_smoothing=0.2)
    want = 0.7 * F.cross_entropy(b[0], yt, weight=cw, label_smoothing=0.1) + 0.3 * F.cross_entropy(
        b[1], ys, label_smoothing=0.2)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad)
    with pytest.raises(ValueError, match=r"joint_cross_entropy: source_class_weight \(class weights\) must have shape"):
        joint_cross_entropy(xt, yt, xs, ys, source_class_weight=torch.ones(3, dtype=torch.float64))


def test_soft_joint_loss_with_class_weights_and_smoothing():
    from tlkernels.nn import SoftJointLoss
    cw = torch.tensor([0.5, 2.0, 1.0])
    loss = SoftJointLoss("constant", lambda0=0.5, target_weight=0.5, class_weight=cw, label_smoothing=0.1)
    xt, yt, xs, ys = torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), torch.randn(5, 6), torch.randint(0, 6, (5,))
    want = 0.5 * F.cross_entropy(xt, yt, weight=cw, label_smoothing=0.1) + 0.5 * F.cross_entropy(xs, ys)
    torch.testing.assert_close(loss(xt, yt, xs, ys), want)
