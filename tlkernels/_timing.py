"""Wall-clock times of repeated calls, the one timing helper of selfcheck --bench and the benchmark scripts
(pytest-benchmark times the benchmark files themselves), and the measured choice among a Python op's exact
paths."""
import time

import torch

from tlkernels._extension import HAS_C


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


def register_names(names):
    """Record the candidate names of a Python op's measured choice (a saved pick must name one of them) in the
    compiled library's table; returns them."""
    if HAS_C:
        torch.ops.tlkernels._measured_choice_register_names([str(n) for n in names])
    return names


def measured_choice(key, candidates, keep, run, clearly_faster=None, naive=None):
    """The fastest of several exact ways to do one thing on the running host, for call signature `key` (cuDNN
    benchmark mode's idea), once per key in the process; `keep` (the fixed rule's pick) stays unless another is
    faster by the factor clearly_faster (default: the compiled ops'), and never when measured slower than the
    candidate `naive` (the naive way's work; None: no such candidate). The table of picks, the timing rounds and
    the rule are the compiled library's (csrc/ops/measured_choice.h); this times the candidates, Python callables
    run(c) that it cannot call, and hands it the times. Without the compiled library: `keep`, unmeasured (the
    Python ops that measure run beside compiled kernels)."""
    if not HAS_C:
        return keep
    ops = torch.ops.tlkernels
    key, names = str(key), [str(c) for c in candidates]  # (the picks are data: _choices.py saves them as JSON)
    register_names(names)  # (a saved pick of these is then known when loaded in this process)
    got = ops._measured_choice_recorded(key, names)
    if got:
        return candidates[names.index(got)]
    rounds, warmup = ops._measured_choice_rounds()
    best = [float("inf")] * len(candidates)
    for rnd in range(rounds):  # (interleaved, as the compiled ops' time_candidates)
        for i, c in enumerate(candidates):
            t0 = time.perf_counter()
            run(c)
            if rnd >= warmup:
                best[i] = min(best[i], time.perf_counter() - t0)
    keep_i = names.index(str(keep)) if str(keep) in names else 0
    naive_i = -1 if naive is None else names.index(str(naive))
    pick = ops._measured_choice_record(key, names, best, keep_i, clearly_faster, naive_i)
    return candidates[names.index(pick)]


def chosen(key):
    """What measured_choice picked for `key`, or None before it ran (diagnostics)."""
    from tlkernels import _choices
    return _choices.current().get(str(key))
