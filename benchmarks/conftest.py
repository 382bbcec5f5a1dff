import os

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def run(benchmark, fn, rounds=5):
    """Time fn with a warm-up call; rounds kept small because each call is a whole conv/step."""
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
