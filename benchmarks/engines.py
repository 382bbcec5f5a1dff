"""The CPU small-map engine with each micro-kernel against one plain convolution: hard per-filter gates,
N = 32, 3x3, forward, ResNet stage shapes; the `gated_conv` setting forces `mix` (our micro-kernel: AVX-512 where
the CPU has it, else AVX2; `mix avx2`: capped at AVX2) and `brgemm` (oneDNN's BRGeMM ukernel, JIT for the running
ISA); in bfloat16 `mix` (AVX-512 BF16 dot products, where the CPU has them) and `brgemm` (oneDNN's bfloat16
BRGeMM: AMX tiles where the CPU has them) against one plain bfloat16 convolution and the naive two convolutions
and blend. Prints medians of 7 calls.

    python benchmarks/engines.py [threads]
"""
import statistics
import sys

import torch
import torch.nn.functional as F

from tlkernels import config
from tlkernels._timing import call_times_ms
from tlkernels.ops import gated_conv2d


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    torch.manual_seed(0)
    for c, hw in [(128, 28), (256, 14), (256, 7), (512, 7), (512, 4)]:
        x = torch.randn(32, c, hw, hw)
        wp, wf = torch.randn(c, c, 3, 3) * 0.02, torch.randn(c, c, 3, 3) * 0.02
        g = (torch.rand(32, c) > 0.5).float()
        res = {}
        xb, wpb, wfb, gb = x.bfloat16(), wp.bfloat16(), wf.bfloat16(), g.bfloat16()
        with torch.no_grad():
            for name, engine, isa in (("mix", "mix", "native"), ("mix avx2", "mix", "avx2"),
                                      ("brgemm", "brgemm", "native")):
                with config.override(gated_conv=engine, cpu_isa=isa):
                    res[name] = statistics.median(call_times_ms(
                        lambda: gated_conv2d(x, wp, wf, g, padding=1, hard=True), 7))
            res["plain conv"] = statistics.median(call_times_ms(lambda: F.conv2d(x, wf, padding=1), 7))
            with config.override(gated_conv="mix"):
                res["bf16 mix"] = statistics.median(call_times_ms(
                    lambda: gated_conv2d(xb, wpb, wfb, gb, padding=1, hard=True), 7))
                res["bf16 taken"] = torch.ops.tlkernels._gated_conv2d_last_strategies()[0]
            with config.override(gated_conv="brgemm"):
                res["bf16 brgemm"] = statistics.median(call_times_ms(
                    lambda: gated_conv2d(xb, wpb, wfb, gb, padding=1, hard=True), 7))
                res["bf16 brgemm taken"] = torch.ops.tlkernels._gated_conv2d_last_strategies()[0]
            res["bf16 plain conv"] = statistics.median(call_times_ms(lambda: F.conv2d(xb, wfb, padding=1), 7))
            g4 = gb[:, :, None, None]
            res["bf16 naive"] = statistics.median(call_times_ms(
                lambda: (1 - g4) * F.conv2d(xb, wpb, padding=1) + g4 * F.conv2d(xb, wfb, padding=1), 7))
        print(f"{c}ch {hw}x{hw}: " + ", ".join(f"{k} {v:.1f} ms" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
