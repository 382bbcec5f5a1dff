"""Wall-clock times of repeated calls, the one timing helper of selfcheck --bench and the benchmark scripts
(pytest-benchmark times the benchmark files themselves), and the measured choice among a Python op's exact
paths."""
import threading
import time

import torch


def call_times_ms(fn, reps, warmup=2, device=None):
    """Milliseconds of each of `reps` calls of fn after `warmup` untimed calls (scratch buffers, oneDNN primitives
    and Triton kernels are created on first use). On a CUDA device each call is timed with CUDA events and the
    device synchronised, so the times are the GPU's, not the launch's."""
    for _ in range(warmup):
        fn()
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


_CHOICES = {}
_CHOICES_LOCK = threading.Lock()
NAMES = set()  # every candidate name of the Python ops' measured choices (register_names)


def register_names(names):
    """Record the candidate names of an op's measured choice (a saved pick must be one of them); returns them."""
    NAMES.update(names)
    return names


def measured_choice(key, candidates, keep, run, clearly_faster=0.85):
    """The fastest of several exact ways to do one thing on the running host, for call signature `key`: each
    candidate c is timed with run(c), once per key in the process (cuDNN benchmark mode's idea); the pick is
    cached. Round 0 warms up, then the best of three rounds, interleaved so that a burst of load hits every
    candidate alike. `keep` (the fixed rule's pick) stays unless another is faster by the factor clearly_faster:
    a choice that flips with timing noise costs more than it gains. The compiled ops' twin:
    csrc/ops/measured_choice.h."""
    key = str(key)  # (the picks are data: tlkernels/_choices.py saves them as JSON)
    register_names(candidates)  # (a saved pick of these is then known when loaded in this process)
    with _CHOICES_LOCK:
        if key in _CHOICES and _CHOICES[key] in candidates:
            return _CHOICES[key]
    best = {c: float("inf") for c in candidates}
    for rnd in range(4):
        for c in candidates:
            t0 = time.perf_counter()
            run(c)
            if rnd:
                best[c] = min(best[c], time.perf_counter() - t0)
    pick = keep if keep in best else candidates[0]
    for c, b in best.items():
        if b < clearly_faster * best[pick]:
            pick = c
    with _CHOICES_LOCK:
        if _CHOICES.get(key) not in candidates:
            _CHOICES[key] = pick
        return _CHOICES[key]


def chosen(key):
    """What measured_choice picked for `key`, or None before it ran (diagnostics)."""
    return _CHOICES.get(str(key))
