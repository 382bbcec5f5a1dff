"""Fused filter-bank histograms: per image and filter, the histogram of the filter's responses over
per-channel bin edges, each summing to 1. No autograd (descriptors are computed without gradients)."""
import torch
import torch.nn.functional as F

from tlkernels._extension import use_reference
from tlkernels.ops._registry import COMPILED, op, register_op
from tlkernels.ops._utils import check_tensor, compiled_checks, full_fp32, pair

def filterbank_histogram_reference(images, filters, edges, stride=1, padding=0):
    """F.conv2d, then per channel torch.bucketize and a count (the oracle; materialises all responses)."""
    r = F.conv2d(images.float(), filters.float(), None, stride, padding)
    n, f = images.shape[0], filters.shape[0]  # (F.conv2d's shape is wrong for an empty batch)
    nb = edges.shape[1] - 1
    if n == 0 or f == 0:
        return torch.zeros(n, f, nb, dtype=torch.float32, device=images.device)
    r = r.reshape(n, f, -1)
    out = torch.zeros(n, f, nb, dtype=torch.float32, device=images.device)
    for c in range(f):
        b = torch.bucketize(r[:, c].contiguous(), edges[c, 1:-1].float().contiguous(), right=True)
        out[:, c].scatter_add_(1, b, torch.ones_like(b, dtype=torch.float32))
    return out / r.shape[2]


def _ref_impl(images, filters, edges, stride, padding):
    return filterbank_histogram_reference(images, filters, edges, stride, padding)


def _gpu_impl(images, filters, edges, stride, padding):
    from tlkernels.triton.histogram import filterbank_histogram_forward
    return filterbank_histogram_forward(images, filters, edges, stride, padding)


def _fake(images, filters, edges, stride, padding):
    return images.new_empty((images.shape[0], filters.shape[0], edges.shape[1] - 1), dtype=torch.float32)


# CUDA tensors: the compiled CUDA kernel (csrc/ops/cuda/histogram_cuda.cu), else the Triton kernel. Counts, no
# derivative.
def _samples():
    """RGB images with a 3x3 bank (padding 1), a grey-level bank on RGB (the channel-sum path) with stride 2, an
    empty batch."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 9, 8, generator=g)
    grey = torch.randn(4, 1, 5, 5, generator=g).expand(4, 3, 5, 5).contiguous()
    edges = torch.linspace(-2, 2, 6).repeat(4, 1)
    return [(imgs, torch.randn(4, 3, 3, 3, generator=g), edges, [1, 1], [1, 1]), (imgs, grey, edges, [2, 2], [0, 0]),
            (imgs[:0], grey, edges, [1, 1], [0, 0])]


register_op("filterbank_histogram", _ref_impl, cuda=COMPILED, triton=_gpu_impl, fake=_fake, samples=_samples)


def filterbank_histogram(images, filters, edges, stride=1, padding=0):
    """(N, F, bins) float32 histograms of conv2d(images, filters) responses, each summing to 1.

    images (N, C, H, W) uint8 or floating, CPU or CUDA; filters (F, C, kh, kw) floating on the images' device;
    edges (F, bins + 1) strictly increasing per row: response v of filter f falls in bin b where
    edges[f, b] <= v < edges[f, b + 1], values outside the range in the end bins, NaN in the last bin (as
    torch.bucketize). No autograd. Raises TypeError for non-tensors and non-floating filters or edges, ValueError
    for shapes, devices, non-increasing or meta edges, images with no channels or smaller than the filters (the
    op's checks, in C++; on GPUs the edges' order is asserted asynchronously).
    """
    name = "filterbank_histogram"
    for arg, t in (("images", images), ("filters", filters), ("edges", edges)):
        check_tensor(name, arg, t)
    stride, padding = pair(name, "stride", stride), pair(name, "padding", padding, allow_zero=True)
    compiled_checks("_filterbank_histogram_check", images, filters, edges, list(stride), list(padding))
    with torch.no_grad(), full_fp32():  # (binning turns TF32 rounding into other bins: GPU = CPU descriptors)
        if use_reference():
            return filterbank_histogram_reference(images, filters, edges.to(images.device), stride, padding)
        return op("filterbank_histogram")(images, filters, edges.to(images.device), list(stride), list(padding))
