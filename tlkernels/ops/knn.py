"""Exact k-nearest-neighbour search by streaming the database in chunks: one GEMM on augmented vectors plus a
running top-k, never a full distance matrix. Ties are broken by the lower database index; distances are rounded to a grid fine relative to the
magnitude of their terms (`quantize`) so that equal descriptors tie exactly whatever the chunking.

Metrics (query a, database row p, weights w >= 0 per dimension):
  skl  weighted symmetric KL (Ge & Yu): sum_k w_k/2 [a_k log((a_k+e)/(p_k+e)) + p_k log((p_k+e)/(a_k+e))]
       = 1/2 (r(a) + r(p) - <[w a, w log(a+e)], [log(p+e), p]>), r(v) = sum_k w_k v_k log(v_k+e)
  kl   sum_k w_k a_k log((a_k+e)/(p_k+e)) = r(a) - <w a, log(p+e)>
  l2   sum_k w_k (a_k - p_k)^2
  ip   -<w a, p> (most similar first)
The database may be a tensor, a numpy array / memory map, or tlkernels.store.Descriptors (integer counts, in
memory or in a store on disk) larger than RAM: only one chunk is loaded at a time (`chunk_rows` sizes chunks
from a memory budget).
With sharded=True and torch.distributed initialised, `database` is this rank's shard (rows in rank order)
and every rank gets the global answer.
"""
import contextlib

import numpy as np
import torch

from tlkernels import config
from tlkernels._extension import use_reference
from tlkernels._timing import chosen, measured_choice, register_names
from tlkernels.ops._registry import CPU_ONLY, has_op, op, register_op
from tlkernels.ops._utils import fail, full_fp32

METRICS = ("skl", "kl", "l2", "ip")
EPS = 2.2204e-16


def _weights(opname, channel_weights, dim, dtype, device):
    if channel_weights is None:
        return torch.ones(dim, dtype=dtype, device=device)
    w = torch.as_tensor(channel_weights, dtype=dtype, device=device)
    if w.dim() != 1 or dim % w.shape[0] != 0:
        fail(opname, f"channel_weights must have shape ({dim},) or (channels,) dividing {dim}, got {tuple(w.shape)}")
    return w.repeat_interleave(dim // w.shape[0])


def _check_values(opname, name, t, metric, start=0):
    """Descriptors must be finite, and non-negative for the KL metrics (their log would be NaN): a NaN or
    infinite distance has no place in an ascending list, so such rows are refused rather than mis-ranked.
    On CUDA the check is asynchronous (no host sync): a bad value aborts the stream with this message."""
    bad = ~torch.isfinite(t)
    if metric in ("skl", "kl"):
        bad = bad | (t < 0)
    what = "finite" + (" and >= 0 (histograms) for the KL metrics" if metric in ("skl", "kl") else "")
    if t.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{opname}: {name} must be {what}")
        return
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        fail(opname, f"{name} must be {what} (metric {metric!r}); row {start + r}, column {c} is {t[r, c].item()}")


def _check_common(opname, metric, eps, dtype, device, chunk_size=None):
    if metric not in METRICS:
        fail(opname, f"metric must be one of {METRICS}, got {metric!r}")
    if dtype not in (torch.float32, torch.float64):
        fail(opname, f"descriptors must be float32 or float64 (half-precision distances cannot rank histograms "
                     f"reliably; convert with .float()), got {dtype}", TypeError)
    if device.type == "meta":
        fail(opname, "descriptors are meta tensors: a search needs their values")
    if metric in ("skl", "kl") and (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1):
        fail(opname, f"eps must be a float in (0, 1) for metric {metric!r} (log(p + eps) of an empty bin), got {eps!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        fail(opname, f"chunk_size must be a positive int, got {chunk_size!r}")


def _query_side(metric, a, w, eps):
    if metric == "skl":
        la = torch.log(a + eps)
        return torch.cat([w * a, w * la], 1), 0.5 * (w * a * la).sum(1), -0.5
    if metric == "kl":
        return w * a, (w * a * torch.log(a + eps)).sum(1), -1.0
    if metric == "l2":
        return w * a, (w * a * a).sum(1), -2.0
    return w * a, torch.zeros(a.shape[0], dtype=a.dtype, device=a.device), -1.0


def _db_side(metric, p, w, eps, buf=None):
    if metric == "skl":
        # [log(p + e), p] written in place into one buffer, and r(p) as a GEMV: three passes over the chunk
        # instead of the six of log / cat / multiply / multiply / sum.
        # `buf` (streaming search): the previous chunk's buffer, reused: a fresh chunk-sized buffer is fresh
        # pages from the OS each time, whose page faults cost about as much as the expansion itself
        # (benchmarks/test_bench_select.py, `tlkernels` against `tlkernels_index`).
        m, d = p.shape
        if buf is not None and buf.shape == (m, 2 * d) and buf.dtype == p.dtype and buf.device == p.device:
            B = buf
        else:
            B = torch.empty(m, 2 * d, dtype=p.dtype, device=p.device)
        if _fused_expand(p):  # C++: one pass, AVX2 log in float32
            return B, op("knn_expand_skl_")(p, w, eps, B)
        lp = B[:, :d]
        torch.add(p, eps, out=lp)
        lp.log_()
        B[:, d:].copy_(p)
        return B, 0.5 * ((p * lp) @ w)
    if metric == "kl":
        return torch.log(p + eps), torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    if metric == "l2":
        return p, (w * p * p).sum(1)
    return p, torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)


def quantize(d, scale):
    """Round each distance to a grid of 2**-40 (float64; 2**-18 in float32) times the magnitude `scale` of the
    terms it was computed from. The expanded form's rounding error is about eps * scale and depends on where a
    row sits in a GEMM chunk; after rounding, equal descriptors tie exactly (the lower index wins) whatever
    the chunking, and distances that differ by less than the grid count as ties."""
    bits = 40 if d.dtype == torch.float64 else 18
    _, e = torch.frexp(scale)
    u = torch.ldexp(torch.ones_like(scale), e - bits)
    return torch.round(d / u) * u


def _distances(A, row_c, scale, B, col_c):
    t = scale * (A @ B.t())
    d = row_c[:, None] + col_c[None, :] + t
    # magnitude of the terms: no cancellation inside the cross term for non-negative histograms
    mag = row_c.abs()[:, None] + col_c.abs()[None, :] + t.abs()
    return quantize(d, mag)


def _fused_select(q):
    return q.device.type == "cpu" and has_op("knn_select_chunk") and not use_reference()


def _fused_expand(p):
    return (p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and has_op("knn_expand_skl_")
            and not use_reference())


def _fake_expand(p, w, eps, out):
    return p.new_empty(p.shape[0])


def _fake_select(cross, row_c, col_c, scale, best_d, best_i, base, k, bits):
    # the k best of the previous lists (kb columns) and this chunk's m candidates
    kout = min(k, best_d.shape[1] + cross.shape[1])
    return cross.new_empty((cross.shape[0], kout)), best_i.new_empty((cross.shape[0], kout))


# The CPU fast paths of knn_search (csrc/ops/cpu/knn_kernel.cpp): ops of the compiled library only (no schema
# here; knn_search takes the pure-PyTorch path without them), no derivative. knn_expand_skl_ writes `out`.
def _select_samples():
    g = torch.Generator().manual_seed(0)
    cross = torch.randn(5, 7, generator=g, dtype=torch.float64)
    row_c, col_c = torch.rand(5, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    best_d, best_i = torch.rand(5, 2, generator=g, dtype=torch.float64).sort(1).values, torch.randint(0, 9, (5, 2))
    return [(cross, row_c, col_c, 1.0, best_d, best_i, 100, 3, 40)]


def _expand_samples():
    g = torch.Generator().manual_seed(0)
    return [(torch.softmax(torch.randn(4, 6, generator=g), 1), torch.rand(6, generator=g), EPS, torch.empty(4, 12))]


register_op("knn_expand_skl_", None, cuda=CPU_ONLY, fake=_fake_expand, mutates=True, samples=_expand_samples)
register_op("knn_select_chunk", None, cuda=CPU_ONLY, fake=_fake_select, samples=_select_samples)


def _chunk_topk(d, k, base):
    """The k smallest of each row of d (ties: lowest column), as (dist, global index). A stable sort keeps
    tied columns in order; unlike boolean-mask selection it has no data-dependent shape, so nothing waits for
    the device (the path GPUs take)."""
    m = d.shape[1]
    if k >= m:
        idx = torch.arange(base, base + m, device=d.device).expand(d.shape[0], m)
        return d, idx
    vals, cols = torch.sort(d, dim=1, stable=True)
    return vals[:, :k], cols[:, :k] + base


def _merge(dist, idx, k):
    """Sort candidates by (distance, index) and keep k."""
    order = idx.argsort(dim=1, stable=True)
    dist, idx = dist.gather(1, order), idx.gather(1, order)
    order = dist.argsort(dim=1, stable=True)[:, :k]
    return dist.gather(1, order), idx.gather(1, order)


class _Rows:
    """Database rows [start, stop) as a tensor on the search's device. A database with `raw` and `decode` (a
    tlkernels.store.Descriptors: integer counts) is read compact and decoded on that device; it is asked to
    `prefetch` the next chunk, so the disk reads ahead while this one is searched. Host rows bound for a GPU go
    through two sets of pinned buffers in turn: the copy is asynchronous, so the host reads the next chunk while
    the GPU copies and searches this one, and a buffer is refilled only after the copy out of it has finished
    (its event)."""

    def __init__(self, database, device):
        self.database, self.device = database, device
        self.decode = getattr(database, "decode", None) if hasattr(database, "raw") else None
        self.staged = device.type == "cuda" and not (torch.is_tensor(database) and database.device.type != "cpu")
        self.buffers, self.events, self.turn, self.out = {}, [None, None], 0, None

    def __call__(self, start, stop, dtype):
        if self.decode is not None:
            parts = self.database.raw(start, stop)
            if hasattr(self.database, "prefetch"):
                self.database.prefetch(stop, 2 * stop - start)
        else:
            parts = (self.database[start:stop],)
        j, self.turn = self.turn, 1 - self.turn
        if self.staged and self.events[j] is not None:
            self.events[j].synchronize()  # the previous copy out of buffer set j is done
        if self.decode is not None and not self.staged:  # numpy arrays decoded on the CPU, into one reused buffer
            if self.out is None or self.out.shape[0] < parts[0].shape[0]:
                self.out = torch.empty(parts[0].shape, dtype=torch.float64)
            return self.decode(*parts, dtype=dtype, out=self.out).to(self.device)
        parts = [self._move(j, n, p) for n, p in enumerate(parts)]
        if self.staged:
            self.events[j] = torch.cuda.Event()
            self.events[j].record()
        return self.decode(*parts, dtype=dtype) if self.decode is not None else parts[0].to(dtype)

    def _move(self, j, n, part):
        if not self.staged:
            if isinstance(part, np.ndarray):
                part = torch.from_numpy(np.array(part))  # a copy: memory maps may be read-only
            return part.to(device=self.device)
        src = torch.from_numpy(part) if isinstance(part, np.ndarray) else part
        buf = self.buffers.get((j, n))
        if buf is None or buf.shape[0] < src.shape[0] or buf.shape[1:] != src.shape[1:] or buf.dtype != src.dtype:
            buf = self.buffers[(j, n)] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        staged = buf[:src.shape[0]]
        staged.copy_(src)
        return staged.to(self.device, non_blocking=True)


def chunk_rows(memory_gb, dims, queries, metric="skl", dtype=torch.float64):
    """Database rows per search chunk so that a search's buffers stay within `memory_gb` GiB: the queries'
    expansion once, then per chunk row its raw counts (<= 4 bytes a value), decoded values, expansion (two
    vectors for skl) and cross-product row (one value per query)."""
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0:
        fail("knn_search", f"memory_gb must be a number > 0, got {memory_gb!r}")
    item = torch.finfo(dtype).bits // 8
    width = 2 if metric == "skl" else 1
    fixed = item * queries * dims * (1 + width)
    per_row = 4 * dims + item * (dims * (1 + width) + queries)
    return max(256, int((memory_gb * 2**30 - fixed) // per_row))


# The chunk GEMM, cross = A @ B^T (queries x chunk rows), nearly all of a search's time, computed as B @ A^T: the
# selection kernel reads that transposed result in place by blocks of 32 queries (handed A @ B^T instead, its
# rows contiguous, a whole search is slower: benchmarks/test_bench_select.py). Two BLAS: torch's (MKL in the x86
# wheels) and numpy's (its bundled OpenBLAS, runtime-dispatched for the CPU); which is faster depends on the CPU,
# so TLKERNELS_KNN_GEMM=auto (default) times both, with the selection, once per (dtype, queries, dims, threads)
# in the process on the first chunk's first SAMPLE_ROWS rows, and every chunk of every later search takes the
# pick (the answer does not depend on which searches came first); `torch` or `numpy` forces one. Calls of that
# size time steadily, so numpy's is taken only when clearly faster (clearly_faster below).
def _gemm_torch(A, B, out):
    return torch.matmul(B, A.t(), out=out).t()


def _gemm_numpy(A, B, out):
    np.matmul(B.numpy(), A.numpy().T, out=out.numpy())
    return out.t()


GEMMS = register_names({"torch": _gemm_torch, "numpy": _gemm_numpy})
SAMPLE_ROWS = 1024


config.declare("knn_gemm", ("auto", *GEMMS))


def gemm_setting():
    """The `knn_gemm` setting (TLKERNELS_KNN_GEMM): auto or one of GEMMS."""
    return config.get("knn_gemm")


def _gemm_key(q, B):
    return ("knn_gemm", q.dtype, q.shape[0], B.shape[1], torch.get_num_threads())


def chosen_gemm(q, B):
    """The chunk GEMM `auto` picked for these queries and chunks like B (None before the first such search)."""
    return chosen(_gemm_key(q, B))


def _blas_threads():
    """numpy's BLAS limited to torch's intra-op thread count (what torch.set_num_threads asks for; several
    processes on one host each set it), by threadpoolctl, which restores the previous limit afterwards."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def _pick_gemm(A, B, select):
    """The chunk GEMM for this search: forced, or measured on the first SAMPLE_ROWS rows of chunk B together
    with the selection that reads its result (its speed depends on the layout it is handed)."""
    setting = gemm_setting()
    if setting != "auto":
        return setting
    sample = B[:SAMPLE_ROWS]
    bufs = {}

    def run(name):
        if name not in bufs:
            bufs[name] = torch.empty(sample.shape[0], A.shape[0], dtype=A.dtype)
        select(GEMMS[name](A, sample, bufs[name]), sample.shape[0])

    return measured_choice(_gemm_key(A, B), tuple(GEMMS), "torch", run, clearly_faster=0.95)


def _search_chunks(q, w, metric, eps, k, chunks):
    """Merge (base, B, col_c) database chunks, expanded already, into the k best of each query row (the GEMMs in
    full float32: TF32's 2**-11 is coarser than the tie grid, so ties and neighbour order would be lost)."""
    with full_fp32():
        return _search_chunks_fp32(q, w, metric, eps, k, chunks)


def _search_chunks_fp32(q, w, metric, eps, k, chunks):
    A, row_c, scale = _query_side(metric, q, w, eps)
    best_d = torch.empty(q.shape[0], 0, dtype=q.dtype, device=q.device)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    if not _fused_select(q):
        for base, B, col_c in chunks:
            d = _distances(A, row_c, scale, B, col_c)
            cd, ci = _chunk_topk(d, k, base)
            best_d, best_i = _merge(torch.cat([best_d, cd], 1), torch.cat([best_i, ci], 1), k)
        return best_d, best_i
    # C++: distances, tie grid and a k-heap per row in one pass over the GEMM
    bits, Q, name = 40 if q.dtype == torch.float64 else 18, q.shape[0], None
    bufs = {}  # one cross buffer per chunk size, reused across chunks (fresh large buffers cost page faults)
    with contextlib.ExitStack() as stack:
        for base, B, col_c in chunks:
            B = B.contiguous()
            if name is None:
                if gemm_setting() != "torch":  # numpy's BLAS may run
                    stack.enter_context(_blas_threads())
                empty_d, empty_i = best_d[:, :0], best_i[:, :0]
                name = _pick_gemm(A, B, lambda cross, m: op("knn_select_chunk")(
                    cross, row_c, col_c[:m], scale, empty_d, empty_i, base, k, bits))
            if B.shape[0] not in bufs:
                bufs[B.shape[0]] = torch.empty(B.shape[0], Q, dtype=q.dtype)
            best_d, best_i = op("knn_select_chunk")(GEMMS[name](A, B, bufs[B.shape[0]]), row_c, col_c, scale,
                                                    best_d, best_i, base, k, bits)
    return best_d, best_i


def knn_search(queries, database, k, metric="skl", channel_weights=None, eps=EPS, chunk_size=8192, sharded=False,
               group=None):
    """(distances (Q, k) ascending, indices (Q, k) int64) of the k nearest database rows of each query.

    queries (Q, D) float32 or float64 on any device; database (M, D): a tensor, numpy array, memory map or
    tlkernels.store.Descriptors (streamed in chunks of chunk_size rows, moved to the queries' device and dtype). metric: skl, kl, l2 or ip
    (module docstring); channel_weights (D,) or (channels,) dividing D; eps > 0 for the KL metrics. Ties go to
    the lower index. sharded=True: `database` is this rank's shard and every rank gets the global answer.
    Raises ValueError for non-finite descriptors (or negative ones under kl/skl), k outside [1, M], bad
    shapes, chunk_size or eps; TypeError for other dtypes (half precision included).
    """
    name = "knn_search"
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        fail(name, f"queries must be a 2-D tensor (Q, D), got {getattr(queries, 'shape', type(queries).__name__)}")
    if not queries.is_floating_point():
        fail(name, f"queries must be floating point, got {queries.dtype}", TypeError)
    if not hasattr(database, "shape") or len(database.shape) != 2:
        fail(name, "database must be 2-D (M, D): a tensor, numpy array, memory map or tlkernels.store.Descriptors")
    if database.shape[1] != queries.shape[1]:
        fail(name, f"database must have D = {queries.shape[1]} columns (the queries'), got {database.shape[1]}")
    _check_common(name, metric, eps, queries.dtype, queries.device, chunk_size)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        fail(name, f"k must be a positive int, got {k!r}")
    _check_values(name, "queries", queries.detach(), metric)
    local_m = int(database.shape[0])
    offset, total = 0, local_m
    if sharded:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            fail(name, "sharded=True needs torch.distributed to be initialised")
        # collectives on the queries' device: NCCL takes CUDA tensors only, gloo CPU ones
        sizes = [torch.zeros(1, dtype=torch.long, device=queries.device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([local_m], device=queries.device), group=group)
        sizes = [int(s) for s in sizes]
        offset, total = sum(sizes[:dist.get_rank(group)]), sum(sizes)
    if k > total:
        fail(name, f"k = {k} is larger than the database ({total} rows)")
    q = queries.detach()
    dtype, device = q.dtype, q.device
    w = _weights(name, channel_weights, q.shape[1], dtype, device)

    rows = _Rows(database, device)

    def chunks():
        buf = None  # consumed (GEMM done) before the next chunk is expanded into it
        for start in range(0, local_m, chunk_size):
            p = rows(start, min(start + chunk_size, local_m), dtype)
            if rows.decode is None:  # (decoded counts are finite and >= 0 by construction)
                _check_values(name, "database", p, metric, start)
            buf, col_c = _db_side(metric, p, w, eps, buf)
            yield offset + start, buf, col_c

    with torch.no_grad():
        best_d, best_i = _search_chunks(q, w, metric, eps, min(k, local_m), chunks())
        if sharded:
            import torch.distributed as dist
            world = dist.get_world_size(group)
            pad = k - best_d.shape[1]  # shards smaller than k: pad with +inf (never selected)
            if pad:
                best_d = torch.cat([best_d, best_d.new_full((q.shape[0], pad), float("inf"))], 1)
                best_i = torch.cat([best_i, best_i.new_full((q.shape[0], pad), total)], 1)
            all_d = [torch.empty_like(best_d) for _ in range(world)]
            all_i = [torch.empty_like(best_i) for _ in range(world)]
            dist.all_gather(all_d, best_d.contiguous(), group=group)
            dist.all_gather(all_i, best_i.contiguous(), group=group)
            best_d, best_i = _merge(torch.cat(all_d, 1), torch.cat(all_i, 1), k)
    return best_d, best_i


class KnnIndex:
    """A database expanded once for repeated exact searches (what faiss's IndexFlat `add` does): the log and
    the row constants are computed at construction, so `search` is the GEMM and the running top-k only.
    Costs the expanded copy in memory (2 x D per row for skl); `knn_search` streams instead.

        index = KnnIndex(source_descriptors, metric="skl")
        dist, idx = index.search(target_descriptors, k=50)   # same answer as knn_search
    """

    def __init__(self, database, metric="skl", channel_weights=None, eps=EPS, chunk_size=4096):
        name = "KnnIndex"
        if not isinstance(database, torch.Tensor) or database.dim() != 2 or not database.is_floating_point():
            fail(name, f"database must be a 2-D floating-point tensor (M, D), got "
                       f"{getattr(database, 'shape', type(database).__name__)}", TypeError)
        _check_common(name, metric, eps, database.dtype, database.device, chunk_size)
        _check_values(name, "database", database.detach(), metric)
        self.metric, self.eps, self.dim, self.size = metric, eps, database.shape[1], database.shape[0]
        self.dtype, self.device = database.dtype, database.device
        self.w = _weights(name, channel_weights, self.dim, self.dtype, self.device)
        with torch.no_grad():
            self.chunks = [(s0, *_db_side(metric, database[s0:s0 + chunk_size].detach(), self.w, eps))
                           for s0 in range(0, self.size, chunk_size)]

    def search(self, queries, k):
        """(distances (Q, k) ascending, indices (Q, k) int64), as knn_search on the same database."""
        name = "KnnIndex.search"
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or queries.shape[1] != self.dim:
            fail(name, f"queries must be a 2-D tensor (Q, {self.dim}), got "
                       f"{getattr(queries, 'shape', type(queries).__name__)}")
        if queries.dtype != self.dtype or queries.device != self.device:
            fail(name, f"queries must be {self.dtype} on {self.device} (the database's), got {queries.dtype} "
                       f"on {queries.device}", TypeError)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.size:
            fail(name, f"k must be an int in [1, {self.size}], got {k!r}")
        _check_values(name, "queries", queries.detach(), self.metric)
        with torch.no_grad():
            return _search_chunks(queries.detach(), self.w, self.metric, self.eps, k, self.chunks)


def knn_search_reference(queries, database, k, metric="skl", channel_weights=None, eps=EPS):
    """Full distance matrix from the direct formula, then a (distance, index) sort (the oracle)."""
    a = queries.double()
    p = (torch.as_tensor(np.asarray(database)) if not isinstance(database, torch.Tensor) else database).to(a.device).double()
    w = _weights("knn_search", channel_weights, a.shape[1], torch.float64, a.device)
    A, P = a[:, None, :], p[None, :, :]
    if metric == "skl":
        d = (w * 0.5 * (A * torch.log((A + eps) / (P + eps)) + P * torch.log((P + eps) / (A + eps)))).sum(-1)
    elif metric == "kl":
        d = (w * A * torch.log((A + eps) / (P + eps))).sum(-1)
    elif metric == "l2":
        d = (w * (A - P) ** 2).sum(-1)
    else:
        d = -(w * A * P).sum(-1)
    # the same tie grid as the search (term magnitudes from the expanded form), on the direct formula's values
    Aq, rq, sc = _query_side(metric, a, w, eps)
    Bq, cq = _db_side(metric, p, w, eps)
    mag = rq.abs()[:, None] + cq.abs()[None, :] + (sc * (Aq @ Bq.t())).abs()
    idx = torch.arange(p.shape[0], device=d.device).expand_as(d)
    return _merge(quantize(d, mag), idx, k)
