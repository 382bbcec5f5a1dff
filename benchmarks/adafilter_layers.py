"""Where AdaFilter's fused eval stands against its ceiling (ResNet-18, N=32, 112x112, 2 threads).

Prints the AdaFilter eval (the naive way and ours, as in benchmarks/test_bench_methods.py), the plain
one-branch ResNet-18 eval time in the default layout and in channels_last (what a perfect fused AdaFilter
eval would cost, up to the gate LSTM) and, for each 3x3 conv shape of its gated stages, one hard per-filter
gated convolution against one plain F.conv2d with the same shape: the per-layer price of the gate. Medians
of 5 calls.

    python benchmarks/adafilter_layers.py
"""
import statistics

import torch
import torch.nn.functional as F
import torchvision

from tlkernels._timing import call_times_ms
from test_bench_methods import _adafilter
from tlkernels.ops import gated_conv2d


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    n = 32
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(n, 3, 112, 112)
    with torch.no_grad():
        for provider in ("naive", "tlkernels"):
            m = _adafilter(provider).eval()
            print(f"adafilter resnet18 eval N={n} 112x112, {provider}: "
                  f"{statistics.median(call_times_ms(lambda: m(x), 5)):.1f} ms")
        print(f"plain resnet18 eval N={n} 112x112: {statistics.median(call_times_ms(lambda: model(x), 5)):.1f} ms")
        mc, xc = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        print(f"plain resnet18 eval N={n} 112x112 channels_last: "
              f"{statistics.median(call_times_ms(lambda: mc(xc), 5)):.1f} ms")
        # (C_in, C_out, input size, stride) of the 3x3 convs of layer1..layer4 at 112x112 input
        for cin, cout, hw, s in [(64, 64, 28, 1), (64, 128, 28, 2), (128, 128, 14, 1), (128, 256, 14, 2),
                                 (256, 256, 7, 1), (256, 512, 7, 2), (512, 512, 4, 1)]:
            xx = torch.randn(n, cin, hw, hw)
            wp, wf = torch.randn(cout, cin, 3, 3) * 0.05, torch.randn(cout, cin, 3, 3) * 0.05
            g = (torch.rand(n, cout) > 0.5).float()
            b = torch.randn(cout)
            tg = statistics.median(call_times_ms(lambda: gated_conv2d(xx, wp, wf, g, b, b, stride=s, padding=1), 5))
            tc = statistics.median(call_times_ms(lambda: F.conv2d(xx, wf, b, stride=s, padding=1), 5))
            print(f"{cin:>3}->{cout:<3} {hw:>2}x{hw:<2} stride {s}: gated {tg:6.2f} ms, conv2d {tc:6.2f} ms, "
                  f"gated / conv2d {tg / tc:.2f}")


if __name__ == "__main__":
    main()
