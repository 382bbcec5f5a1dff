"""Verify tlkernels on this machine: every public op (forward and backward) and the methods' fast paths, on a
device, through the normal dispatch, against the float64 references.

    python -m tlkernels.selfcheck [--device auto|cpu|cuda|cuda:N] [--quick] [--bench] [--json PATH]

Each check compares an op's result in a dtype with the float64 reference and passes when
    error <= max(2 x the reference's own error in that dtype, the dtype's floor)
(flash-attention's budget: the reference computed in bfloat16 has some error; ours may have at most twice it).
Cases cover tile edges, stride 2, groups, channels_last, non-contiguous labels and weights, empty batches,
float32 with TF32 off and on (CUDA), every strategy of the gated convolution, a second GPU when present and, with
the memory for it, a tensor above 2^31 elements. `--bench` adds speed ratios against the plain PyTorch way on
that device (CUDA events on a GPU). Prints one table and exits non-zero when any check fails.
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tlkernels import config

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}
TF32_BUDGET = 5e-2  # TF32 keeps 10 mantissa bits, as float16: ten times float16's floor


class Report:
    """The checks' results: one row (op, case, max error, budget, ok) per comparison."""
    def __init__(self):
        self.rows = []

    def add(self, op, case, err, budget):
        """Record one comparison; ok when err <= budget (NaN fails)."""
        ok = bool(err <= budget) and err == err  # (NaN fails)
        self.rows.append(dict(op=op, case=case, error=float(err), budget=float(budget), ok=ok))

    def compare(self, op, case, got, want64, ref_lowp=None, dtype=None):
        """got vs the float64 reference; budget 2 x the low-precision reference's error (or the floor)."""
        for i, (g, w) in enumerate(zip(_as_list(got), _as_list(want64))):
            if g is None or w is None:
                continue
            err = _maxerr(g, w)
            ref_err = _maxerr(_as_list(ref_lowp)[i], w) if ref_lowp is not None else 0.0
            floor = FLOOR.get(dtype or g.dtype, 1e-4) * max(1.0, float(w.abs().max()) if w.numel() else 1.0)
            self.add(op, case + (f" [out {i}]" if len(_as_list(got)) > 1 else ""), err, max(2 * ref_err, floor))


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _maxerr(a, b):
    if a is None or b is None or a.numel() == 0:
        return 0.0
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


# ----------------------------------------------------------------------------- checks
def _grads(fn, tensors, seed=0):
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    gy = (torch.ones(()) if out.dim() == 0 else
          torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(out)
    out.backward(gy)
    return [out.detach()] + [None if t is None or not t.is_floating_point() else t.grad for t in leaves]


def check_gated_conv2d(rep, device, dtypes, quick):
    """gated_conv2d forward and every gradient against the float64 reference, each strategy and dtype."""
    from tlkernels.ops import gated_conv2d, gated_conv2d_reference
    shapes = [  # (N, C_in, H, C_out, k, stride, padding, dilation, groups, channels_last)
        (3, 8, 9, 17, 3, 1, 1, 1, 1, False), (2, 8, 10, 16, 3, 2, 1, 1, 1, True), (2, 8, 9, 8, 3, 1, 2, 2, 2, False),
        (4, 16, 7, 32, 1, 1, 0, 1, 1, False), (0, 4, 6, 5, 3, 1, 1, 1, 1, False)]
    if quick:
        shapes = shapes[:2] + shapes[-1:]
    strategies = ["auto", "routed", "concat", "blended"] + ([] if quick else ["grouped", "mix", "brgemm", "bmm", "twoconv", "heuristic"])
    if device.type == "cuda" and _triton_available():
        strategies.append("triton")
    for st in strategies:
        with config.override(gated_conv=st):
            for n, cin, h, cout, k, s, p, d, g, cl in shapes:
                for gate_kind in ("image", "filter"):
                    gen = torch.Generator().manual_seed(n + cin + h)
                    x = torch.randn(n, cin, h, h, generator=gen, dtype=torch.float64)
                    wp = torch.randn(cout, cin // g, k, k, generator=gen, dtype=torch.float64) * 0.3
                    wf = torch.randn(cout, cin // g, k, k, generator=gen, dtype=torch.float64) * 0.3
                    gate = torch.rand((n,) if gate_kind == "image" else (n, cout), generator=gen, dtype=torch.float64)
                    bp, bf = torch.randn(cout, generator=gen, dtype=torch.float64), torch.randn(cout, dtype=torch.float64)
                    hard = gate_kind == "image"
                    args = [x, wp, wf, gate, bp, bf]
                    kw = dict(stride=s, padding=p, dilation=d, groups=g, hard=hard)
                    want = _grads(lambda *a: gated_conv2d_reference(*a, **kw), args)
                    for dt in dtypes:
                        ts = [t.to(device=device, dtype=dt) for t in args]
                        if cl:
                            ts[0] = ts[0].contiguous(memory_format=torch.channels_last)
                        case = f"{st} {gate_kind} N={n} {cin}->{cout} {h}x{h} k{k} s{s} d{d} g{g}" + \
                               (" channels_last" if cl else "") + f" {str(dt)[6:]}"
                        got = _grads(lambda *a: gated_conv2d(*a, **kw), ts)
                        low = None if dt == torch.float64 else _grads(lambda *a: gated_conv2d_reference(*a, **kw), ts)
                        rep.compare("gated_conv2d", case, got, want, low, dt)


def _triton_available():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def check_cross_entropy(rep, device, dtypes, quick):
    """cross_entropy / joint_cross_entropy (strided labels, weights, smoothing) against the reference."""
    from tlkernels.ops import cross_entropy, joint_cross_entropy
    gen = torch.Generator().manual_seed(1)
    cases = [((37, 1000), dict()), ((16, 33), dict(label_smoothing=0.1)), ((4, 7, 5), dict(reduction="sum")),
             ((8, 10), dict(weight="w", reduction="none")), ((0, 5), dict(reduction="sum"))]
    for shape, kw in cases:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        C = shape[1]
        y = torch.randint(0, C, (shape[0],) + shape[2:], generator=gen)
        if y.numel() > 2:
            y.view(-1)[1] = -100
        yy = torch.stack([y, y], -1)[..., 0]  # non-contiguous labels (a strided view)
        if kw.get("weight") == "w":
            kw = dict(kw, weight=torch.rand(C, generator=gen, dtype=torch.float64) + 0.1)
        want = _grads(lambda a: F.cross_entropy(a, y, **kw), [x])
        for dt in dtypes:
            kwd = {k: (v.to(device=device, dtype=dt) if torch.is_tensor(v) else v) for k, v in kw.items()}
            got = _grads(lambda a: cross_entropy(a, yy.to(device), **kwd), [x.to(device=device, dtype=dt)])
            low = None if dt == torch.float64 else _grads(lambda a: F.cross_entropy(a.float(), y.to(device), **{
                k: (v.float() if torch.is_tensor(v) else v) for k, v in kwd.items()}).to(dt), [x.to(device=device, dtype=dt)])
            rep.compare("cross_entropy", f"{tuple(shape)} {sorted(kw)} {str(dt)[6:]}", got, want, low, dt)
    xt, xs = torch.randn(64, 10, dtype=torch.float64), torch.randn(32, 100, dtype=torch.float64)
    yt, ys = torch.randint(0, 10, (64,)), torch.randint(0, 100, (32,))
    want = _grads(lambda a, b: 0.7 * F.cross_entropy(a, yt) + 0.3 * F.cross_entropy(b, ys), [xt, xs])
    for dt in dtypes:
        got = _grads(lambda a, b: joint_cross_entropy(a, yt.to(device), b, ys.to(device), source_weight=0.3,
                                                      target_weight=0.7), [xt.to(device, dt), xs.to(device, dt)])
        rep.compare("joint_cross_entropy", f"64x10 + 32x100 {str(dt)[6:]}", got, want, None, dt)


def check_l2sp(rep, device, dtypes, quick):
    """The L2-SP penalty and its gradient against the float64 reference."""
    from tlkernels.ops import l2sp_penalty, l2sp_penalty_reference, l2sp_value_and_grad
    gen = torch.Generator().manual_seed(2)
    shapes = [(64, 3, 7, 7), (1000,), (3,), (65537,)]
    # (the CUDA kernels also for half and bfloat16 tensors: their arithmetic in float)
    for dt in [d for d in dtypes if d in (torch.float64, torch.float32) or device.type == "cuda"]:
        ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        rs = [p + 0.01 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        q = [torch.randn(10, 5, generator=gen, dtype=torch.float64)]
        want = _grads(lambda *a: l2sp_penalty_reference(list(a[:4]), rs, 0.1, [a[4]], 0.01), ps + q)
        dev = [t.to(device, dt) for t in ps + q]
        if len(dev[0].shape) == 4:
            dev[0] = dev[0].contiguous(memory_format=torch.channels_last)
        got = _grads(lambda *a: l2sp_penalty(list(a[:4]), [r.to(device, dt) for r in rs], 0.1, [a[4]], 0.01), dev)
        rep.compare("l2sp_penalty", f"4 tensors + head, channels_last {str(dt)[6:]}", got, want, None, dt)
        leaves = [t.detach().clone().requires_grad_() for t in dev]
        for t in leaves:
            t.grad = torch.ones_like(t)
        v, gp, gn = l2sp_value_and_grad(leaves[:4], [r.to(device, dt) for r in rs], 0.1, leaves[4:], 0.01,
                                        accumulate=True)
        rep.compare("l2sp_value_and_grad", f"accumulate into .grad {str(dt)[6:]}", [v] + gp + gn,
                    [want[0]] + [g + 1 for g in want[1:]], None, dt)
        # L2-SP-Fisher: per-element weights on two of the four tensors, in the same fused pass
        ws = [torch.rand(ps[0].shape, generator=gen, dtype=torch.float64), None, None,
              torch.rand(ps[3].shape, generator=gen, dtype=torch.float64)]
        want = _grads(lambda *a: l2sp_penalty_reference(list(a[:4]), rs, 0.1, [a[4]], 0.01, weights=ws), ps + q)
        wdev = [None if w is None else w.to(device, dt) for w in ws]
        wdev[0] = wdev[0].contiguous(memory_format=torch.channels_last) if dev[0].dim() == 4 else wdev[0]
        got = _grads(lambda *a: l2sp_penalty(list(a[:4]), [r.to(device, dt) for r in rs], 0.1, [a[4]], 0.01,
                                             weights=wdev), dev)
        rep.compare("l2sp_penalty", f"Fisher-weighted {str(dt)[6:]}", got, want, None, dt)
        check_optimizer(rep, device, dt)
    if device.type == "cuda":
        check_l2sp_many(rep, device)


def check_l2sp_many(rep, device):
    """A tensor list longer than one multi-tensor launch holds (48 tensors, 320 chunks of 65536): the penalty and
    its gradient split over several launches."""
    from tlkernels.ops import l2sp_penalty, l2sp_penalty_reference
    gen = torch.Generator().manual_seed(6)
    ps = [torch.randn(6 * 65536 - 7 * i, generator=gen, dtype=torch.float64) for i in range(60)]  # 360 chunks
    rs = [p + 0.01 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
    want = _grads(lambda *a: l2sp_penalty_reference(list(a), rs, 0.1, [], 0.0), ps)
    for dt in (torch.float64, torch.float32):
        got = _grads(lambda *a: l2sp_penalty(list(a), [r.to(device, dt) for r in rs], 0.1, [], 0.0),
                     [p.to(device, dt) for p in ps])
        rep.compare("l2sp_penalty", f"60 tensors, 360 chunks (several launches) {str(dt)[6:]}", got, want, None, dt)


def check_optimizer(rep, device, dt):
    """The fused SGD/AdamW steps with L2-SP (plain and Fisher-weighted on the conv) against torch.optim plus the
    penalty's gradient."""
    import copy

    from tlkernels.nn import L2SP
    from tlkernels.optim import SGD, AdamW
    for name, ours, theirs, kw in (("SGD", SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                   ("AdamW", AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.0))):
        for fisher in (False, True):
            torch.manual_seed(0)
            base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.Flatten(),
                                       torch.nn.LazyLinear(4))
            base(torch.randn(1, 3, 8, 8))
            a, b = copy.deepcopy(base).to(device, dt), copy.deepcopy(base).to(device, torch.float64)
            f = torch.rand(base[0].weight.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            ra = L2SP(a, alpha=0.1, beta=0.0, fisher={"0.weight": f.to(device, dt)} if fisher else None)
            w0 = [p.detach().clone() for p in b.parameters()]
            weight = [f.to(device) if fisher else 1.0] + [1.0] * (len(w0) - 1)
            oa, ob = ours(a.parameters(), l2sp=ra, **kw), theirs(b.parameters(), **kw)
            x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            for _ in range(3):
                oa.zero_grad()
                ob.zero_grad()
                a(x.to(device, dt)).square().mean().backward()
                lb = b(x.to(device)).square().mean()
                # alpha/2 sum F (w - w0)^2 on the conv and linear weights (L2SP's default scope, "kernels")
                lb = lb + sum(0.05 * (w * (p - p0).square()).sum()
                              for p, p0, w in zip(b.parameters(), w0, weight) if p.dim() > 1)
                lb.backward()
                oa.step()
                ob.step()
            rep.compare(f"optim.{name}(l2sp=)", f"3 steps vs torch.optim.{name} + {'Fisher ' if fisher else ''}"
                        f"penalty {str(dt)[6:]}", [p.detach() for p in a.parameters()],
                        [p.detach() for p in b.parameters()], None, torch.float32 if dt == torch.float32 else dt)


def check_histogram_knn(rep, device, quick):
    """filterbank_histogram and knn_search against their references."""
    from tlkernels.filters import gabor_bank
    from tlkernels.ops import filterbank_histogram, filterbank_histogram_reference, knn_search, knn_search_reference
    gen = torch.Generator().manual_seed(4)
    bank = gabor_bank(scales=1, orientations=4, size=7, in_channels=3)
    s = bank.stages[0]
    for n, size, stride in ((5, 33, 1), (0, 16, 1), (3, 40, 2)):
        imgs = torch.rand(n, 3, size, size, generator=gen)
        e = torch.linspace(-1.5, 1.5, 17).repeat(s["weight"].shape[0], 1)
        want = filterbank_histogram_reference(imgs.double(), s["weight"].double(), e.double(), stride, s["padding"])
        got = filterbank_histogram(imgs.to(device), s["weight"].to(device), e.to(device), stride, s["padding"])
        # a pixel whose response lies within rounding of an edge may change bin: at most 1 in 1000 of the mass
        rep.add("filterbank_histogram", f"N={n} {size}x{size} stride {stride}",
                float((got.cpu().double() - want).abs().sum(-1).max()) / 2 if n else 0.0, 1e-3)
    q = torch.softmax(torch.randn(20, 64, generator=gen), 1)
    db = torch.softmax(torch.randn(3000, 64, generator=gen), 1)
    for metric in ("skl", "kl", "l2", "ip"):
        for dt in (torch.float64, torch.float32):
            d, i = knn_search(q.to(device, dt), db.to(device, dt), 10, metric, chunk_size=1000)
            dr, ir = knn_search_reference(q, db, 10, metric)
            rep.add("knn_search", f"{metric} 20 x 3000 x 64 k=10 {str(dt)[6:]} (neighbours differing)",
                    float((i.cpu() != ir).float().mean()) if dt == torch.float64 else 0.0, 0.0)
            rep.compare("knn_search", f"{metric} distances {str(dt)[6:]}", d, dr, None, dt)
    # a database in host memory (a numpy array, as a memory map): on a GPU its chunks go through pinned buffers
    d, i = knn_search(q.to(device, torch.float64), db.double().numpy(), 10, "skl", chunk_size=700)
    dr, ir = knn_search_reference(q, db, 10, "skl")
    rep.add("knn_search", "skl 20 x 3000 x 64 k=10, database a host numpy array in chunks (neighbours differing)",
            float((i.cpu() != ir).float().mean()), 0.0)
    # descriptors as exact counts (tlkernels.store): uint16 and uint32 counts staged and decoded on the device
    import numpy as np
    from tlkernels import store
    draws = torch.multinomial(db, 50, replacement=True, generator=gen)
    hist = torch.zeros(db.shape[0], 64, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    for wide in (False, True):
        p = 70000 if wide else 1000  # responses per histogram: each row's counts sum to p
        counts = (hist * (p // 50)).numpy()
        desc = store.in_memory(counts.astype(np.uint32 if wide else np.uint16),
                               np.full((db.shape[0], 1), p, np.uint32), [(0, 64)])
        full = desc.tensor(torch.float64)
        d, i = knn_search(q.to(device, torch.float64), desc, 10, "skl", chunk_size=700)
        dr, ir = knn_search_reference(q, full, 10, "skl")
        rep.add("knn_search", f"skl 20 x 3000 x 64 k=10, database {'uint32' if wide else 'uint16'} counts "
                f"(tlkernels.store) decoded on the device (neighbours differing)",
                float((i.cpu() != ir).float().mean()), 0.0)


def check_methods(rep, device, quick):
    """SpotTune routed eval and AdaFilter folded eval against their blended computations."""
    import torchvision
    from tlkernels.methods import AdaFilter, SpotTune
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, device=device)
    st = SpotTune(torchvision.models.resnet18(num_classes=5)).to(device).eval()
    with torch.no_grad():
        routed = st(x)
        st.route_eval = False
        blended = st(x)
    rep.compare("SpotTune eval", "routed vs both copies blended, resnet18 32x32", routed, blended.double(), None,
                torch.float32)
    ada = AdaFilter(torchvision.models.resnet18(num_classes=5), hidden_size=16).to(device).eval()
    with torch.no_grad():
        for h in ada.controller.heads:
            h.weight.normal_(0, 1.0)
            h.bias.zero_()
        folded = ada(x)
        ada.set_fused(False)
        two = ada(x)
    rep.compare("AdaFilter eval", "folded BN + gated conv vs two branches, resnet18 32x32", folded, two.double(), None,
                torch.float32)


def check_devices(rep, device):
    """A tensor on a second GPU (not the current device) and one above 2^31 elements, where the GPU allows."""
    from tlkernels.ops import cross_entropy
    if device.type != "cuda":
        return
    if torch.cuda.device_count() > 1:
        other = torch.device("cuda", (device.index or 0) + 1 if (device.index or 0) + 1 < torch.cuda.device_count() else 0)
        x = torch.randn(64, 100, device=other)
        y = torch.randint(0, 100, (64,), device=other)
        rep.compare("cross_entropy", f"tensors on {other} (current device {torch.cuda.current_device()})",
                    cross_entropy(x, y), F.cross_entropy(x.double(), y), None, torch.float32)
    free, _ = torch.cuda.mem_get_info(device)
    if free > 24 * 2 ** 30:
        n = 2 ** 31 // 1000 + 1000  # rows x 1000 classes > 2^31 elements
        x = torch.randn(n, 1000, device=device, dtype=torch.bfloat16)
        y = torch.randint(0, 1000, (n,), device=device)
        want = F.cross_entropy(x[-1000:].float(), y[-1000:], reduction="sum")
        got = cross_entropy(x, y, reduction="none")[-1000:].float().sum()
        rep.compare("cross_entropy", f"{n} x 1000 bfloat16 (> 2^31 elements), last rows", got, want.double(), None,
                    torch.bfloat16)


# ----------------------------------------------------------------------------- speed
def _timer(device):
    """Seconds of fn's fastest of `reps` calls on `device`."""
    from tlkernels._timing import call_times_ms
    return lambda fn, reps: min(call_times_ms(fn, reps, warmup=1, device=device)) / 1e3


def bench(device, quick):
    """Speed ratios against the plain PyTorch way on `device` (CUDA events on a GPU)."""
    from tlkernels.ops import cross_entropy, filterbank_histogram, gated_conv2d, knn_search
    from tlkernels.optim import SGD
    from tlkernels.nn import L2SP
    timer, reps, rows = _timer(device), 3 if quick else 10, []
    x = torch.randn(32, 128, 28, 28, device=device)
    wp, wf = torch.randn(128, 128, 3, 3, device=device), torch.randn(128, 128, 3, 3, device=device)
    g = (torch.rand(32, 128, device=device) > 0.5).float()

    def naive_gc():
        return (1 - g[:, :, None, None]) * F.conv2d(x, wp, padding=1) + g[:, :, None, None] * F.conv2d(x, wf, padding=1)
    rows.append(("gated_conv2d 128ch 28x28 hard per-filter", timer(naive_gc, reps),
                 timer(lambda: gated_conv2d(x, wp, wf, g, padding=1, hard=True), reps)))
    # A 1x1 layer with the default choice and each exact strategy forced: on a GPU (where `auto` takes concat
    # for per-filter gates without timing) these rows say whether TLKERNELS_GATED_CONV=bmm pays on that device.
    x1 = torch.randn(32, 256, 14, 14, device=device)
    w1p, w1f = torch.randn(256, 256, 1, 1, device=device), torch.randn(256, 256, 1, 1, device=device)
    g1 = (torch.rand(32, 256, device=device) > 0.5).float()[:, :, None, None]
    naive_1x1 = timer(lambda: (1 - g1) * F.conv2d(x1, w1p) + g1 * F.conv2d(x1, w1f), reps)
    for st in ("auto", "concat", "bmm", "blended"):
        with config.override(gated_conv=st):
            rows.append((f"gated_conv2d 256ch 14x14 1x1 hard per-filter, {st}", naive_1x1,
                         timer(lambda: gated_conv2d(x1, w1p, w1f, g1[:, :, 0, 0], hard=True), reps)))
    lx, ly = torch.randn(256, 1000, device=device, requires_grad=True), torch.randint(0, 1000, (256,), device=device)
    rows.append(("cross_entropy fwd+bwd 256 x 1000", timer(lambda: F.cross_entropy(lx, ly).backward(), reps),
                 timer(lambda: cross_entropy(lx, ly).backward(), reps)))
    import torchvision
    m = torchvision.models.resnet18().to(device)
    ref = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    tsgd = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    osgd = SGD(m.parameters(), lr=0.01, momentum=0.9, l2sp=L2SP(m, alpha=0.1))

    def torch_step():
        with torch.no_grad():
            torch._foreach_add_([p.grad for p in m.parameters()], torch._foreach_sub(list(m.parameters()), ref), alpha=0.1)
        tsgd.step()
    rows.append(("SGD + L2-SP step resnet18", timer(torch_step, reps), timer(osgd.step, reps)))
    imgs = torch.rand(16, 1, 64, 64, device=device)
    filt = torch.randn(8, 1, 7, 7, device=device)
    e = torch.linspace(-3, 3, 33, device=device).repeat(8, 1)

    def naive_hist():
        r = F.conv2d(imgs, filt)
        return torch.stack([torch.stack([torch.histc(r[i, c], 32, -3, 3) for c in range(8)]) for i in range(16)])
    rows.append(("filterbank histogram 16 x 64x64, 8 filters", timer(naive_hist, reps),
                 timer(lambda: filterbank_histogram(imgs, filt, e), reps)))
    q, db = torch.rand(200, 256, device=device), torch.rand(20000, 256, device=device)
    rows.append(("knn ip 200 x 20000 x 256, k=10", timer(lambda: (-(q @ db.t())).topk(10, 1, largest=False), reps),
                 timer(lambda: knn_search(q, db, 10, "ip"), reps)))
    return [dict(case=c, naive_ms=a * 1e3, tlkernels_ms=b * 1e3, ratio=a / b) for c, a, b in rows]


# ----------------------------------------------------------------------------- driver
@contextlib.contextmanager
def tf32_setting(allow):
    """TF32 for float32 matmuls and convolutions on or off, restored afterwards (cuDNN's flags through its
    context manager: assigning them is refused once torch.backends.disable_global_flags() was called)."""
    cudnn = torch.backends.cudnn
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=allow):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def resolve_device(name):
    """torch.device for --device auto|cpu|cuda[:N]; SystemExit when CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"tlkernels.selfcheck: --device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tlkernels.selfcheck: --device cuda but no CUDA device is visible")
    if d.type not in ("cpu", "cuda"):
        raise SystemExit(f"tlkernels.selfcheck: --device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return d


def run(device, quick=False):
    """Every check on `device`; returns the Report."""
    rep = Report()
    dtypes = [torch.float64, torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    # Every check with TF32 off (float32 budgets assume float32 arithmetic), then on CUDA the convolution paths
    # again with TF32 on (PyTorch's default for cuDNN) against a 10-bit format's budget.
    with tf32_setting(False):
        check_gated_conv2d(rep, device, dtypes, quick)
        check_cross_entropy(rep, device, dtypes, quick)
        check_l2sp(rep, device, dtypes, quick)
        check_histogram_knn(rep, device, quick)
        check_methods(rep, device, quick)
        check_devices(rep, device)
    if device.type == "cuda":
        sub = Report()
        with tf32_setting(True):
            check_gated_conv2d(sub, device, [torch.float32], quick)
            check_methods(sub, device, quick)
            check_histogram_knn(sub, device, quick)  # (full float32 inside whatever the process set)
        for r in sub.rows:
            r["budget"] = max(r["budget"], TF32_BUDGET)
            r["ok"] = bool(r["error"] <= r["budget"])
            r["case"] += " TF32"
        rep.rows += sub.rows
    return rep


def context(device):
    """Device name and torch/CUDA/Triton versions and the commit, for --json."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__),
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import tlkernels
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or platform.machine(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=tv, tlkernels=tlkernels.__version__, commit=commit, extension=tlkernels.extension_status())


def main(argv=None):
    """python -m tlkernels.selfcheck: prints the table and exits non-zero on any failure."""
    ap = argparse.ArgumentParser(prog="python -m tlkernels.selfcheck", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and strategies (under 2 minutes on a CPU)")
    ap.add_argument("--bench", action="store_true", help="also measure speed against the plain PyTorch way")
    ap.add_argument("--json", default="", help="write every result, with the device and versions, to this file")
    a = ap.parse_args(argv)
    if a.json:  # before the checks run: a path that cannot be written would lose their results
        from tlkernels._io import unwritable
        why = unwritable(a.json)
        if why:
            ap.error(f"--json {a.json}: {why}")
    device = resolve_device(a.device)
    t0 = time.time()
    rep = run(device, a.quick)
    width = max(len(r["op"]) for r in rep.rows)
    print(f"{'op':<{width}}  {'max error':>10}  {'budget':>10}  pass  case")
    for r in rep.rows:
        print(f"{r['op']:<{width}}  {r['error']:>10.3g}  {r['budget']:>10.3g}  {'ok  ' if r['ok'] else 'FAIL'}  {r['case']}")
    failed = [r for r in rep.rows if not r["ok"]]
    speed = bench(device, a.quick) if a.bench else []
    for s in speed:
        print(f"speed  {s['case']}: naive {s['naive_ms']:.2f} ms, tlkernels {s['tlkernels_ms']:.2f} ms, {s['ratio']:.2f}x")
    print(f"{len(rep.rows) - len(failed)} passed, {len(failed)} failed ({device}, {time.time() - t0:.0f} s)")
    if a.json:
        from tlkernels._io import atomic_write_text
        atomic_write_text(json.dumps(dict(context(device), checks=rep.rows, speed=speed), indent=1), a.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
