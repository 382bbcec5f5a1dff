"""Selective joint fine-tuning's source search at ImageNet-1k scale, from a descriptor store on disk.

    python benchmarks/imagenet_scale_search.py --dir /data/tlk-bench-store          # every phase, then results.csv
    python benchmarks/imagenet_scale_search.py --dir D --rows 100000 --no-record     # a quick, smaller run

Phases, each in its own process (so each peak RSS is its own, read from getrusage):
  generate   a tlkernels.store.DescriptorStore of synthetic histograms: `rows` images x 128 channels (64 at 112x112
             responses, 64 at 56x56: a ResNet's conv1 and layer1 at 224 px) x 32 bins, each channel's histogram
             drawn from Dirichlet(alpha) and rounded to exact counts (largest remainder). Reused when complete.
  bandwidth  the disk's sequential read bandwidth: the store's files read once after evicting them from the page
             cache (posix_fadvise DONTNEED).
  peak       the host's float64 GEMM rate at the search's chunk shape (torch.matmul, best of 5).
  search     the streamed exact search (knn_search on the store, skl, float64, chunks from --memory_gb) of
             `queries` synthetic target descriptors, k nearest, the store evicted first (cold disk).
  subset     on the first `subset_rows` rows: the streamed search against the in-memory exact search (the
             decoded matrix as one float64 tensor; the neighbours must be equal) and faiss-cpu's exact
             IndexFlatIP on the expanded float32 vectors (the same ranking as an inner product).
The bound is one read of the store at the measured bandwidth plus the GEMM's flops at the measured rate.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from conftest import faiss_skl_vectors  # noqa: E402
from tlkernels import store  # noqa: E402
from tlkernels.ops.knn import EPS, chunk_rows, knn_search  # noqa: E402

BINS = 32
STAGES = ((64, 112 * 112), (64, 56 * 56))  # (channels, responses per histogram)
IMAGENET_TRAIN = 1281167


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def stage_columns():
    cols, lo = [], 0
    for c, _ in STAGES:
        cols.append((lo, lo + c * BINS))
        lo += c * BINS
    return cols


def channel_weights():
    return torch.cat([torch.full((c,), 0.5 / c, dtype=torch.float64) for c, _ in STAGES])


def count_pool(rng, alpha, pixels, size):
    """`size` histograms of `pixels` responses over BINS bins: Dirichlet(alpha) rounded to counts summing to pixels."""
    p = rng.dirichlet(np.full(BINS, alpha), size)
    c = np.floor(p * pixels).astype(np.int64)
    short = pixels - c.sum(1)
    order = np.argsort(-(p * pixels - c), axis=1)  # the largest remainders get the missing counts
    for j in range(BINS):
        c[np.arange(size), order[:, j]] += (short > j)
    return c.astype(np.uint16)


def synthetic_rows(seed, rows, alpha, pool=65536):
    """(counts, pixels) of `rows` synthetic descriptors: each channel's histogram drawn from a pool."""
    rng = np.random.default_rng(seed)
    pools = [count_pool(rng, alpha, px, pool) for _, px in STAGES]
    parts = [pools[s][rng.integers(0, pool, (rows, c))].reshape(rows, c * BINS) for s, (c, _) in enumerate(STAGES)]
    return np.concatenate(parts, 1), np.tile(np.array([px for _, px in STAGES], np.uint32), (rows, 1))


def open_store(a):
    key = {"synthetic": "dirichlet", "alpha": a.alpha, "seed": a.seed, "pool": 65536}
    return store.DescriptorStore(a.dir, key, a.rows, stage_columns(), what="benchmark store")


def evict(st):
    for i in range(st.shards):
        for f in st._files(i).values():
            fd = os.open(os.path.join(st.directory, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def phase_generate(a):
    st = open_store(a)
    st.prepare()
    todo = st.pending(range(st.shards))
    t0 = time.perf_counter()
    for i in todo:
        lo, hi = st.shard_range(i)
        counts, pixels = synthetic_rows(a.seed * 100003 + i, hi - lo, a.alpha)
        st.write_shard(i, counts, pixels)
    st.finish()
    d = st.descriptors()
    zero = float((d.rows(0, min(2048, a.rows), torch.float64) == 0).double().mean())
    return {"seconds": time.perf_counter() - t0, "shards_written": len(todo), "disk_gb": st.disk_bytes() / 1e9,
            "zero_fraction": zero}


def phase_bandwidth(a):
    st = open_store(a)
    evict(st)
    buf = bytearray(64 << 20)
    t0, n = time.perf_counter(), 0
    for i in range(st.shards):
        for f in st._files(i).values():
            with open(os.path.join(st.directory, f), "rb", buffering=0) as fh:
                while True:
                    r = fh.readinto(buf)
                    if not r:
                        break
                    n += r
    dt = time.perf_counter() - t0
    evict(st)
    return {"GB/s": n / dt / 1e9, "bytes": n, "seconds": dt}


def queries(a):
    counts, pixels = synthetic_rows(a.seed + 7, a.queries, a.alpha)
    return store.in_memory(counts, pixels, stage_columns()).tensor(torch.float64)


def phase_peak(a):
    dims = sum(c for c, _ in STAGES) * BINS
    m = chunk_rows(a.memory_gb, dims, a.queries)
    A = torch.rand(a.queries, 2 * dims, dtype=torch.float64)
    B = torch.rand(m, 2 * dims, dtype=torch.float64)
    out = torch.empty(m, a.queries, dtype=torch.float64)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.matmul(B, A.t(), out=out)
        best = min(best, time.perf_counter() - t0)
    return {"GFLOP/s": 2 * m * a.queries * 2 * dims / best / 1e9, "chunk_rows": m}


def phase_search(a):
    st = open_store(a)
    d = st.descriptors()
    if a.rows_limit:
        d = d.subset(0, a.rows_limit)
    q = queries(a)
    evict(st)
    base = peak_rss_gb()
    t0 = time.perf_counter()
    dist, idx = knn_search(q, d, a.k, "skl", channel_weights(), EPS,
                           chunk_size=chunk_rows(a.memory_gb, d.shape[1], q.shape[0]))
    dt = time.perf_counter() - t0
    np.save(a.out, idx.numpy())
    return {"seconds": dt, "rows": d.shape[0], "peak_rss_gb": peak_rss_gb(), "rss_before_gb": base,
            "chunk_rows": chunk_rows(a.memory_gb, d.shape[1], q.shape[0])}


def phase_subset(a):
    import faiss
    st = open_store(a)
    d = st.descriptors().subset(0, a.subset_rows)
    q = queries(a)
    w = channel_weights()
    out = {}
    t0 = time.perf_counter()
    _, streamed = knn_search(q, d, a.k, "skl", w, EPS, chunk_size=chunk_rows(a.memory_gb, d.shape[1], q.shape[0]))
    out["streamed_s"] = time.perf_counter() - t0
    full = d.tensor(torch.float64)
    t0 = time.perf_counter()
    _, inmem = knn_search(q, full, a.k, "skl", w, EPS)
    out["in_memory_s"] = time.perf_counter() - t0
    out["equal_neighbours"] = bool(torch.equal(streamed, inmem))
    # faiss: the skl ranking as an inner product (conftest.faiss_skl_vectors), float32, exact flat index
    xq, xb = faiss_skl_vectors(q, full, w.repeat_interleave(BINS), EPS)
    del full
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(xb.shape[1])
    t0 = time.perf_counter()
    index.add(xb)
    _, fi = index.search(np.ascontiguousarray(xq), a.k)
    out["faiss_s"] = time.perf_counter() - t0
    out["faiss_recall"] = float(np.mean([len(set(fi[i]) & set(inmem[i].tolist())) / a.k for i in range(len(fi))]))
    out["rows"] = d.shape[0]
    out["peak_rss_gb"] = peak_rss_gb()
    return out


PHASES = {"generate": phase_generate, "bandwidth": phase_bandwidth, "peak": phase_peak, "search": phase_search,
          "subset": phase_subset}


def run_phase(a, name):
    cmd = [sys.executable, __file__, "--phase", name] + [f"--{k}={v}" for k, v in vars(a).items()
                                                         if k not in ("phase", "no_record") and v is not None]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(name, json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="store directory (rows x 8 KiB of disk for the default layout)")
    ap.add_argument("--rows", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--rows_limit", type=int, default=0, help="search only the first rows (0: all)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of each channel's histogram")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory_gb", type=float, default=1.0)
    ap.add_argument("--subset_rows", type=int, default=50000)
    ap.add_argument("--out", default=os.path.join("/tmp", "tlk-bench-neighbours.npy"))
    ap.add_argument("--phase", choices=sorted(PHASES))
    ap.add_argument("--no_record", action="store_true", help="print only; do not append to benchmarks/results.csv")
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(PHASES[a.phase](a)))
        return
    gen = run_phase(a, "generate")
    bw = run_phase(a, "bandwidth")
    peak = run_phase(a, "peak")
    search = run_phase(a, "search")
    sub = run_phase(a, "subset")
    dims = sum(c for c, _ in STAGES) * BINS
    rows = search["rows"]
    read_s = gen["disk_gb"] * rows / a.rows * 1e9 / (bw["GB/s"] * 1e9)
    gemm_s = 2 * a.queries * rows * 2 * dims / (peak["GFLOP/s"] * 1e9)
    bound = read_s + gemm_s
    summary = {"bound_s": bound, "read_s": read_s, "gemm_s": gemm_s, "search_s": search["seconds"],
               "ratio_to_bound": search["seconds"] / bound}
    print("summary", json.dumps(summary), flush=True)
    if a.no_record:
        return
    import uuid
    from results import append, context
    ctx, run = context(), uuid.uuid4().hex[:10]
    case = f"knn skl store {rows} x {dims} (uint16 counts), {a.queries} queries, k={a.k}"
    common = {"disk GB/s": round(bw["GB/s"], 3), "GEMM GFLOP/s": round(peak["GFLOP/s"], 1),
              "store GB": round(gen["disk_gb"], 2), "zero fraction": round(gen["zero_fraction"], 3),
              "memory_gb": a.memory_gb, "chunk_rows": search["chunk_rows"]}

    def row(case_, provider, seconds, baseline, baseline_s, extra):
        return dict(ctx, run=run, benchmark="imagenet_scale_search", case=case_, provider=provider,
                    median_ms=f"{seconds * 1e3:.1f}", iqr_ms="", rounds=1, baseline=baseline,
                    ratio=f"{baseline_s / seconds:.4f}", extra=json.dumps(extra, sort_keys=True), device="cpu")

    sub_case = f"knn skl store subset {sub['rows']} x {dims}, {a.queries} queries, k={a.k}"
    append([row(case, "bound", bound, "bound", bound, dict(common, read_s=round(read_s, 1), gemm_s=round(gemm_s, 1))),
            row(case, "tlkernels_streamed", search["seconds"], "bound", bound,
                dict(common, **{"peak RSS GB": round(search["peak_rss_gb"], 2)})),
            row(sub_case, "tlkernels_streamed", sub["streamed_s"], "tlkernels_in_memory", sub["in_memory_s"],
                {"equal neighbours to in-memory": sub["equal_neighbours"]}),
            row(sub_case, "tlkernels_in_memory", sub["in_memory_s"], "tlkernels_in_memory", sub["in_memory_s"], {}),
            row(sub_case, "faiss_flat_ip_f32", sub["faiss_s"], "tlkernels_in_memory", sub["in_memory_s"],
                {"recall vs exact": round(sub["faiss_recall"], 4), "peak RSS GB (phase)": round(sub["peak_rss_gb"], 2)})])


if __name__ == "__main__":
    main()
