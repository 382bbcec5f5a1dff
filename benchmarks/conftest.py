import ctypes
import ctypes.util
import os
import statistics
import sys
import time

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def steady_allocator():
    """glibc malloc: serve blocks up to 32 MB from the heap and never give the heap back, so that after the
    warm-up round no provider's call pays page faults for fresh memory. With glibc's defaults a large block may
    come from mmap or from a heap top that was trimmed, depending on the process's history of frees: one plain
    512ch 7x7 1x1 conv took 5.4 ms in one process (no page faults) and 10.5-12 ms in others (2320 faults per
    call), the naive gated conv at 64ch 56x56 3x3 104-124 ms against 218-224 ms (0 against 42557-43808
    faults per call). Ratios then measure the kernels, not the allocator's state. TLKERNELS_BENCH_MALLOC=default
    keeps glibc's defaults (results record which: the `malloc` column). Returns whether the setting took."""
    if os.environ.get("TLKERNELS_BENCH_MALLOC", "steady") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # (malloc.h)
    # 32 MB: glibc's largest mmap threshold on 64-bit; blocks above it (none per call here) still use mmap
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


STEADY_ALLOCATOR = steady_allocator()


def bench_devices():
    """The devices the benchmarks run on: TLKERNELS_BENCH_DEVICE (cpu or cuda), else the CPU and, when one is
    visible, the GPU. Every case and provider is the same on each; results.csv's `device` column tells them apart."""
    v = os.environ.get("TLKERNELS_BENCH_DEVICE", "")
    if v in ("cpu", "cuda"):
        if v == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("TLKERNELS_BENCH_DEVICE=cuda but no CUDA device is visible")
        return [v]
    if v:
        raise pytest.UsageError(f"TLKERNELS_BENCH_DEVICE must be cpu or cuda, got {v!r}")
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", bench_devices())


@pytest.fixture(autouse=True)
def _record_device(request):
    """A benchmark's device goes to its extra_info (results.csv's `device` column; run() picks the clock by it)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "device" in callspec.params and "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["device"] = callspec.params["device"]


def clock(device):
    """The timer for calls on `device` (seconds). On a GPU a reading records a CUDA event on the current stream and
    waits for it, and returns its time after a reference event: an interval between two readings is the GPU's
    own timing of the kernels queued between them (CUDA events), not the host's time to launch them."""
    if device != "cuda":
        return time.perf_counter
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()

    def cuda_events():
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        return ref.elapsed_time(ev) / 1e3
    return cuda_events

# Each provider's timed callable, by (benchmark file, case), for the later providers of that case to pair with.
_TIMED = {}


def run(benchmark, fn, rounds=5, iterations=1, pair=None):
    """Time fn with a warm-up round; rounds kept small because each call is a whole conv/step. Sub-millisecond
    calls pass iterations > 1 so that one round is long enough for the timer and the noise to average out.

    pair: providers of the same case, timed earlier in this session, whose call runs (timed) right before
    each round of fn. Their medians over those rounds go to extra_info["paired_ms"], and ratios against them
    (results.py, report.py) compare calls made within the same seconds: on a shared machine a slow minute
    then slows both sides of a ratio instead of one. The ratio of two separately timed medians moves by up to
    about 20% between runs there. Default: the case's baseline (extra_info "baseline", default naive) for every
    other provider timed one call per round; none where iterations > 1."""
    file = benchmark.fullname.split("::")[0]
    provider = benchmark.extra_info.get("provider", benchmark.name)
    device = benchmark.extra_info.get("device", "cpu")
    timer = clock(device)
    benchmark._timer = timer  # (pytest-benchmark reads its timer at each run)
    if pair is None:
        baseline = benchmark.extra_info.get("baseline", "naive")
        pair = (baseline,) if provider != baseline and iterations == 1 else ()
    for key in [k for k in _TIMED if k[0] != file]:  # one file's callables (and the tensors they hold) at a time
        del _TIMED[key]
    refs = {p: _TIMED[(file, benchmark.group, device, p)] for p in pair if (file, benchmark.group, device, p) in _TIMED}
    times = {p: [] for p in refs}

    def setup():
        for p, ref in refs.items():
            t0 = timer()
            ref()
            times[p].append(timer() - t0)

    if refs and iterations > 1:
        raise ValueError("benchmarks.conftest.run: pair needs iterations == 1 (pytest-benchmark runs a setup "
                         f"function only between rounds), got iterations={iterations}")
    result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=iterations,
                                setup=setup if refs else None)
    paired = {p: statistics.median(t[1:]) * 1e3 for p, t in times.items() if len(t) > 1}  # (t[0]: warm-up round)
    if paired:
        benchmark.extra_info["paired_ms"] = {p: round(v, 4) for p, v in paired.items()}
    _TIMED[(file, benchmark.group, device, provider)] = fn
    return result


def pytest_sessionfinish(session, exitstatus):
    """Append this run's results to benchmarks/results.csv (TLKERNELS_RESULTS=path elsewhere, =0 not at all)."""
    bs = getattr(session.config, "_benchmarksession", None)
    dest = os.environ.get("TLKERNELS_RESULTS", "")
    if bs is None or getattr(bs, "disabled", False) or dest == "0":
        return
    import results
    results.append(results.rows_of(bs.benchmarks, STEADY_ALLOCATOR), dest or results.RESULTS)


def faiss_skl_vectors(queries, database, weights, eps):
    """(query, database) float32 numpy vectors whose largest inner products rank `database` rows by the weighted
    symmetric KL to each query (the row constant dropped): max <[A, 1], [B, -2c]> with knn's expansion A, B and
    c = r(p) / 2 (tlkernels.ops.knn). `weights`: one per dimension. For faiss's exact IndexFlatIP."""
    from tlkernels.ops.knn import _db_side, _query_side
    A, _, _ = _query_side("skl", queries, weights, eps)
    B, c = _db_side("skl", database, weights, eps)
    xb = torch.cat([B, -2 * c[:, None]], 1).float().numpy()
    xq = torch.cat([A, torch.ones(A.shape[0], 1, dtype=A.dtype)], 1).float().numpy()
    return xq, xb
