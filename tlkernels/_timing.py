"""Wall-clock times of repeated calls, the one timing helper of selfcheck --bench and the benchmark scripts
(pytest-benchmark times the benchmark files themselves)."""
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
