import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tlkernels.nn import L2SP, SoftJointLoss, TransferLoss
from tlkernels.ops import (cross_entropy, cross_entropy_reference, joint_cross_entropy, l2sp_penalty,
                           l2sp_penalty_reference, l2sp_value_and_grad)
from tlkernels.optim import SGD, AdamW


def _lists(dtypes=(torch.float32, torch.float64, torch.bfloat16), n_new=2):
    params = [torch.randn(s, dtype=dt, requires_grad=True) for s, dt in zip([(7, 3, 3, 3), (70000,), (5, 4)], dtypes)]
    refs = [(p.detach() + 0.1 * torch.randn_like(p)) for p in params]
    new = [torch.randn(3, 2, dtype=torch.float32, requires_grad=True) for _ in range(n_new)]
    return params, refs, new


# ----------------------------------------------------------------------------- L2-SP op
def test_l2sp_matches_reference_value_and_grads():
    params, refs, new = _lists()
    v = l2sp_penalty(params, refs, 0.1, new, 0.01)
    r = l2sp_penalty_reference(params, refs, 0.1, new, 0.01)
    assert v.dtype == torch.float64  # promoted: one param is float64
    torch.testing.assert_close(v, r, rtol=1e-6, atol=0)
    v.backward()
    for p, p0 in zip(params, refs):
        torch.testing.assert_close(p.grad, (0.1 * (p.detach().double() - p0.double())).to(p.dtype))
    for q in new:
        torch.testing.assert_close(q.grad, 0.01 * q.detach())


def test_l2sp_value_and_grad_is_one_pass_of_the_same_thing():
    params, refs, new = _lists()
    v, gp, gn = l2sp_value_and_grad(params, refs, 0.1, new, 0.01)
    torch.testing.assert_close(v, l2sp_penalty(params, refs, 0.1, new, 0.01))
    torch.testing.assert_close(gp[0], 0.1 * (params[0].detach() - refs[0]))
    torch.testing.assert_close(gn[1], 0.01 * new[1].detach())


def test_l2sp_value_and_grad_accumulates_into_dot_grad():
    """accumulate=True leaves in .grad what (task loss + penalty).backward() leaves there, in place."""
    params, refs, new = _lists()
    big = torch.randn(200_003, requires_grad=True)  # several chunks, AVX2 body and a scalar tail
    big_ref = big.detach() + 0.05 * torch.randn(200_003)
    params, refs = params + [big], refs + [big_ref]
    torch.manual_seed(3)
    task = [torch.randn_like(t) for t in params + new]
    ref_p = [t.detach().clone().requires_grad_() for t in params + new]
    n = len(params)
    for t, w in zip(ref_p, task):
        t.grad = w.clone()
    l2sp_penalty_reference(ref_p[:n], refs, 0.1, ref_p[n:], 0.01).backward()
    for t, w in zip(params + new, task):
        t.grad = w.clone()
    new[0].grad = None  # a tensor without a gradient yet gets one
    keep = params[0].grad
    v, gp, gn = l2sp_value_and_grad(params, refs, 0.1, new, 0.01, accumulate=True)
    assert gp[0] is keep and params[0].grad is keep  # in place, no new tensor
    torch.testing.assert_close(v, l2sp_penalty_reference(params, refs, 0.1, new, 0.01))
    for t, r, w in zip(params + new, ref_p, task):
        exp = r.grad if t is not new[0] else r.grad - w
        torch.testing.assert_close(t.grad, exp.to(t.dtype))
    op = torch.ops.tlkernels.l2sp_value_and_grad_.default
    d = [t.detach() for t in params]
    with pytest.raises(ValueError, match=r"l2sp_value_and_grad_: grads must have one tensor per params \(4\), got 3"):
        op(d, refs, [], 0.1, [], 0.0, [t.grad for t in params][:3], [])
    with pytest.raises(ValueError, match=r"l2sp_value_and_grad_: grads\[0\] must have the memory layout of params\[0\]"):
        op(d[:1], refs[:1], [], 0.1, [], 0.0, [torch.zeros(d[0].shape[::-1], dtype=d[0].dtype).permute(3, 2, 1, 0)], [])
    params[0].grad = torch.zeros(params[0].shape[::-1]).permute(3, 2, 1, 0)
    with pytest.raises(ValueError, match=r"l2sp_value_and_grad: params\[0\].grad must have the memory layout of params\[0\]"):
        l2sp_value_and_grad(params, refs, 0.1, accumulate=True)


def test_l2sp_deterministic_across_runs_and_thread_counts():
    params, refs, new = _lists(dtypes=(torch.float32,) * 3)
    big = [torch.randn(300_001) for _ in range(3)]
    big_refs = [b + 0.01 for b in big]
    a = l2sp_penalty(params + big, refs + big_refs, 0.1, new, 0.01)
    b = l2sp_penalty(params + big, refs + big_refs, 0.1, new, 0.01)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = l2sp_penalty(params + big, refs + big_refs, 0.1, new, 0.01)
    finally:
        torch.set_num_threads(n)
    assert a.item() == b.item() == c.item()


@pytest.mark.parametrize("call,msg", [
    (lambda p, r, q: l2sp_penalty(p, r[:-1], 0.1, q), r"l2sp_penalty: refs must have one tensor per param \(3\), got 2"),
    (lambda p, r, q: l2sp_penalty(p, [r[0], r[1], torch.randn(4, 5)], 0.1, q),
     r"l2sp_penalty: refs\[2\] must have the shape of params\[2\] \(5, 4\), got \(4, 5\)"),
    (lambda p, r, q: l2sp_penalty(p, [r[0], r[1].float(), r[2]], 0.1, q),
     r"l2sp_penalty: refs\[1\] must have the dtype of params\[1\]"),
    (lambda p, r, q: l2sp_penalty(p, r, 0.1, [torch.zeros(3, dtype=torch.long)]),
     r"l2sp_penalty: new_params\[0\] must be floating point"),
    (lambda p, r, q: l2sp_penalty(p[0], r, 0.1, q), "l2sp_penalty: params must be a list or tuple of tensors"),
])
def test_l2sp_bad_inputs(call, msg):
    params, refs, new = _lists()
    with pytest.raises((ValueError, TypeError), match=msg):
        call(params, refs, new)


def test_l2sp_cpp_checks_name_the_argument():
    with pytest.raises(ValueError, match=r"l2sp_penalty: refs\[0\] must have the shape of params\[0\]"):
        torch.ops.tlkernels.l2sp_penalty([torch.randn(3)], [torch.randn(4)], [], 0.1, [], 0.0)


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_parity_with_torch(reduction, weighted):
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, -100, 3, 3, 2, -100, 1, 5])
    cw = torch.rand(7, dtype=torch.float64) + 0.5 if weighted else None
    sw = cw[y.clamp(min=0)] if weighted else None
    ours = cross_entropy(x, y, sample_weight=sw, reduction=reduction)
    ref = F.cross_entropy(x, y, weight=cw, reduction=reduction)
    torch.testing.assert_close(ours, ref)
    gy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])


def test_cross_entropy_all_ignored_and_one_class():
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.full((4,), -100)
    ours, ref = cross_entropy(x, y), F.cross_entropy(x, y)
    assert torch.isnan(ours) and torch.isnan(ref)
    g = torch.autograd.grad(ours, x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(ref, x)[0])  # zeros, as torch
    x1 = torch.randn(6, 1, requires_grad=True)
    y1 = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(cross_entropy(x1, y1), F.cross_entropy(x1, y1))


def test_cross_entropy_soft_labels_and_gradcheck():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 6, dtype=torch.float64), 1)
    torch.testing.assert_close(cross_entropy(x, q), F.cross_entropy(x, q))
    assert torch.autograd.gradcheck(lambda a: cross_entropy(a, q, reduction="sum", scale=0.7), (x,))
    y = torch.tensor([1, 0, -100, 5, 2])
    sw = torch.rand(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: cross_entropy(a, y, sample_weight=sw), (x,))
    assert torch.autograd.gradcheck(lambda a: cross_entropy(a, y, reduction="none"), (x,))


def test_joint_cross_entropy_matches_weighted_sum():
    xt = torch.randn(8, 10, requires_grad=True)
    yt = torch.randint(0, 10, (8,))
    xs = torch.randn(12, 30, requires_grad=True)
    ys = torch.randint(0, 30, (12,))
    ours = joint_cross_entropy(xt, yt, xs, ys, source_weight=0.3, target_weight=0.5)
    ref = 0.5 * F.cross_entropy(xt, yt) + 0.3 * F.cross_entropy(xs, ys)
    torch.testing.assert_close(ours, ref)
    g = torch.autograd.grad(ours, [xt, xs])
    gr = torch.autograd.grad(ref, [xt, xs])
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)
    rows_t, rows_s = joint_cross_entropy(xt, yt, xs, ys, source_weight=0.3, reduction="none")
    torch.testing.assert_close(rows_s, 0.3 * F.cross_entropy(xs, ys, reduction="none"))


def test_joint_cross_entropy_is_one_autograd_node_with_weights_and_ignored_rows():
    torch.manual_seed(1)
    xt = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    yt = torch.tensor([0, -100, 9, 3, 3, -100, 1])
    wt = torch.rand(7, dtype=torch.float64)
    xs = torch.randn(5, 30, requires_grad=True)  # heads may differ in dtype: the loss is promoted
    ys = torch.randint(0, 30, (5,))
    for reduction in ("mean", "sum"):
        ours = joint_cross_entropy(xt, yt, xs, ys, source_weight=0.3, target_weight=0.7, target_sample_weight=wt,
                                   reduction=reduction)
        # one node for both heads: its inputs are the two leaves' gradient accumulators
        nxt = {type(f).__name__ if f is not None else None for f, _ in ours.grad_fn.next_functions}
        assert nxt - {None} == {"AccumulateGrad"}, ours.grad_fn.next_functions
        assert ours.dtype == torch.float64
        ref = (0.7 * cross_entropy_reference(xt, yt, wt, reduction=reduction)
               + 0.3 * F.cross_entropy(xs, ys, reduction=reduction))
        torch.testing.assert_close(ours, ref)
        # an upstream gradient other than 1 scales both heads
        g = torch.autograd.grad(3 * ours, [xt, xs])
        gr = torch.autograd.grad(3 * ref, [xt, xs])
        for a, b in zip(g, gr):
            torch.testing.assert_close(a, b)
    assert torch.all(g[0][yt == -100] == 0)
    # only one head trainable (a frozen target head; an optional weight shifts the tensor inputs)
    for w in (wt, None):
        ours = joint_cross_entropy(xt.detach(), yt, xs, ys, source_weight=0.3, target_sample_weight=w)
        ref = 0.3 * F.cross_entropy(xs, ys)
        torch.testing.assert_close(torch.autograd.grad(ours, [xs])[0], torch.autograd.grad(ref, [xs])[0])
        ours = joint_cross_entropy(xt, yt, xs.detach(), ys, source_weight=0.3, target_sample_weight=w)
        assert torch.autograd.grad(ours, [xt])[0].shape == xt.shape


def test_joint_cross_entropy_op_checks_its_arguments():
    xt = torch.randn(6, 5, requires_grad=True)
    yt = torch.tensor([0, 1, -100, 4, 2, 3])
    xs = torch.randn(4, 9, requires_grad=True)
    ys = torch.tensor([8, 0, 2, 2])
    op = torch.ops.tlkernels.joint_cross_entropy.default
    with pytest.raises(ValueError, match="joint_cross_entropy: reduction must be 1 \\(mean\\) or 2 \\(sum\\)"):
        op(xt, yt, None, xs, ys, None, -100, 0, 1.0, 1.0, False)
    with pytest.raises(RuntimeError, match=r"joint_cross_entropy: source_labels\[0\] = 9 is out of range"):
        op(xt, yt, None, xs, torch.tensor([9, 0, 0, 0]), None, -100, 1, 1.0, 1.0, False)


def test_joint_cross_entropy_under_torch_compile():
    xt = torch.randn(8, 10, requires_grad=True)
    yt = torch.randint(0, 10, (8,))
    xs = torch.randn(12, 30, requires_grad=True)
    ys = torch.randint(0, 30, (12,))
    p = [torch.randn(5, 3, requires_grad=True)]
    r = [torch.randn(5, 3)]

    def f(xt, xs, p0):
        return joint_cross_entropy(xt * 2, yt, xs, ys, source_weight=0.5) + l2sp_penalty([p0], r, 0.1)

    out = torch.compile(f, fullgraph=True)(xt, xs, p[0])
    ref = f(xt, xs, p[0])
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out, [xt, xs, p[0]])
    gr = torch.autograd.grad(ref, [xt, xs, p[0]])
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call,msg", [
    (lambda x, y: cross_entropy(x, torch.tensor([0, 9, 1])), r"cross_entropy: target\[1\] = 9 is out of range \[0, 5\)"),
    (lambda x, y: cross_entropy(x[0], y), r"cross_entropy: target must have shape \(\) for unbatched logits"),
    (lambda x, y: cross_entropy(x, y.int()), "cross_entropy: target must be int64 labels or a float probability matrix"),
    (lambda x, y: cross_entropy(x, y[:2]), r"cross_entropy: target must have shape \(3,\)"),
    (lambda x, y: cross_entropy(x, torch.rand(3, 4)), "cross_entropy: target \\(soft labels\\) must have the shape"),
    (lambda x, y: cross_entropy(x, y, reduction="avg"), "cross_entropy: reduction must be one of"),
    (lambda x, y: joint_cross_entropy(x, y, x), "joint_cross_entropy: source_logits and source_labels must be given together"),
    (lambda x, y: joint_cross_entropy(x, y, x[0], y),
     r"joint_cross_entropy: source_labels must have shape \(\) for unbatched source_logits"),
])
def test_cross_entropy_bad_inputs(call, msg):
    x = torch.randn(3, 5)
    y = torch.tensor([0, 4, 1])
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        call(x, y)


def test_cross_entropy_deterministic():
    x = torch.randn(512, 300)
    y = torch.randint(0, 300, (512,))
    assert cross_entropy(x, y).item() == cross_entropy(x, y).item()


# ----------------------------------------------------------------------------- Triton kernel, interpreted
@pytest.mark.parametrize("soft,weighted,reduction", [(False, False, 1), (False, True, 0), (True, False, 2)])
def test_triton_cross_entropy_interpreted(soft, weighted, reduction):
    from tlkernels.triton.cross_entropy import cross_entropy_forward
    x = torch.randn(5, 37)
    y = torch.softmax(torch.randn(5, 37), 1) if soft else torch.tensor([3, -100, 36, 0, 17])
    sw = torch.rand(5) if weighted else None
    loss, grad = cross_entropy_forward(x, y, sw, -100, reduction, 0.5, True)
    red = {0: "none", 1: "mean", 2: "sum"}[reduction]
    xr = x.clone().requires_grad_()
    ref = cross_entropy_reference(xr, y, sw, -100, red, 0.5)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.sum(), xr)[0], rtol=1e-5, atol=1e-6)


def test_triton_joint_cross_entropy_interpreted():
    """The CUDA kernel of joint_cross_entropy (two Triton row passes), run by the interpreter on the CPU."""
    from tlkernels.ops.cross_entropy import _joint_impl, _triton_impl
    xt, yt = torch.randn(5, 37), torch.tensor([3, -100, 36, 0, 17])
    xs, ys = torch.randn(3, 70), torch.tensor([69, 0, 5])
    loss, gt, gs = _joint_impl(_triton_impl)(xt, yt, None, xs, ys, None, -100, 1, 0.5, 2.0, True)
    ref = torch.ops.tlkernels.joint_cross_entropy(xt, yt, None, xs, ys, None, -100, 1, 0.5, 2.0, True)
    for a, b in zip((loss, gt, gs), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- modules
def _net(dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 6))
    return m.to(dtype)


def test_l2sp_module_scopes_and_head():
    m = _net()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    k = L2SP(m, reference=ref, alpha=0.1, beta=0.01, head="5", scope="kernels")
    assert k.names == ["0.weight"] and k.new_names == ["5.weight"]
    exp = 0.05 * (m[0].weight - ref["0.weight"]).pow(2).sum() + 0.005 * m[5].weight.pow(2).sum()
    torch.testing.assert_close(k(), exp)
    a = L2SP(m, reference=ref, alpha=0.1, beta=0.01, head="5", scope="all")
    assert set(a.names) == {"0.weight", "0.bias", "1.weight", "1.bias"} and set(a.new_names) == {"5.weight", "5.bias"}
    snap = L2SP(m)  # snapshot now: zero penalty
    assert snap().item() == 0.0
    with pytest.raises(ValueError, match="L2SP: head 'fc' matches no trainable parameter"):
        L2SP(m, head="fc")
    with pytest.raises(KeyError, match="L2SP: reference has no entry for '5.weight'"):
        L2SP(m, reference={k2: v for k2, v in ref.items() if not k2.startswith("5.")})
    with pytest.raises(ValueError, match="L2SP: scope must be 'kernels' or 'all'"):
        L2SP(m, scope="bn")


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "exponential", "step"])
def test_soft_joint_schedules(schedule):
    loss = SoftJointLoss(schedule, lambda0=0.8, total_steps=10)
    lams = []
    for _ in range(12):
        lams.append(loss.lam())
        loss.step()
    assert lams[0] == pytest.approx(0.8)
    if schedule == "constant":
        assert all(v == pytest.approx(0.8) for v in lams)
    else:
        assert all(a >= b for a, b in zip(lams, lams[1:])) and lams[10] == 0.0 and lams[9] > 0
    # resume keeps t
    sd = loss.state_dict()
    again = SoftJointLoss(schedule, lambda0=0.8, total_steps=10)
    again.load_state_dict(sd)
    assert again.t == 12 and again.lam() == loss.lam()
    with pytest.raises(ValueError, match="SoftJointLoss: schedule must be one of"):
        SoftJointLoss("sigmoid", total_steps=3)
    with pytest.raises(ValueError, match="needs total_steps > 0"):
        SoftJointLoss("linear")


def test_transfer_loss_parts():
    m = _net()
    l2 = L2SP(m, head="5")
    with torch.no_grad():
        m[0].weight.add_(0.5)
    joint = SoftJointLoss("linear", lambda0=0.5, total_steps=4)
    tl = TransferLoss(joint, l2)
    xt, yt = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 6, (4,))
    xs, ys = torch.randn(3, 9, dtype=torch.float64), torch.randint(0, 9, (3,))
    total, parts = tl(xt, yt, xs, ys)
    exp = F.cross_entropy(xt, yt) + 0.5 * F.cross_entropy(xs, ys) + l2()
    torch.testing.assert_close(total, exp)
    assert set(parts) == {"target_ce", "source_ce", "lambda", "l2sp"} and parts["lambda"] == 0.5


# ----------------------------------------------------------------------------- optimizers
def _trajectory(fused, opt_name, kw, steps=4, scope="kernels"):
    m = _net()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    l2 = L2SP(m, reference=ref, alpha=0.1, beta=0.01, head="5", scope=scope)
    if fused:
        opt = {"sgd": SGD, "adamw": AdamW}[opt_name](m.parameters(), l2sp=l2, **kw)
    elif opt_name == "adamw":  # no decoupled weight decay on the tensors L2-SP penalises (tlkernels.optim.AdamW)
        penalised = {id(p) for p in l2.params + l2.new_params}
        groups = [{"params": [p for p in m.parameters() if id(p) in penalised], "weight_decay": 0.0},
                  {"params": [p for p in m.parameters() if id(p) not in penalised]}]
        opt = torch.optim.AdamW(groups, **kw)
    else:
        opt = torch.optim.SGD(m.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 6, (6,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        if not fused:
            loss = loss + l2()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("opt_name,kw", [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=False)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
])
@pytest.mark.parametrize("scope", ["kernels", "all"])
def test_fused_optimizer_follows_torch_optim_plus_penalty(opt_name, kw, scope):
    a = _trajectory(True, opt_name, kw, scope=scope)
    b = _trajectory(False, opt_name, kw, scope=scope)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("opt_cls,kw", [(SGD, dict(lr=0.1, momentum=0.9)), (AdamW, dict(lr=1e-2))])
def test_fused_steps_bump_version_counters_like_torch_inplace_ops(opt_cls, kw):
    """Our kernels write through data pointers; the ops still bump `_version` of every tensor they write, as
    ATen's in-place ops do. Without it, autograd misses a tensor modified between forward and backward, and
    version-keyed caches (AdaFilter's folded eval weights) go stale."""
    m = nn.Linear(6, 4)
    opt = opt_cls(m.parameters(), l2sp=L2SP(m, alpha=0.1, beta=0.01, head=None), **kw)
    m(torch.randn(3, 6)).sum().backward()
    before = [p._version for p in m.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(m.parameters(), before))
    state_before = [t._version for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    opt.step()
    state_after = [t._version for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    assert state_after and all(a > b for a, b in zip(state_after, state_before))  # momentum / moment buffers
    # a step between forward and backward is caught by autograd, as with torch.optim
    y = (m.weight ** 2).sum()  # pow saves the weight itself for its backward
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # and the L2-SP gradient added into .grad in place bumps .grad's version
    g = [p.grad for p in m.parameters()]
    before = [t._version for t in g]
    l2sp_value_and_grad(list(m.parameters()), [p.detach().clone() for p in m.parameters()], 0.1, accumulate=True)
    assert all(t._version > v for t, v in zip(g, before))


def test_optimizer_step_bad_inputs():
    p = [torch.randn(3)]
    with pytest.raises(ValueError, match=r"sgd_l2sp_step_: grads must have one tensor per param \(1\), got 0"):
        torch.ops.tlkernels.sgd_l2sp_step_(p, [], [], [None], [], [0.0], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"adamw_l2sp_step_: refs\[0\] must have the shape of params\[0\]"):
        torch.ops.tlkernels.adamw_l2sp_step_(p, [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [],
                                             [torch.zeros(4)], [], [0.1], 0.1, 0.9, 0.99, 1e-8, 0.0, 1, False)
    with pytest.raises(ValueError, match=r"adamw_l2sp_step_: max_exp_avg_sqs must have one tensor per param "
                                           r"\(1\), got 2"):
        torch.ops.tlkernels.adamw_l2sp_step_(p, [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)],
                                             [torch.zeros(3)] * 2, [None], [], [0.1], 0.1, 0.9, 0.99, 1e-8, 0.0, 1,
                                             False)
    with pytest.raises(ValueError, match="SGD: nesterov momentum requires momentum > 0"):
        SGD([torch.zeros(1, requires_grad=True)], lr=0.1, nesterov=True)


def test_cross_entropy_fast_exp_accuracy_and_masked_logits():
    """The AVX2 row pass uses its own exp (flushes below e^-87.3): softmax as accurate as torch's float32 one,
    -inf (masked) logits give exact zero gradients, NaN logits give a NaN loss."""
    torch.manual_seed(0)
    x = torch.randn(64, 1003) * 30
    x[0, 5] = float("-inf")
    x[1] = torch.linspace(-100, 0, 1003)
    y = torch.randint(0, 1003, (64,))
    xr = x.clone().requires_grad_()
    loss = cross_entropy(xr, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xr)
    p = torch.softmax(x.double(), 1)
    off = (p > 1e-30) & (F.one_hot(y, 1003) == 0)
    ours = ((g.double() - p).abs() / p)[off].max()
    torch32 = ((torch.softmax(x, 1).double() - p).abs() / p)[off].max()
    assert ours <= 1.5 * torch32 + 1e-6, (ours, torch32)
    assert g[0, 5].item() == 0.0
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), y, reduction="sum"), rtol=1e-6, atol=0)
    x[2, 7] = float("nan")
    assert torch.isnan(cross_entropy(x, y))


def test_triton_cross_entropy_strided_labels_and_weights():
    """The kernel reads label and weight `row` at base + row: the launcher must make them contiguous."""
    from tlkernels.triton.cross_entropy import cross_entropy_forward
    x = torch.randn(6, 9)
    y = torch.tensor([[3, 0], [1, 0], [8, 0], [0, 0], [5, 0], [2, 0]])[:, 0]  # stride 2
    w = torch.rand(6, 2)[:, 1]
    assert y.stride(0) == 2 and w.stride(0) == 2
    loss, grad = cross_entropy_forward(x, y, w, -100, 1, 1.0, True)
    xr = x.clone().requires_grad_()
    ref = cross_entropy_reference(xr, y.contiguous(), w.contiguous(), -100, "mean", 1.0)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, xr)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_cross_entropy_leading_neg_inf_logits(dtype):
    """The online log-sum-exp starts at -inf: a leading -inf logit must not make exp(-inf - -inf) = NaN."""
    from tlkernels.triton.cross_entropy import cross_entropy_forward
    x = torch.tensor([[-float("inf")] * 20 + [1.0, 2.0, 0.5], [0.0] * 23], dtype=dtype)
    y = torch.tensor([21, 4])
    loss, grad = cross_entropy_forward(x, y, None, -100, 0, 1.0, True)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction="none"))
    assert torch.isfinite(grad).all() and (grad[0, :20] == 0).all()


def test_adamw_puts_no_decoupled_weight_decay_on_l2sp_tensors():
    """With l2sp=, AdamW's weight decay applies only to the tensors L2-SP does not penalise."""
    import copy
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    a, b = copy.deepcopy(base).double(), copy.deepcopy(base).double()
    l2 = L2SP(a, alpha=0.1, beta=0.01, head="2")  # conv weight -> w0, head weight -> 0, biases free
    w0 = a[0].weight.detach().clone()
    oa = AdamW(a.parameters(), lr=0.01, weight_decay=0.1, l2sp=l2)
    ob = torch.optim.AdamW([{"params": [b[0].weight, b[2].weight], "weight_decay": 0.0},
                            {"params": [b[0].bias, b[2].bias], "weight_decay": 0.1}], lr=0.01)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    for _ in range(3):
        oa.zero_grad()
        ob.zero_grad()
        a(x).square().mean().backward()
        (b(x).square().mean() + 0.05 * (b[0].weight - w0).square().sum() + 0.005 * b[2].weight.square().sum()).backward()
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


# ----------------------------------------------------------------------------- L2-SP-Fisher
def _fisher_setup(dtype=torch.float64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).to(dtype)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fisher = {"0.weight": torch.rand_like(net[0].weight) * 3}
    return net, start, fisher


def test_l2sp_fisher_penalty_and_gradient_equal_the_formula():
    from tlkernels.nn import L2SP
    net, start, fisher = _fisher_setup()
    reg = L2SP(net, reference=start, alpha=0.1, beta=0.01, head="2", fisher=fisher)
    w, w0 = net[0].weight, start["0.weight"]
    want = 0.05 * (fisher["0.weight"] * (w - w0) ** 2).sum() + 0.005 * net[2].weight.square().sum()
    got = reg()
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, [w, net[2].weight])
    g_want = torch.autograd.grad(want, [w, net[2].weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(reg.value(), want.detach())
    # the state_dict carries the weights (resume) and loads back
    other = L2SP(net, reference=start, alpha=0.1, beta=0.01, head="2")
    other.load_state_dict(reg.state_dict())
    torch.testing.assert_close(other(), want)


@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
@pytest.mark.parametrize("maximize", [False, True])
def test_l2sp_fisher_in_the_optimizer_step_equals_torch_optim_on_the_formula(opt_name, maximize):
    """Our fused step with a Fisher-weighted L2-SP == torch.optim on loss (+/-) the plain formula."""
    import copy
    from tlkernels import optim
    from tlkernels.nn import L2SP
    net, start, fisher = _fisher_setup()
    ref_net = copy.deepcopy(net)
    reg = L2SP(net, reference=start, alpha=0.1, beta=0.01, head="2", fisher=fisher)
    kw = dict(lr=0.05, momentum=0.9) if opt_name == "SGD" else dict(lr=0.01, weight_decay=0.05)
    ours = getattr(optim, opt_name)(net.parameters(), maximize=maximize, l2sp=reg, **kw)
    if opt_name == "AdamW":  # no decoupled weight decay on the penalised tensors, as ours
        pen = [ref_net[0].weight, ref_net[2].weight]
        rest = [p for p in ref_net.parameters() if all(p is not q for q in pen)]
        theirs = torch.optim.AdamW([dict(params=pen, weight_decay=0.0), dict(params=rest)], maximize=maximize, **kw)
    else:
        theirs = torch.optim.SGD(ref_net.parameters(), maximize=maximize, **kw)
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    for _ in range(3):
        for model, opt in ((net, ours), (ref_net, theirs)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if model is ref_net:
                w = model[0].weight
                penalty = 0.05 * (fisher["0.weight"] * (w - start["0.weight"]) ** 2).sum() \
                    + 0.005 * model[2].weight.square().sum()
                loss = loss - penalty if maximize else loss + penalty  # the penalty is always minimised
            loss.backward()
            opt.step()
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b)


def _weighted_lists(dtype):
    """Params (one channels_last, one long enough for several chunks, SIMD bodies and a scalar tail), refs, and
    Fisher weights on all but one of them (None: weight 1), the channels_last param's weights contiguous."""
    torch.manual_seed(1)
    shapes = [(7, 3, 3, 3), (200_003,), (5, 4), (33,)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    params[0] = params[0].contiguous(memory_format=torch.channels_last)
    params = [p.requires_grad_() for p in params]
    refs = [p.detach() + 0.1 * torch.randn_like(p) for p in params]
    weights = [torch.rand(s, dtype=dtype) * 3 for s in shapes]
    weights[2] = None
    return params, refs, weights


def _weighted_formula(params, refs, weights, alpha, new, beta):
    """The L2-SP-Fisher penalty and its gradients, written out in float64 with autograd."""
    ps = [p.detach().double().requires_grad_() for p in params + new]
    total = sum(0.5 * alpha * ((1.0 if w is None else w.double()) * (p - r.double()) ** 2).sum()
                for p, r, w in zip(ps, refs, weights))
    total = total + sum(0.5 * beta * (q ** 2).sum() for q in ps[len(params):])
    return total.detach(), torch.autograd.grad(total, ps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_l2sp_fisher_weights_in_the_fused_ops_equal_the_formula(dtype):
    """Per-element weights inside the fused multi-tensor pass: penalty, its backward, value_and_grad (fresh and
    accumulated into .grad), each against the formula (float32 runs the SIMD path with weights)."""
    params, refs, weights = _weighted_lists(dtype)
    new = [torch.randn(3, 2, dtype=dtype, requires_grad=True)]
    want, gwant = _weighted_formula(params, refs, weights, 0.3, new, 0.02)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    v = l2sp_penalty(params, refs, 0.3, new, 0.02, weights=weights)
    torch.testing.assert_close(v.double(), want, **tol)
    v.backward()
    for t, g in zip(params + new, gwant):
        torch.testing.assert_close(t.grad.double(), g, **tol)
    v2, gp, gn = l2sp_value_and_grad(params, refs, 0.3, new, 0.02, weights=weights)
    torch.testing.assert_close(v2, v)
    for a, b in zip(gp + gn, [t.grad for t in params + new]):
        torch.testing.assert_close(a, b)
    assert gp[0].stride() == params[0].stride()  # gradients in their tensors' layout (channels_last here)
    for t in params + new:
        t.grad = torch.ones_like(t)
    v3, acc, _ = l2sp_value_and_grad(params, refs, 0.3, new, 0.02, accumulate=True, weights=weights)
    torch.testing.assert_close(v3, v)
    for a, g in zip(acc, gwant):
        torch.testing.assert_close(a.double(), g + 1, **tol)
    # the weights change the result (a test that would pass with the weights ignored would not be one)
    plain = l2sp_penalty(params, refs, 0.3, new, 0.02)
    assert abs(plain.item() - v.item()) > 1e-2 * abs(v.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_steps_with_weights_equal_their_references(dtype):
    """sgd_l2sp_step_ / adamw_l2sp_step_ (amsgrad: a third state list) with per-element weights (channels_last
    param, contiguous weights; a param without weights; a head without reference) against the pure-PyTorch step
    oracles."""
    from tlkernels.ops.optim_step import adamw_l2sp_step_reference, sgd_l2sp_step_reference
    params, refs, weights = _weighted_lists(dtype)
    params = [p.detach() for p in params[:3]] + [torch.randn(6, dtype=dtype)]
    refs, weights = refs[:3] + [None], weights[:3] + [torch.rand(6, dtype=dtype)]
    grads = [torch.randn_like(p) for p in params]
    coeffs = [0.2, 0.2, 0.2, 0.05]
    for name, ref_step, states, hyper in (
            ("sgd_l2sp_step_", sgd_l2sp_step_reference, 1, (0.1, 0.9, 0.0, 0.01, True, False, False)),
            ("adamw_l2sp_step_", adamw_l2sp_step_reference, 3, (0.01, 0.9, 0.99, 1e-8, 0.01, 3, True))):
        a = [p.clone() for p in params]
        b = [p.clone() for p in params]
        sa = [[torch.rand_like(p) for p in params] for _ in range(states)]
        sb = [[t.clone() for t in s] for s in sa]
        getattr(torch.ops.tlkernels, name)(a, grads, *sa, refs, weights, coeffs, *hyper)
        ref_step(b, grads, *sb, refs, weights, coeffs, *hyper)
        for x, y in zip(a + sum(sa, []), b + sum(sb, [])):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        unweighted = [p.clone() for p in params]
        getattr(torch.ops.tlkernels, name)(unweighted, grads, *[[t.clone() for t in s] for s in sb], refs, [],
                                           coeffs, *hyper)
        assert not torch.equal(unweighted[0], a[0])  # the weights take part


def test_l2sp_fisher_runs_in_one_fused_call():
    """L2SP with Fisher weights calls the fused penalty op once and nothing per tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.called = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.called.append(str(func))
            return func(*args, **(kwargs or {}))

    net, start, fisher = _fisher_setup(torch.float32)
    reg = L2SP(net, reference=start, alpha=0.1, beta=0.01, head="2", fisher=fisher)
    with torch.no_grad(), Ops() as mode:
        reg()
    # (detach: a view, no work; _l2sp_check: the argument checks alone, no output)
    computed = [f for f in mode.called if f not in ("aten.detach.default", "tlkernels._l2sp_check.default")]
    assert computed == ["tlkernels.l2sp_penalty.default"], mode.called


def test_l2sp_weights_bad_inputs():
    p, r = [torch.randn(3), torch.randn(4)], [torch.randn(3), torch.randn(4)]
    with pytest.raises(ValueError, match=r"l2sp_penalty: weights must have one entry per param \(2\), got 1"):
        l2sp_penalty(p, r, weights=[torch.ones(3)])
    with pytest.raises(ValueError, match=r"l2sp_penalty: weights\[1\] must have the shape of params\[1\] \(4,\), "
                                         r"got \(3,\)"):
        l2sp_penalty(p, r, weights=[None, torch.ones(3)])
    with pytest.raises(TypeError, match=r"l2sp_value_and_grad: weights\[0\] must have the dtype of params\[0\]"):
        l2sp_value_and_grad(p, r, weights=[torch.ones(3, dtype=torch.float64), None])
    with pytest.raises(ValueError, match=r"l2sp_penalty: weights must have one entry per param \(2\), got 1 \(an "
                                         r"empty list: no weights\)"):
        torch.ops.tlkernels.l2sp_penalty(p, r, [None], 0.1, [], 0.0)
    with pytest.raises(ValueError, match=r"sgd_l2sp_step_: weights\[0\] must have the shape of params\[0\]"):
        torch.ops.tlkernels.sgd_l2sp_step_(p, [torch.randn(3), torch.randn(4)], [], [None, None],
                                           [torch.ones(4), None], [0.1, 0.1], 0.1, 0.0, 0.0, 0.0, False, False, False)


def test_estimate_fisher_equals_per_sample_gradients_from_torch_func():
    from tlkernels.nn import estimate_fisher
    net, _, _ = _fisher_setup()
    x, y = torch.randn(7, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (7,))
    got = estimate_fisher(net, [(x[:4], y[:4]), (x[4:], y[4:])])
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(net, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for n in params:
        torch.testing.assert_close(got[n], per_sample[n].square().mean(0))
    assert net.training  # the mode is restored
    two = estimate_fisher(net, [(x, y)], max_samples=2, names={"0.weight"})
    assert set(two) == {"0.weight"}
    torch.testing.assert_close(two["0.weight"], per_sample["0.weight"][:2].square().mean(0))


def test_l2sp_fisher_bad_inputs():
    from tlkernels.nn import L2SP
    net, start, fisher = _fisher_setup()
    with pytest.raises(ValueError, match=r"L2SP: fisher\['2.weight'\]: not a tensor this penalty pulls toward"):
        L2SP(net, reference=start, head="2", fisher={"2.weight": torch.ones(5, 144, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"L2SP: fisher\['0.weight'\] must be a tensor of the parameter's shape"):
        L2SP(net, reference=start, head="2", fisher={"0.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"must hold finite values >= 0"):
        L2SP(net, reference=start, head="2", fisher={"0.weight": -fisher["0.weight"]})
    with pytest.raises(TypeError, match="L2SP: fisher must be a dict"):
        L2SP(net, reference=start, head="2", fisher=[1, 2])


def _optimizer_info_cases():
    """(class name, kwargs, description) of PyTorch's own OptimizerInfo inputs for SGD and AdamW."""
    from torch.testing._internal.common_optimizers import optim_db
    return [(info.optim_cls.__name__, oi.kwargs, oi.desc) for info in optim_db
            if info.optim_cls.__name__ in ("SGD", "AdamW") for oi in info.optim_inputs_func(device="cpu")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_l2sp", [False, True])
@pytest.mark.parametrize("name,kwargs,desc", _optimizer_info_cases(), ids=[f"{n}-{d}" for n, _, d in _optimizer_info_cases()])
def test_optimizers_are_drop_ins_on_pytorchs_optimizer_info_inputs(name, kwargs, desc, dtype, with_l2sp):
    """tlkernels.optim.SGD / AdamW with the kwargs of torch's OptimizerInfo (amsgrad, tensor lr, nesterov,
    maximize included) follow torch.optim's trajectory; with L2-SP, torch.optim on loss + the penalty's formula
    (AdamW: no decoupled weight decay on the penalised tensors, as ours)."""
    import copy
    from tlkernels import optim
    from tlkernels.nn import L2SP
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).to(dtype)
    ref_net, start = copy.deepcopy(net), {k: v.clone() for k, v in net.state_dict().items()}
    kw = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    reg = L2SP(net, alpha=0.1, beta=0.01, head="2") if with_l2sp else None
    ours = getattr(optim, name)(net.parameters(), l2sp=reg, **kw)
    if with_l2sp and name == "AdamW":
        pen = [ref_net[0].weight, ref_net[2].weight]
        rest = [p for p in ref_net.parameters() if all(p is not q for q in pen)]
        theirs = torch.optim.AdamW([dict(params=pen, weight_decay=0.0), dict(params=rest)], **kwargs)
    else:
        theirs = getattr(torch.optim, name)(ref_net.parameters(), **kwargs)
    x, y = torch.randn(6, 3, 8, 8, dtype=dtype), torch.randint(0, 5, (6,))
    for _ in range(4):
        for model, opt in ((net, ours), (ref_net, theirs)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if model is ref_net and with_l2sp:
                penalty = 0.05 * (model[0].weight - start["0.weight"]).square().sum() \
                    + 0.005 * model[2].weight.square().sum()
                loss = loss - penalty if kwargs.get("maximize") else loss + penalty  # (always minimised)
            loss.backward()
            opt.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, **tol)

