"""Every hand-written SIMD path and its portable twin: the same checks run with the CPU's own ISA, with the
`cpu_isa` setting (TLKERNELS_CPU_ISA) at `avx2` and at `scalar`, each against the float64 references."""

import pytest
import torch
import torch.nn.functional as F

from tlkernels.filters import gabor_bank
from tlkernels.ops import (cross_entropy, filterbank_histogram, filterbank_histogram_reference, gated_conv2d,
                           gated_conv2d_reference, knn_search, knn_search_reference, l2sp_penalty_reference,
                           l2sp_value_and_grad)
from tlkernels.ops.optim_step import adamw_l2sp_step_reference, sgd_l2sp_step_reference

from conftest import CPU_AVX2, CPU_AVX512_BF16  # noqa: E402


def errors(settings):
    """Each path's error against its float64 reference under the current cpu_isa."""
    torch.manual_seed(0)
    out = {}
    x = torch.randn(64, 1000, requires_grad=True); y = torch.randint(0, 1000, (64,))   # CE rows: AVX2 exp
    loss = cross_entropy(x, y); loss.backward()
    xr = x.detach().double().requires_grad_(); ref = F.cross_entropy(xr, y); ref.backward()
    out["ce"] = max(abs(loss.item() - ref.item()), (x.grad.double() - xr.grad).abs().max().item())
    p = [torch.randn(70000), torch.randn(33)]; r = [t + 0.1 for t in p]                 # L2-SP passes
    v, gp, _ = l2sp_value_and_grad(p, r, 0.1)
    out["l2sp"] = abs(v.item() - l2sp_penalty_reference(p, r, 0.1).item()) / v.item()
    steps = 0.0
    for op, ref, st, hyper in ((torch.ops.tlkernels.sgd_l2sp_step_, sgd_l2sp_step_reference, 1,
                                (0.1, 0.9, 0.1, 0.01, False, True, False)),
                               (torch.ops.tlkernels.adamw_l2sp_step_, adamw_l2sp_step_reference, 3,
                                (0.01, 0.9, 0.99, 1e-8, 0.01, 2, False))):
        ps = [torch.randn(70001), torch.randn(13)]; gs = [torch.randn_like(t) for t in ps]
        rs = [ps[0] + 0.1, None]; ws = [torch.rand(70001), torch.rand(13)]
        sa = [[torch.rand_like(t) for t in ps] for _ in range(st)]
        a, b = [t.clone() for t in ps], [t.clone() for t in ps]; sb = [[t.clone() for t in x] for x in sa]
        op(a, gs, *sa, rs, ws, [0.2, 0.05], *hyper); ref(b, gs, *sb, rs, ws, [0.2, 0.05], *hyper)
        steps = max(steps, max((x - y).abs().max().item() for x, y in zip(a + sum(sa, []), b + sum(sb, []))))
    out["steps"] = steps
    bank = gabor_bank(scales=1, orientations=4, size=7, in_channels=1); s = bank.stages[0]   # separable + binning
    imgs = torch.rand(3, 1, 40, 40); e = torch.linspace(-1, 1, 33).repeat(s["weight"].shape[0], 1)
    h = filterbank_histogram(imgs, s["weight"], e, s["stride"], s["padding"])
    hr = filterbank_histogram_reference(imgs.double(), s["weight"].double(), e.double(), s["stride"], s["padding"])
    out["hist"] = (h.double() - hr).abs().sum(-1).max().item() / 2
    q = torch.softmax(torch.randn(10, 64), 1); db = torch.softmax(torch.randn(500, 64), 1)   # AVX2 log expansion
    _, i = knn_search(q, db, 5); _, ir = knn_search_reference(q, db, 5)
    out["knn"] = (i != ir).float().mean().item()
    xg, w = torch.randn(4, 16, 7, 7), torch.randn(40, 16, 3, 3)     # small-map engine (40 filters: a partial panel)
    g = torch.rand(4, 40)
    settings(gated_conv="mix")
    yg = gated_conv2d(xg, w, w * 0.5, g, padding=1, hard=True)
    out["gated"] = (yg.double() - gated_conv2d_reference(xg.double(), w.double(), w.double() * 0.5, g.double(),
                                                           padding=1, hard=True)).abs().max().item()
    out["gated_strategy"] = list(torch.ops.tlkernels._gated_conv2d_last_strategies())[0]
    xb, wb, gb = xg.bfloat16(), w.bfloat16(), (g > 0.5).bfloat16()                     # bfloat16 engine
    yb = gated_conv2d(xb, wb, wb * 0.5, gb, padding=1, hard=True)
    exact = gated_conv2d_reference(xb.double(), wb.double(), (wb * 0.5).double(), gb.double(), padding=1, hard=True)
    own = gated_conv2d_reference(xb, wb, wb * 0.5, gb, padding=1, hard=True)  # (its error in bfloat16: the budget)
    out["gated_bf16"] = (yb.double() - exact).abs().max().item() / (2 * (own.double() - exact).abs().max().item())
    out["gated_bf16_strategy"] = list(torch.ops.tlkernels._gated_conv2d_last_strategies())[0]
    return out


@pytest.mark.parametrize("isa", ["native", "avx2", "scalar"])  # (native: AVX-512 where the CPU has it)
def test_every_isa_path_matches_the_references(settings, isa):
    settings(cpu_isa=isa)
    res = errors(settings)
    assert res["ce"] < 1e-4 and res["l2sp"] < 1e-4 and res["hist"] <= 1e-3 and res["knn"] == 0.0, res
    assert res["steps"] < 1e-5, res
    assert res["gated"] < 1e-3, res
    # the forced small-map engine runs only where the AVX2 paths are allowed; capped, another strategy serves
    assert (res["gated_strategy"] == "mix") == (CPU_AVX2 and isa != "scalar"), res
    assert res["gated_bf16"] <= 1.0, res  # err <= 2 x the reference's own bfloat16 error
    # bfloat16 on the small-map engine: AVX-512 BF16 only, so not under an avx2 or scalar cap
    assert (res["gated_bf16_strategy"] == "mix") == (CPU_AVX512_BF16 and isa == "native"), res
