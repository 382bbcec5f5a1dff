import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import TensorDataset

from tlkernels.filters import from_model, gabor_bank
from tlkernels.ops import (KnnIndex, filterbank_histogram, filterbank_histogram_reference, fit_bin_edges,
                           knn_search, knn_search_reference)
from tlkernels.ops._registry import has_op, op
from tlkernels.ops.knn import EPS, _db_side, _query_side
from tlkernels.select import JointDataset, SourceSelector

from conftest import gloo_ranks  # noqa: E402


def _edges(f, nb, lo=-2.0, hi=2.0):
    return torch.linspace(lo, hi, nb + 1).repeat(f, 1)


# ----------------------------------------------------------------------------- histogram op
@pytest.mark.parametrize("n,c,h,w,k,stride,pad", [(3, 3, 17, 13, 5, 1, 2), (1, 1, 9, 9, 3, 2, 0), (2, 3, 20, 20, 11, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_histogram_matches_reference(n, c, h, w, k, stride, pad, dtype):
    x = torch.rand(n, c, h, w) if dtype == torch.float32 else torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8)
    filt = torch.randn(6, c, k, k) * (0.5 if dtype == torch.float32 else 0.01)
    edges = torch.sort(torch.randn(6, 9) * 2, 1).values  # values beyond the ends clamp to the end bins
    out = filterbank_histogram(x, filt, edges, stride, pad)
    ref = filterbank_histogram_reference(x, filt, edges, stride, pad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.sum(-1), torch.ones(n, 6), rtol=0, atol=1e-5)


@pytest.mark.parametrize("isa", ["native", "avx2", "scalar"])
@pytest.mark.parametrize("edges_kind", ["linspace", "near_uniform", "irregular"])
def test_histogram_binning_rules_hold_on_every_path(settings, isa, edges_kind):
    """The binning alone (a 1x1 identity filter: responses are the input, exactly): values on every edge and
    next to it, below the first and above the last edge, +-inf and NaN, binned as torch.bucketize bins them in
    the reference, by each SIMD path (AVX-512: near-uniform edges by an estimate and one compare, other edges
    by table gathers; AVX2; scalar)."""
    settings(cpu_isa=isa)
    g = torch.Generator().manual_seed(1)
    nb = 37
    e = torch.linspace(-1.0, 1.0, nb + 1)
    if edges_kind == "near_uniform":  # each edge within a fifth of a bin of linspace's
        e = e + (torch.rand(nb + 1, generator=g) - 0.5) * 0.4 * (2.0 / nb)
    elif edges_kind == "irregular":
        e = torch.sort(torch.randn(nb + 1, generator=g), 0).values
    near = torch.cat([e, torch.nextafter(e, torch.full_like(e, -3)), torch.nextafter(e, torch.full_like(e, 3))])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -5.0, 5.0, 0.0])
    v = torch.cat([near, special, torch.rand(1000, generator=g) * 3 - 1.5])
    v = v[torch.randperm(v.numel(), generator=g)]
    x = v[: v.numel() // 16 * 16].reshape(1, 1, 16, -1).contiguous()
    filt, edges = torch.ones(1, 1, 1, 1), e.reshape(1, -1)
    out = filterbank_histogram(x, filt, edges, 1, 0)
    ref = filterbank_histogram_reference(x, filt, edges, 1, 0)
    torch.testing.assert_close(out * x.numel(), ref * x.numel(), rtol=0, atol=1e-3)  # counts, exactly


def test_histogram_empty_batch():
    filt = torch.randn(4, 3, 3, 3)
    assert filterbank_histogram(torch.rand(0, 3, 8, 8), filt, _edges(4, 5)).shape == (0, 4, 5)


@pytest.mark.parametrize("narrow,width", [(False, 37), (True, 37), (False, 150)])
def test_histogram_separable_path_for_low_rank_banks(narrow, width):
    """A Gabor bank is exactly rank 1-3 per filter: the CPU kernel runs it as 1-D passes (and bins eight
    values at a time). Same histograms as conv2d + bucketize up to float rounding at bin edges: a handful of
    pixels, each moved by one bin. narrow=True: bins narrower than a lookup cell (the looping binner)."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 45, width)  # widths not multiples of 8 or 16: vector bodies and scalar tails (150: two
    # 64-output blocks too)
    w = gabor_bank().stages[0]["weight"]
    e = torch.linspace(-0.6, 0.6, 41).repeat(48, 1)
    if narrow:
        e[:, 20:23] = torch.tensor([0.0, 1e-6, 2e-6])  # three edges inside one cell of the table
    out = filterbank_histogram(x, w, e, 1, 5)
    ref = filterbank_histogram_reference(x, w, e, 1, 5)
    px = 45 * width
    moved = ((out - ref).abs() * px).round().sum() / 2
    assert moved <= 1e-4 * out.numel() / 40 * px, moved  # at most 1 pixel in 10,000 changes bin
    torch.testing.assert_close(out, ref, rtol=0, atol=2.01 / px)
    torch.testing.assert_close(out.sum(-1), torch.ones(6, 48), rtol=0, atol=1e-5)
    # the separable path reproduces the direct one when the bank is given as full-rank-looking copies
    wp = w.clone()
    wp[:, :, 0, 0] += torch.randn(48, 3) * 1e-3  # no longer low rank: the oneDNN path
    direct = filterbank_histogram(x, wp, e, 1, 5)
    torch.testing.assert_close(direct, filterbank_histogram_reference(x, wp, e, 1, 5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting", ["separable", "direct", "heuristic", "auto"])
def test_histogram_paths_forced_and_measured(settings, setting):
    """TLKERNELS_HISTOGRAM forces the separable or the direct path (separable only where the bank separates),
    takes the fixed rule, or (auto) the path measured on the first images; every path matches the reference."""
    settings(histogram=setting)
    torch.manual_seed(1)
    x = torch.rand(5, 3, 33, 29)
    e = torch.linspace(-0.6, 0.6, 33).repeat(48, 1)
    last = torch.ops.tlkernels._filterbank_histogram_last_path
    low_rank = gabor_bank().stages[0]["weight"]
    full_rank = torch.randn(6, 3, 5, 5) * 0.1
    for w, separable in ((low_rank, True), (full_rank, False)):
        ee = e[: w.shape[0]]
        out = filterbank_histogram(x, w, ee, 1, w.shape[-1] // 2)
        ref = filterbank_histogram_reference(x, w, ee, 1, w.shape[-1] // 2)
        torch.testing.assert_close(out, ref, rtol=0, atol=2.01 / (33 * 29))
        path = last()
        if setting in ("separable", "heuristic"):  # the Gabor bank passes the fixed rule's 60% bound
            assert path == ("separable" if separable else "direct"), (setting, path)
        elif setting == "direct":
            assert path == "direct"
        else:
            assert path in ("separable", "direct") and (separable or path == "direct")
    with pytest.raises(ValueError, match="tlkernels.config: histogram must be one of auto, heuristic, separable, "
                                         "direct, got 'fastest'"):
        settings(histogram="fastest")


def test_histogram_non_finite_bank_takes_the_direct_path():
    """A NaN in a low-rank bank would make its SVD fail: the kernel keeps the direct path, which bins NaN
    responses like the reference does (rows still sum to one)."""
    w = gabor_bank().stages[0]["weight"].clone()
    w[3, :, 5, 5] = float("nan")
    x = torch.rand(2, 3, 20, 20)
    e = torch.linspace(-0.6, 0.6, 11).repeat(48, 1)
    out = filterbank_histogram(x, w, e, 1, 5)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 48), rtol=0, atol=1e-5)
    keep = [f for f in range(48) if f != 3]
    torch.testing.assert_close(out[:, keep], filterbank_histogram_reference(x, w, e, 1, 5)[:, keep], rtol=0, atol=1e-6)


def test_histogram_deterministic():
    x = torch.rand(8, 3, 32, 32)
    bank = gabor_bank()
    e = _edges(48, 100, -1, 1)
    a = filterbank_histogram(x, bank.stages[0]["weight"], e, 1, 5)
    assert torch.equal(a, filterbank_histogram(x, bank.stages[0]["weight"], e, 1, 5))


@pytest.mark.parametrize("nb", [7, 8])
def test_triton_histogram_interpreted(nb):
    from tlkernels.triton.histogram import filterbank_histogram_forward
    x, filt = torch.rand(2, 3, 10, 9), torch.randn(3, 3, 3, 3)
    edges = torch.sort(torch.randn(3, nb + 1), 1).values
    torch.testing.assert_close(filterbank_histogram_forward(x, filt, edges, (1, 1), (1, 1)),
                               filterbank_histogram_reference(x, filt, edges, 1, 1), rtol=0, atol=1e-6)


def test_histogram_memory_is_tile_bounded():
    """64 RGB images of 128x128 through 48 filters: full responses would be 192 MB; the fused op stays small."""
    code = """
import resource, torch, tlkernels, json
from tlkernels.filters import gabor_bank
torch.set_num_threads(2)
w = gabor_bank().stages[0]["weight"]; e = torch.linspace(-1, 1, 101).repeat(48, 1)
tlkernels.ops.filterbank_histogram(torch.rand(1, 3, 16, 16), w, e, 1, 5)
x = torch.rand(64, 3, 128, 128)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tlkernels.ops.filterbank_histogram(x, w, e, 1, 5)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    extra_mb = json.loads(r.stdout.strip().splitlines()[-1])
    assert extra_mb < 40, f"peak extra memory {extra_mb:.1f} MB; full responses would take 192 MB"


@pytest.mark.parametrize("call,msg", [
    (lambda x, f, e: filterbank_histogram(x, f, torch.flip(e, [1])), "filterbank_histogram: edges must be strictly increasing"),
    (lambda x, f, e: filterbank_histogram(x, f[:, :2], e), r"filterbank_histogram: filters must have C = 3 input channels"),
    (lambda x, f, e: filterbank_histogram(x[0], f, e), "filterbank_histogram: images must be 4-D"),
    (lambda x, f, e: filterbank_histogram(x, f, e[:2]), r"filterbank_histogram: edges must have shape \(F, bins \+ 1\)"),
])
def test_histogram_bad_inputs(call, msg):
    x, f = torch.rand(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises((ValueError, TypeError), match=msg):
        call(x, f, _edges(4, 5))


# ----------------------------------------------------------------------------- bins
def test_fit_bin_edges_equal_mass_and_uniform():
    bank = gabor_bank(scales=2, orientations=2, size=7)
    data = [(torch.rand(8, 3, 24, 24), None) for _ in range(3)]
    e = fit_bin_edges(data, bank, bins=10, fine_bins=400)[0]
    assert e.shape == (8, 11) and bool((e[:, 1:] > e[:, :-1]).all())
    mass = sum(filterbank_histogram(x, bank.stages[0]["weight"], e, 1, 3).sum(0) for x, _ in data)
    mass = mass / mass.sum(-1, keepdim=True)
    assert float((mass - 0.1).abs().max()) < 0.02  # equal pixel mass per bin on the target set
    u = fit_bin_edges(data, bank, bins=10, mode="uniform")[0]
    torch.testing.assert_close(u[:, 1:] - u[:, :-1], (u[:, 1:] - u[:, :-1])[:, :1].expand(-1, 10))


# ----------------------------------------------------------------------------- knn
@pytest.mark.parametrize("metric", ["skl", "kl", "l2", "ip"])
def test_knn_matches_brute_force_with_chunks_and_weights(metric):
    q = torch.softmax(torch.randn(9, 24, dtype=torch.float64), 1)
    db = torch.softmax(torch.randn(300, 24, dtype=torch.float64), 1)
    w = torch.rand(4, dtype=torch.float64)  # per channel of 6 bins
    d, i = knn_search(q, db, 11, metric, channel_weights=w, chunk_size=64)
    rd, ri = knn_search_reference(q, db, 11, metric, channel_weights=w)
    assert torch.equal(i, ri)
    torch.testing.assert_close(d, rd)
    assert bool((d[:, 1:] >= d[:, :-1]).all())


def test_knn_ties_k1_kall_empty_single_and_memmap(tmp_path):
    base = torch.softmax(torch.randn(5, 8, dtype=torch.float64), 1)
    db = base.repeat(20, 1)  # every row appears 20 times: ties everywhere
    q = base[:3]
    d, i = knn_search(q, db, 7, chunk_size=16)
    rd, ri = knn_search_reference(q, db, 7)
    assert torch.equal(i, ri)
    assert i[0].tolist() == [0, 5, 10, 15, 20, 25, 30]  # equal distances: lower index first
    d1, i1 = knn_search(q, db, 1)
    assert i1[:, 0].tolist() == [0, 1, 2]
    dall, iall = knn_search(q, db, 100, chunk_size=32)
    assert torch.equal(iall, knn_search_reference(q, db, 100)[1])
    e_d, e_i = knn_search(q[:0], db, 4)
    assert e_d.shape == (0, 4) and e_i.shape == (0, 4)
    s_d, s_i = knn_search(q[:1], db[:1], 1)
    assert s_i.item() == 0
    mm = np.lib.format.open_memmap(str(tmp_path / "db.npy"), mode="w+", dtype=np.float64, shape=tuple(db.shape))
    mm[:] = db.numpy()
    mm.flush()
    ro = np.load(str(tmp_path / "db.npy"), mmap_mode="r")
    assert torch.equal(knn_search(q, ro, 9, chunk_size=13)[1], knn_search_reference(q, db, 9)[1])


@pytest.mark.parametrize("metric", ["skl", "kl", "l2", "ip"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_index_answers_as_knn_search(metric, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(13, 30, generator=g, dtype=dtype), 1)
    db = torch.softmax(torch.randn(257, 30, generator=g, dtype=dtype), 1)
    db[200] = db[7]  # a tie across chunks
    w = torch.rand(3, generator=g, dtype=dtype)
    index = KnnIndex(db, metric, channel_weights=w, chunk_size=64)  # same GEMM blocks: bit-equal answers
    for k in (1, 9, 257):
        d, i = index.search(q, k)
        rd, ri = knn_search(q, db, k, metric, channel_weights=w, chunk_size=64)
        assert torch.equal(i, ri) and torch.equal(d, rd)
    if dtype == torch.float64:
        assert torch.equal(index.search(q, 9)[1], knn_search_reference(q, db, 9, metric, channel_weights=w)[1])


@pytest.mark.skipif(not has_op("knn_select_chunk"), reason="the BLAS choice serves the compiled selection kernel")
@pytest.mark.parametrize("gemm", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_every_chunk_gemm_gives_the_reference_answer(settings, gemm, dtype):
    settings(knn_gemm=gemm)
    g = torch.Generator().manual_seed(3)
    q = torch.softmax(torch.randn(21, 40, generator=g, dtype=torch.float64), 1)
    db = torch.softmax(torch.randn(300, 40, generator=g, dtype=torch.float64), 1)
    db[250] = db[3]  # a tie across chunks
    ri = knn_search_reference(q, db, 12)[1]
    i = knn_search(q.to(dtype), db.to(dtype), 12, chunk_size=128)[1]  # chunks of 128, 128 and a 44-row tail
    if dtype == torch.float64:
        assert torch.equal(i, ri)
    else:  # float32 rounding may swap near ties: the same neighbour sets
        assert (torch.sort(i, 1)[0] == torch.sort(ri, 1)[0]).float().mean() > 0.97
    assert torch.equal(KnnIndex(db.to(dtype), chunk_size=128).search(q.to(dtype), 12)[1], i)


@pytest.mark.skipif(not has_op("knn_select_chunk"), reason="the BLAS choice serves the compiled selection kernel")
def test_knn_auto_gemm_is_measured_once_and_numpy_blas_follows_torch_threads(settings, monkeypatch):
    from threadpoolctl import threadpool_info
    from tlkernels.ops import knn
    seen = []

    def numpy_gemm(A, B, out):  # records the BLAS thread limits numpy's GEMM runs under
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return knn._gemm_numpy(A, B, out)

    monkeypatch.setitem(knn.GEMMS, "numpy", numpy_gemm)
    settings(knn_gemm="auto")
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(4)
    q = torch.rand(17, 37, generator=g, dtype=torch.float64)  # a shape no other test uses: a fresh choice
    db = torch.rand(200, 37, generator=g, dtype=torch.float64)
    B = knn._db_side("skl", db[:64], torch.ones(37, dtype=torch.float64), EPS)[0]
    assert knn.chosen_gemm(q, B) is None
    try:
        torch.set_num_threads(1)
        first = knn_search(q, db, 5, chunk_size=64)
        pick = knn.chosen_gemm(q, B)
        assert pick in knn.GEMMS
        # warm-up + 3 rounds on the sample (then the 4 chunks if numpy won), under a one-thread BLAS limit
        assert len(seen) == 4 + (4 if pick == "numpy" else 0) and all(s == {1} for s in seen)
        again = knn_search(q, db, 5, chunk_size=64)
        assert len(seen) == 4 + (8 if pick == "numpy" else 0)  # measured once: the next search takes the pick
        assert torch.equal(first[1], again[1]) and torch.equal(first[1], knn_search_reference(q, db, 5)[1])
    finally:
        torch.set_num_threads(threads)
    if threads != 1:  # the thread count is part of the signature
        assert knn.chosen_gemm(q, B) is None


def test_knn_gemm_setting_is_checked(settings):
    with pytest.raises(ValueError, match="tlkernels.config: knn_gemm must be one of auto, torch, numpy, got 'mkl'"):
        settings(knn_gemm="mkl")


def test_measured_choice_keeps_the_rule_unless_another_is_clearly_faster():
    import time
    from tlkernels._timing import chosen, measured_choice
    cost = {"a": 0.004, "b": 0.0038, "c": 0.0005}
    calls = []

    def run(c):
        calls.append(c)
        time.sleep(cost[c])

    assert measured_choice(("test", 1), ("a", "b"), "a", run) == "a"  # b is 5% faster: within the noise margin
    assert measured_choice(("test", 2), ("a", "b", "c"), "a", run) == "c"
    assert calls.count("c") == 4 and chosen(("test", 2)) == "c"  # warm-up + 3 rounds
    n = len(calls)
    assert measured_choice(("test", 2), ("a", "b", "c"), "a", run) == "c" and len(calls) == n  # cached


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_select_chunk_reads_both_layouts_alike(dtype):
    # knn_search hands the kernel (chunk @ queries^T)^T, read in place column-wise by blocks of 32 queries
    # with a vectorised skip test; a row-major cross must give the same lists. 70 queries: two full blocks
    # and a partial one; two chunks, so the second merges into running best lists; a tie across them.
    if not has_op("knn_select_chunk"):
        pytest.skip("tlkernels._C not built: the C++ selection kernel is what this tests")
    g = torch.Generator().manual_seed(3)
    q = torch.softmax(torch.randn(70, 24, generator=g, dtype=dtype), 1)
    db = torch.softmax(torch.randn(90, 24, generator=g, dtype=dtype), 1)
    db[60] = db[5]
    w = torch.ones(24, dtype=dtype)
    A, row_c, scale = _query_side("skl", q, w, EPS)
    B, col_c = _db_side("skl", db, w, EPS)
    cross = (B @ A.t()).t()  # (70, 90), column layout
    bits = 40 if dtype == torch.float64 else 18
    lists = []
    for layout in (cross, cross.contiguous()):
        assert (layout.stride(0) == 1) == (layout is cross)
        bd, bi = torch.empty(70, 0, dtype=dtype), torch.empty(70, 0, dtype=torch.long)
        for s0 in (0, 45):
            bd, bi = op("knn_select_chunk")(layout[:, s0:s0 + 45], row_c, col_c[s0:s0 + 45], scale, bd, bi, s0, 11,
                                            bits)
        lists.append((bd, bi))
    assert torch.equal(lists[0][0], lists[1][0]) and torch.equal(lists[0][1], lists[1][1])
    ri = knn_search_reference(q, db, 11)[1]
    if dtype == torch.float64:
        assert torch.equal(lists[0][1], ri)
    else:  # float32 rounding may swap near-equal neighbours, never change the set by more than that
        assert (lists[0][1] == ri).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_expand_skl_matches_torch(dtype):
    # The database side of the skl expansion in one pass (our AVX2 log in float32) against the torch expression
    # it replaced: log within one float32 ulp, p copied exactly, r(p) as the weighted sum. 37 columns: the
    # vector body and the scalar tail; zeros, tiny, huge, negative, inf and NaN take the std::log lanes.
    if not has_op("knn_expand_skl_"):
        pytest.skip("tlkernels._C not built: the C++ expansion kernel is what this tests")
    g = torch.Generator().manual_seed(5)
    p = torch.rand(50, 37, generator=g, dtype=dtype) * torch.exp(torch.randn(50, 37, generator=g, dtype=dtype) * 8)
    p[0, :10] = torch.tensor([0.0, 1e-45, 1e-39, -1.0, float("inf"), float("nan"), 1.0, 0.5, 2.0, 3e38], dtype=dtype)
    w = torch.rand(37, generator=g, dtype=dtype)
    for eps in (0.0, EPS):
        out = torch.full((50, 74), 7.0, dtype=dtype)
        v0 = out._version
        r = op("knn_expand_skl_")(p, w, eps, out)
        assert out._version > v0  # written through a data pointer: the version counter says so
        ref = torch.log((p + eps).double())  # the sum rounded to dtype, as both the kernel and torch form it
        tol = torch.finfo(dtype).eps
        torch.testing.assert_close(out[:, :37].double(), ref, rtol=tol, atol=0.0, equal_nan=True)
        assert torch.equal(out[1:, 37:], p[1:]) and torch.equal(out[0, 37:].isnan(), p[0].isnan())
        rr = 0.5 * ((p.double() * ref) @ w.double())
        torch.testing.assert_close(r[1:].double(), rr[1:], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0.0)
        assert r[0].isnan()  # the NaN and the negative value of row 0
    with pytest.raises(RuntimeError, match=r"knn_expand_skl_: out must be a contiguous \(50, 74\)"):
        op("knn_expand_skl_")(p, w, EPS, torch.empty(50, 73, dtype=dtype))


@pytest.mark.parametrize("call,msg", [
    (lambda q, db: KnnIndex(db[0]), "KnnIndex: database must be a 2-D floating-point tensor"),
    (lambda q, db: KnnIndex(db, metric="cos"), "KnnIndex: metric must be one of"),
    (lambda q, db: KnnIndex(db).search(q[:, :3], 1), r"KnnIndex.search: queries must be a 2-D tensor \(Q, 4\)"),
    (lambda q, db: KnnIndex(db).search(q.double(), 1), "KnnIndex.search: queries must be torch.float32"),
    (lambda q, db: KnnIndex(db).search(q, 11), r"KnnIndex.search: k must be an int in \[1, 10\], got 11"),
    (lambda q, db: knn_search(q, db, 11), r"knn_search: k = 11 is larger than the database \(10 rows\)"),
    (lambda q, db: knn_search(q[0], db, 1), r"knn_search: queries must be a 2-D tensor"),
    (lambda q, db: knn_search(q, db[:, :3], 1), "knn_search: database must have D = 4 columns"),
    (lambda q, db: knn_search(q, db, 1, metric="cos"), "knn_search: metric must be one of"),
    (lambda q, db: knn_search(q, db, 0), "knn_search: k must be a positive int"),
])
def test_knn_bad_inputs(call, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        call(torch.rand(3, 4), torch.rand(10, 4))


def _shard_worker(rank, world, out):
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(6, 16, generator=g, dtype=torch.float64), 1)
    db = torch.softmax(torch.randn(101, 16, generator=g, dtype=torch.float64), 1)
    db[50] = db[3]  # a tie across the shard boundary
    bounds = [0, 37, 101]
    d, i = knn_search(q, db[bounds[rank]:bounds[rank + 1]], 45, sharded=True, chunk_size=10)
    if rank == 0:
        torch.save((d, i, *knn_search(q, db, 45)), out)


def test_sharded_knn_two_gloo_processes():
    with tempfile.TemporaryDirectory() as t:
        out = os.path.join(t, "out.pt")
        gloo_ranks(_shard_worker, 2, os.path.join(t, "init"), out)
        d, i, d1, i1 = torch.load(out)
        assert torch.equal(i, i1)  # 45 > the first shard's 37 rows: padding path exercised too
        torch.testing.assert_close(d, d1)


# ----------------------------------------------------------------------------- selector
def _dataset(n, seed, size=24):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_selector_end_to_end_store_and_corruption(tmp_path):
    target, source = _dataset(12, 1), _dataset(40, 2)
    bank = gabor_bank(scales=2, orientations=3, size=7)
    sel = SourceSelector(bank, bins=8, fine_bins=64, batch_size=5, cache_dir=str(tmp_path), progress=False)
    sel.fit(target)
    t = sel.describe(target, "target").tensor(torch.float64)
    s = sel.describe(source, "source").tensor(torch.float64)
    assert t.shape == (12, 12 * 8) and s.shape == (40, 12 * 8)
    nb = sel.select(5)
    ref = knn_search_reference(t, s, 5, "skl", channel_weights=bank.channel_weights().double())[1]
    assert torch.equal(nb, ref)
    # the store is reused
    again = SourceSelector(bank, bins=8, fine_bins=64, batch_size=5, cache_dir=str(tmp_path), progress=False)
    again.edges = sel.edges
    assert torch.equal(again.describe(source, "source").tensor(torch.float64), s)
    # corrupted: detected by its checksum, rebuilt, equal
    path = tmp_path / "descriptors-source" / "shard-00000.counts.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert torch.equal(again.describe(source, "source").tensor(torch.float64), s)
    # mismatched (other edges): detected and rebuilt
    other = SourceSelector(bank, bins=8, fine_bins=64, mode="uniform", batch_size=5, cache_dir=str(tmp_path),
                           progress=False).fit(target)
    with pytest.warns(UserWarning, match="holds other descriptors"):
        other.describe(source, "source")
    # hard target images get more neighbours; the joint dataset pairs with retrieved images only
    nbrs = sel.grow([0, 3], levels=3)
    assert len(nbrs[0]) == 15 and len(nbrs[1]) == 5
    joint = JointDataset(target, source, nbrs, seed=0)
    ti, tl, si, sl = joint[3]
    j = [k for k in range(40) if torch.equal(source[k][0], si)]
    assert j and j[0] in nbrs[3].tolist()
    assert torch.equal(joint[3][2], si)  # reproducible per (seed, epoch, index)


def test_selector_from_model_bank_and_errors():
    bank = from_model(torchvision.models.resnet18(), layers=2)
    assert [s["weight"].shape[0] for s in bank.stages] == [64, 64]
    sel = SourceSelector(bank, bins=4, fine_bins=16, batch_size=4, progress=False).fit(_dataset(4, 0, 32))
    assert sel.describe(_dataset(3, 5, 32), "source").shape == (3, 128 * 4)
    with pytest.raises(TypeError, match="SourceSelector: bank must be a tlkernels.filters.FilterBank"):
        SourceSelector(torch.randn(4, 3, 3, 3))
    with pytest.raises(RuntimeError, match=r"SourceSelector.select: describe\(..., name='target'\) first"):
        sel.select(2)


def test_set_levels_equals_direct_search_and_shrinks_to_the_nearest():
    """Iterative mining: target image i at level l gets its k * l nearest source images, exactly those of a
    direct search (the plain procedure); a lower level keeps the nearest part of the list."""
    bank = gabor_bank(scales=1, orientations=2, size=5)
    target, source = _dataset(6, 0), _dataset(40, 1)
    sel = SourceSelector(bank, bins=8, fine_bins=64, batch_size=5, progress=False).fit(target)
    sel.describe(target, "target")
    sel.describe(source, "source")
    sel.select(4)
    t, s = sel.descriptors["target"].tensor(torch.float64), sel.descriptors["source"].tensor(torch.float64)
    w = bank.channel_weights().double()
    direct = knn_search_reference(t, s, 40, "skl", channel_weights=w)[1]
    for levels in ([1, 2, 3, 1, 20, 2], [1, 1, 2, 1, 3, 1], [2, 2, 2, 2, 2, 2]):
        nbrs = sel.set_levels(torch.tensor(levels))
        for i, lv in enumerate(levels):
            kk = min(4 * lv, 40)
            assert torch.equal(nbrs[i], direct[i, :kk]), (levels, i)
    assert sel.levels.tolist() == [2] * 6
    with pytest.raises(ValueError, match=r"SourceSelector.set_levels: levels must be \(6,\) ints >= 1"):
        sel.set_levels(torch.tensor([0, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"set_levels: levels must be \(6,\)"):
        sel.set_levels(torch.ones(5, dtype=torch.long))


def test_step_plan_draws_images_in_proportion_to_their_level():
    from tlkernels.train.data import StepPlan
    w = torch.tensor([1.0, 1.0, 1.0, 10.0])
    plan = StepPlan(4, 4, 0, 0, 1, sample_weights=lambda: w)
    counts = torch.zeros(4)
    for epoch in range(500):
        plan.set_epoch(epoch)
        for batch in plan:
            for k in batch:
                counts[k[0]] += 1
    assert counts.sum() == 2000  # the epoch keeps its length
    ratio = counts[3] / counts[:3].mean()
    assert 8.5 < ratio < 11.5, counts  # level 10 against level 1
    # two ranks: disjoint shares of the same draws, together the whole epoch
    shares = []
    for rank in (0, 1):
        p = StepPlan(4, 4, 0, rank, 2, sample_weights=lambda: w)
        p.set_epoch(3)
        shares.append([k[0] for b in p for k in b])
    one = StepPlan(4, 4, 0, 0, 1, sample_weights=lambda: w)
    one.set_epoch(3)
    assert sorted(shares[0] + shares[1]) == sorted(k[0] for b in one for k in b)


def _precision_seen(monkeypatch, module, fn_name):
    """Wraps module.fn_name to record the float32 precision flags in force when it runs."""
    seen = []
    real = getattr(module, fn_name)

    def spy(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, fn_name, spy)
    return seen


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_histogram_and_knn_run_in_full_fp32_whatever_the_process_set(monkeypatch, precision):
    """Under torch.set_float32_matmul_precision("high") (TF32 on A100/H100) and cuDNN's TF32 default, binning
    would move responses to other bins and TF32 GEMMs would lose the kNN tie grid: both run in full float32, and
    the process's settings come back afterwards."""
    hist = sys.modules["tlkernels.ops.histogram"]
    knn = sys.modules["tlkernels.ops.knn"]
    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        seen_h = _precision_seen(monkeypatch, hist, "op")
        seen_k = _precision_seen(monkeypatch, knn, "_search_chunks_fp32")
        gen = torch.Generator().manual_seed(0)
        imgs = torch.rand(2, 3, 12, 12, generator=gen)
        filt = torch.randn(4, 3, 3, 3, generator=gen)
        edges = torch.linspace(-2, 2, 9).repeat(4, 1)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            filterbank_histogram(imgs, filt, edges)
            db = torch.rand(50, 8, generator=gen)
            knn_search(db[:3], db, 5)
            assert torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(was)
    assert seen_h == [("highest", False)] and seen_k == [("highest", False)], (seen_h, seen_k)
