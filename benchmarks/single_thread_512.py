"""Single-threaded forward of the deepest ResNet-50 stage shape (512 ch, 7x7, 3x3, N=32), hard per-filter gates.

One thread isolates the per-core efficiency of the small-map engine (csrc/ops/cpu/mixgemm.h) from how
well work splits over threads: the gap to one plain oneDNN convolution is the engine's overhead
(im2col, weight blending, output transpose). Prints min and median of 7 calls per provider.

    python benchmarks/single_thread_512.py
"""
import statistics

import torch
import torch.nn.functional as F

from tlkernels._timing import call_times_ms
from tlkernels.ops import gated_conv2d


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, c, hw = 32, 512, 7
    x = torch.randn(n, c, hw, hw)
    wp = torch.randn(c, c, 3, 3) * 0.02
    wf = torch.randn(c, c, 3, 3) * 0.02
    g = (torch.rand(n, c) > 0.5).float()
    g4 = g[:, :, None, None]
    providers = [
        ("tlkernels gated_conv2d", lambda: gated_conv2d(x, wp, wf, g, padding=1)),
        ("plain F.conv2d", lambda: F.conv2d(x, wf, padding=1)),
        ("naive two convs + blend",
         lambda: (1 - g4) * F.conv2d(x, wp, padding=1) + g4 * F.conv2d(x, wf, padding=1)),
    ]
    with torch.no_grad():
        for name, fn in providers:
            times = call_times_ms(fn, 7)
            lo, med = min(times), statistics.median(times)
            print(f"{name}: min {lo:.1f} ms, median {med:.1f} ms")


if __name__ == "__main__":
    main()
