"""The descriptor store: exact counts, streamed search equal to the in-memory one, resumable and checksummed
description, memory bounded by the budget, and the collective description under torch.distributed."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from tlkernels import store
from tlkernels.filters import gabor_bank
from tlkernels.ops import filterbank_histogram, knn_search, knn_search_reference
from tlkernels.ops.knn import chunk_rows
from tlkernels.select import SourceSelector

from conftest import gloo_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset(n, seed, size=24):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))


def _bank():
    return gabor_bank(scales=2, orientations=3, size=7)


def _selector(tmp=None, **kw):
    kw = dict(dict(bins=8, fine_bins=64, batch_size=5, progress=False, cache_dir=tmp, shard_rows=7), **kw)
    return SourceSelector(_bank(), **kw)


class Counting(TensorDataset):
    """A TensorDataset (fingerprinted by its tensors) that records which items were read, and can fail at one
    index (an interrupted run)."""

    def __init__(self, base, fail_at=None):
        super().__init__(*base.tensors)
        self.fail_at, self.read = fail_at, []

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        self.read.append(i)
        return super().__getitem__(i)


def test_counts_are_exact_and_decode_to_the_histograms(tmp_path):
    target, source = _dataset(8, 1), _dataset(23, 2)
    sel = _selector().fit(target)
    d = sel.describe(source, "source")
    counts, pixels = d.raw(0, len(d))
    assert counts.dtype == np.uint16 and pixels.tolist() == [[24 * 24]] * 23
    assert counts.reshape(23, -1, 8).sum(-1).min() == counts.reshape(23, -1, 8).sum(-1).max() == 576
    w = _bank().stages[0]
    h = filterbank_histogram(source.tensors[0], w["weight"], sel.edges[0], 1, w["padding"]).flatten(1)
    torch.testing.assert_close(d.tensor(), h, rtol=2.4e-7, atol=0)  # the kernel's count * (1/P): within an ulp
    assert torch.equal(d.tensor(torch.float64), torch.from_numpy(counts.astype(np.float64)) / 576.0)
    stored = _selector(str(tmp_path)).fit(target)
    stored.edges = sel.edges
    assert torch.equal(stored.describe(source, "source").tensor(torch.float64), d.tensor(torch.float64))
    assert torch.equal(d.subset(5, 17).tensor(), d.tensor()[5:17])
    # more than 65,535 responses per histogram: uint32 counts
    big = TensorDataset(torch.rand(2, 3, 260, 260))
    sel2 = SourceSelector(gabor_bank(scales=1, orientations=2, size=5), bins=4, fine_bins=16, progress=False,
                          cache_dir=str(tmp_path / "big"))
    sel2.fit(big)
    counts2, pixels2 = sel2.describe(big, "x").raw(0, 2)
    assert counts2.dtype == np.uint32 and pixels2.max() == 260 * 260
    h2 = sel2.describe(big, "x").tensor(torch.float64).reshape(2, 4, 4)  # 4 filters (2 orientations x re, im)
    assert torch.equal(h2, torch.from_numpy(counts2.astype(np.float64)).reshape(2, 4, 4) / 67600.0)
    torch.testing.assert_close(h2.sum(-1), torch.ones(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("wide", [False, True])
def test_device_decode_path_equals_the_numpy_path(wide):
    """decode() of tensors (the path a GPU takes: unsigned counts reinterpreted and widened) equals numpy's."""
    g = np.random.default_rng(0)
    hi = 70000 if wide else 65535
    counts = g.integers(0, hi, (9, 12)).astype(np.uint32 if wide else np.uint16)
    pixels = np.array([[hi, 7]] * 9, np.uint32)
    d = store.in_memory(counts, pixels, [(0, 8), (8, 12)])
    host = d.decode(counts, pixels, torch.float64)
    dev = d.decode(torch.from_numpy(counts), torch.from_numpy(pixels), torch.float64)
    assert torch.equal(host, dev)
    assert host[0, 0].item() == counts[0, 0] / hi and host[0, 9].item() == counts[0, 9] / 7


@pytest.mark.parametrize("chunk", [5, 13, 64])
def test_streamed_search_equals_the_in_memory_search(tmp_path, chunk):
    target, source = _dataset(9, 1), _dataset(40, 2)
    sel = _selector(str(tmp_path)).fit(target)
    t, s = sel.describe(target, "target"), sel.describe(source, "source")
    assert len(s.parts) == 6  # 40 rows in shards of 7: chunks straddle shard ends
    q, full = t.tensor(torch.float64), s.tensor(torch.float64)
    w = _bank().channel_weights().double()
    for k in (1, 11, 40):
        streamed = knn_search(q, s, k, channel_weights=w, chunk_size=chunk)
        inmem = knn_search(q, full, k, channel_weights=w)
        assert torch.equal(streamed[1], inmem[1]) and torch.equal(streamed[0], inmem[0])
        assert torch.equal(streamed[1], knn_search_reference(q, full, k, channel_weights=w)[1])
    sub = knn_search(q, s.subset(10, 33), 5, channel_weights=w, chunk_size=chunk)[1]
    assert torch.equal(sub, knn_search(q, full[10:33], 5, channel_weights=w)[1])
    assert torch.equal(sel.select(6), knn_search(q, full, 6, channel_weights=w)[1])


def test_manifest_holds_the_key_layout_and_checksums(tmp_path):
    target, source = _dataset(6, 1), _dataset(16, 2)
    sel = _selector(str(tmp_path)).fit(target)
    sel.describe(source, "source")
    root = tmp_path / "descriptors-source"
    m = json.loads((root / "manifest.json").read_text())
    assert m["format"] == store.FORMAT and m["version"] == store.VERSION and m["rows"] == 16 and m["dims"] == 96
    assert set(m["key"]) == {"bank", "edges", "bins", "mode", "data"} and m["key"]["bins"] == 8
    assert [s["rows"] for s in m["shards"]] == [[0, 7], [7, 14], [14, 16]]
    for s in m["shards"]:
        for name, f in s["files"].items():
            assert hashlib.sha256((root / f).read_bytes()).hexdigest() == s["sha256"][name]
            assert np.load(root / f, allow_pickle=False).shape[0] == s["rows"][1] - s["rows"][0]
    assert not list(root.glob("shard-*.json"))  # the shards' records were merged into the manifest


def test_interrupted_description_resumes_at_the_first_missing_shard(tmp_path):
    target, base = _dataset(6, 1), _dataset(30, 2)
    ref = _selector().fit(target)
    want = ref.describe(base, "source").tensor(torch.float64)
    sel = _selector(str(tmp_path))
    sel.edges = ref.edges
    with pytest.raises(KeyboardInterrupt):
        sel.describe(Counting(base, fail_at=17), "source")  # shards 0 and 1 (rows 0-13) are complete
    root = tmp_path / "descriptors-source"
    assert sorted(p.name for p in root.glob("shard-*.json")) == ["shard-00000.json", "shard-00001.json"]
    again = Counting(base)
    got = sel.describe(again, "source").tensor(torch.float64)
    assert min(again.read) == 14 and sorted(again.read) == list(range(14, 30))
    assert torch.equal(got, want)
    third = Counting(base)
    assert torch.equal(sel.describe(third, "source").tensor(torch.float64), want) and third.read == []


def test_a_corrupt_shard_is_detected_by_its_checksum_and_rebuilt(tmp_path):
    target, base = _dataset(6, 1), _dataset(30, 2)
    sel = _selector(str(tmp_path)).fit(target)
    want = sel.describe(base, "source").tensor(torch.float64)
    f = tmp_path / "descriptors-source" / "shard-00002.counts.npy"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40
    f.write_bytes(bytes(raw))
    again = Counting(base)
    with pytest.warns(UserWarning, match=r"shard 2 does not match its checksum .*rebuilding it"):
        got = sel.describe(again, "source").tensor(torch.float64)
    assert sorted(again.read) == list(range(14, 21)) and torch.equal(got, want)
    (tmp_path / "descriptors-source" / "shard-00003.pixels.npy").unlink()
    again = Counting(base)
    with pytest.warns(UserWarning, match="shard 3 does not match"):
        assert torch.equal(sel.describe(again, "source").tensor(torch.float64), want)
    assert sorted(again.read) == list(range(21, 28))
    (tmp_path / "descriptors-source" / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="manifest is unreadable"):
        assert torch.equal(sel.describe(base, "source").tensor(torch.float64), want)


def test_a_store_of_other_descriptors_is_rebuilt(tmp_path):
    target, source = _dataset(6, 1), _dataset(12, 2)
    a = _selector(str(tmp_path)).fit(target)
    da = a.describe(source, "source").tensor()
    b = _selector(str(tmp_path), mode="uniform").fit(target)
    with pytest.warns(UserWarning, match="holds other descriptors"):
        db = b.describe(source, "source").tensor()
    assert not torch.equal(da, db)
    other = _dataset(12, 3)
    with pytest.warns(UserWarning, match="holds other descriptors"):
        dc = b.describe(other, "source").tensor()
    fresh = _selector(mode="uniform")
    fresh.edges = b.edges
    assert torch.equal(dc, fresh.describe(other, "source").tensor())


def test_chunk_rows_follow_the_memory_budget():
    assert chunk_rows(1.0, 4096, 1000) < chunk_rows(2.0, 4096, 1000) < chunk_rows(2.0, 1024, 1000)
    rows = chunk_rows(1.0, 4096, 1000)
    per_row = 4 * 4096 + 8 * (3 * 4096 + 1000)
    assert 8 * 1000 * 4096 * 3 + rows * per_row <= 2**30 < 8 * 1000 * 4096 * 3 + (rows + 1) * per_row
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="knn_search: memory_gb must be a number > 0"):
            chunk_rows(bad, 10, 10)
    with pytest.raises(ValueError, match="SourceSelector: memory_gb must be a number > 0, got 0"):
        SourceSelector(_bank(), memory_gb=0)
    with pytest.raises(ValueError, match="SourceSelector: shard_rows must be a positive int, got 0"):
        SourceSelector(_bank(), shard_rows=0)
    with pytest.raises(IndexError, match=r"Descriptors.subset: rows \[3, 99\) are outside \[0, 4\]"):
        store.in_memory(np.zeros((4, 2), np.uint16), np.ones((4, 1), np.uint32), [(0, 2)]).subset(3, 99)


_MEMORY = """
import json, os, resource, sys, numpy as np, torch
from tlkernels import store
from tlkernels.ops.knn import chunk_rows, knn_search
root, rows, dims, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(1)
st = store.DescriptorStore(root, {"test": 1}, rows, [(0, dims)], shard_rows=8192)
st.prepare()
g = np.random.default_rng(0)
for i in range(st.shards):
    a, b = st.shard_range(i)
    c = g.integers(0, 200, (b - a, dims)).astype(np.uint16)
    st.write_shard(i, c, c.reshape(b - a, -1).sum(1, keepdims=True).astype(np.uint32))
st.finish()
d = st.descriptors()
q = d.rows(0, 20, torch.float64)
knn_search(q, d.subset(0, 600), 5, chunk_size=chunk_rows(budget, dims, 20))  # warm-up: code pages, GEMM pick
page = os.sysconf("SC_PAGE_SIZE")
before = int(open("/proc/self/statm").read().split()[1]) * page
peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
i = knn_search(q, d, 5, chunk_size=chunk_rows(budget, dims, 20))[1]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": peak - max(before, peak0) if peak > peak0 else 0, "first": i[0].tolist()}))
"""


def test_streamed_search_memory_stays_within_the_budget(tmp_path):
    """A source store whose float64 matrix (and its expansion) would take 12x the budget is searched with the
    resident set growing by less than the budget plus allocator slack."""
    rows, dims, budget = 40000, 512, 0.04  # decoded: 164 MB, expanded for skl: 328 MB; budget 43 MB
    r = subprocess.run([sys.executable, "-c", _MEMORY, str(tmp_path / "s"), str(rows), str(dims), str(budget)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["extra"] < budget * 2**30 * 1.25 + 16 * 2**20, out
    assert len(out["first"]) == 5


def _dist_worker(rank, world, root, out):
    torch.set_num_threads(1)  # (one thread a rank: two ranks, two cores)
    target, source = _dataset(6, 1), _dataset(33, 2)
    sel = _selector(root)
    sel.edges = torch.load(os.path.join(os.path.dirname(out), "edges.pt"))
    sel.describe(target, "target")
    sel.describe_shard(source)
    nb = sel.select(4)
    if rank == 0:
        torch.save(nb, out)


def test_two_ranks_write_one_store_and_search_its_shares():
    target, source = _dataset(6, 1), _dataset(33, 2)
    ref = _selector().fit(target)
    ref.describe(target, "target")
    ref.describe(source, "source")
    want = ref.select(4)
    with tempfile.TemporaryDirectory() as t:
        torch.save(list(ref.edges), os.path.join(t, "edges.pt"))
        out, root = os.path.join(t, "nb.pt"), os.path.join(t, "cache")
        gloo_ranks(_dist_worker, 2, os.path.join(t, "init"), root, out)
        assert torch.equal(torch.load(out), want)
        m = json.load(open(os.path.join(root, "descriptors-source", "manifest.json")))
        assert len(m["shards"]) == 5 and all(s["sha256"] for s in m["shards"])
        # a second, single-process selector reads the same store
        again = _selector(root)
        again.edges = ref.edges
        src = Counting(source)
        again.describe(target, "target")
        again.describe(src, "source")
        assert src.read == [] and torch.equal(again.select(4), want)


def test_a_rebuilt_shard_replaces_its_record_in_the_manifest(tmp_path):
    st = store.DescriptorStore(str(tmp_path), {"k": 1}, 10, [(0, 4)], shard_rows=4)
    st.prepare()
    for i in range(st.shards):
        a, b = st.shard_range(i)
        st.write_shard(i, np.full((b - a, 4), i, np.uint16), np.full((b - a, 1), 9, np.uint32))
    st.finish()
    st.write_shard(1, np.full((4, 4), 7, np.uint16), np.full((4, 1), 9, np.uint32))  # described again, differently
    assert st.pending(range(3)) == []
    st.finish()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["shards"][1]["sha256"]["counts"] == hashlib.sha256((tmp_path / "shard-00001.counts.npy").read_bytes()).hexdigest()
    assert st.pending(range(3)) == [] and st.descriptors().raw(4, 8)[0].tolist() == [[7] * 4] * 4
    with pytest.raises(ValueError, match=r"DescriptorStore.write_shard: shard 2 needs counts \(2, 4\)"):
        st.write_shard(2, np.zeros((3, 4), np.uint16), np.ones((3, 1), np.uint32))


def test_an_empty_data_set_gives_an_empty_store(tmp_path):
    sel = _selector(str(tmp_path)).fit(_dataset(4, 1))
    d = sel.describe(_dataset(0, 2), "empty")
    assert d.shape == (0, 96) and d.tensor().shape == (0, 96)
    m = json.loads((tmp_path / "descriptors-empty" / "manifest.json").read_text())
    assert m["rows"] == 0 and m["shards"] == []
    assert _selector().fit(_dataset(4, 1)).describe(_dataset(0, 2), "empty").shape == (0, 96)
