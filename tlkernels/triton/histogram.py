"""Triton binning for the filter-bank histogram (used for CUDA tensors when the CUDA C++ kernel was not
built). Responses of a tile of images come from one conv; one program per (image, filter) row binary-
searches every response among the row's edges and counts with tl.histogram (integer: deterministic)."""
import torch
import triton
import triton.language as tl

from tlkernels._extension import interpret_mode
from tlkernels.ops._utils import conv_output_hw
from tlkernels.triton._common import device_of


@triton.jit
def _bin_rows_kernel(r_ptr, e_ptr, out_ptr, P, F, n0, NB: tl.constexpr, NB_POW2: tl.constexpr, STEPS: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    f = row % F
    e = e_ptr + f * (NB + 1)
    counts = tl.zeros((NB_POW2,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        mask = offs < P
        v = tl.load(r_ptr + row * P + offs, mask=mask, other=0.0)
        # bin_index: values below e[1] -> 0, at or above e[NB-1] -> NB-1, else binary search (e[lo] <= v < e[hi])
        lo = tl.full((BLOCK,), 1, tl.int32)
        hi = tl.full((BLOCK,), NB - 1, tl.int32)
        for _ in tl.static_range(STEPS):
            mid = (lo + hi) // 2
            em = tl.load(e + mid)
            go = (v >= em) & (hi - lo > 1)
            lo = tl.where(go, mid, lo)
            hi = tl.where((v < em) & (hi - lo > 1), mid, hi)
        b = tl.where(v >= tl.load(e + 1), lo, 0)
        b = tl.where(v >= tl.load(e + NB - 1), NB - 1, b)
        b = tl.where(v != v, NB - 1, b)  # NaN: the last bin, as torch.bucketize in the reference
        b = tl.where(mask, b, NB_POW2 - 1 if NB_POW2 > NB else 0)  # masked lanes go to a spare slot
        counts += tl.histogram(b, NB_POW2)
        if NB_POW2 == NB:  # no spare slot: take the masked lanes back out of bin 0
            counts -= tl.where(tl.arange(0, NB_POW2) == 0, tl.sum((~mask).to(tl.int32), axis=0), 0)
    idx = tl.arange(0, NB_POW2)
    tl.store(out_ptr + (n0 * F + row) * NB + idx, counts.to(tl.float32) / P, mask=idx < NB)


def filterbank_histogram_forward(images, filters, edges, stride, padding, tile_elems=1 << 24):
    """The filterbank_histogram op on CUDA tensors: conv2d responses binned by the Triton kernel."""
    N, F = images.shape[0], filters.shape[0]
    nb = edges.shape[1] - 1
    e = edges.to(torch.float32).contiguous()
    w = filters.to(torch.float32)
    OH, OW = conv_output_hw(images, filters, stride, padding)
    P = OH * OW
    out = torch.zeros((N, F, nb), device=images.device, dtype=torch.float32)
    tile = max(1, tile_elems // max(1, F * P))
    nb_pow2 = triton.next_power_of_2(nb + 1)
    steps = max(1, (nb).bit_length())
    if F == 0:
        return out
    for n0 in range(0, N, tile):
        r = torch.nn.functional.conv2d(images[n0:n0 + tile].to(torch.float32), w, None, stride, padding).contiguous()
        n = r.shape[0]
        with device_of(r):
            _bin_rows_kernel[(n * F,)](r, e, out, P, F, n0, NB=nb, NB_POW2=nb_pow2, STEPS=steps,
                                       BLOCK=64 if interpret_mode() else 1024)
    return out
