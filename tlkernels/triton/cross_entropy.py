"""Triton cross-entropy: one program per row, online log-sum-exp in fp32 over column blocks, then the
gradient row written in a second sweep while the row is hot in L2 (Liger-Kernel's scheme). The mean's
denominator is read from device memory, so nothing synchronises with the host."""
import torch
import triton
import triton.language as tl

from tlkernels._extension import interpret_mode
from tlkernels.triton._common import device_of


@triton.jit
def _ce_kernel(x_ptr, x_stride, t_ptr, q_ptr, q_stride, w_ptr, denom_ptr, rows_ptr, g_ptr, g_stride, C,
               ignore_index, scale, SOFT: tl.constexpr, HAS_W: tl.constexpr, MEAN: tl.constexpr,
               COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, IS_F64: tl.constexpr):
    # accumulator: float64 for float64 logits (IS_F64: F.cross_entropy's precision), else float32
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    m = tl.full((), -float("inf"), tl.float64 if IS_F64 else tl.float32)  # (loop-carried: one dtype throughout)
    s = tl.zeros((), tl.float64 if IS_F64 else tl.float32)
    dot = tl.zeros((), tl.float64 if IS_F64 else tl.float32)
    qsum = tl.zeros((), tl.float64 if IS_F64 else tl.float32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < C
        xv = tl.load(x_row + offs, mask=mask, other=-float("inf")).to(tl.float64 if IS_F64 else tl.float32)
        new_m = tl.maximum(m, tl.max(xv, axis=0))
        # While every logit so far is -inf, shift by 0: exp(-inf - -inf) would be NaN, exp(-inf - 0) is 0.
        shift = tl.where(new_m == -float("inf"), 0.0, new_m)
        s = s * tl.exp(m - shift) + tl.sum(tl.where(mask, tl.exp(xv - shift), 0.0), axis=0)
        m = new_m
        if SOFT:
            qv = tl.load(q_ptr + row * q_stride + offs, mask=mask, other=0.0).to(tl.float64 if IS_F64 else tl.float32)
            dot += tl.sum(qv * tl.where(mask, xv, 0.0), axis=0)  # masked lanes: 0, not 0 * -inf
            qsum += tl.sum(qv, axis=0)
    lse = m + tl.log(s)
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + row).to(tl.float64 if IS_F64 else tl.float32)
    if SOFT:
        loss = lse * qsum - dot
        y = -1
    else:
        y = tl.load(t_ptr + row)
        ignored = y == ignore_index
        x_true = tl.load(x_row + tl.where(ignored, 0, y)).to(tl.float64 if IS_F64 else tl.float32)  # true-class term in the accumulator dtype
        loss = tl.where(ignored, 0.0, lse - x_true)
        w = tl.where(ignored, 0.0, w)
        qsum = 1.0
    tl.store(rows_ptr + row, w * loss)
    if COMPUTE_GRAD:
        coef = w * scale
        if MEAN:
            coef = coef / tl.load(denom_ptr)
        coef = tl.where(w == 0.0, 0.0, coef)
        for c0 in range(0, C, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            mask = offs < C
            xv = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float64 if IS_F64 else tl.float32)
            p = tl.exp(xv - lse)
            if SOFT:
                qv = tl.load(q_ptr + row * q_stride + offs, mask=mask, other=0.0).to(tl.float64 if IS_F64 else tl.float32)
            else:
                qv = tl.where(offs == y, 1.0, 0.0)
            tl.store(g_ptr + row * g_stride + offs, (coef * (p * qsum - qv)).to(g_ptr.dtype.element_ty), mask=mask)


def cross_entropy_forward(logits, target, sample_weight, ignore_index, reduction, scale, compute_grad):
    """The cross_entropy op on CUDA tensors: (loss, dL/dlogits) from one row kernel launch."""
    N, C = logits.shape
    logits = logits.contiguous()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the kernel's accumulator (IS_F64)
    soft = target.is_floating_point()
    if soft:
        target = target.to(logits.dtype).contiguous()
        counted = torch.ones(N, device=logits.device, dtype=acc)
    else:
        target = target.contiguous()  # the kernel reads label `row` at t_ptr + row
        counted = (target != ignore_index).to(acc)
        # (the kernel reads logits[row, label]: labels out of range stop it, asserted on the device, no host sync)
        torch.ops.tlkernels._cross_entropy_check("cross_entropy", "", logits, target, sample_weight, ignore_index)
    if sample_weight is not None:
        sample_weight = sample_weight.contiguous()  # read at w_ptr + row
    w = counted if sample_weight is None else counted * sample_weight.to(counted.dtype)
    denom = w.sum() if C else w.sum() * 0  # no classes: the mean is 0/0 = nan, as F.cross_entropy
    rows = torch.zeros(N, device=logits.device, dtype=acc)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    if N and C:
        block = 16 if interpret_mode() else min(4096, triton.next_power_of_2(C))
        with device_of(logits):
            _ce_kernel[(N,)](logits, logits.stride(0), target, target if soft else logits, target.stride(0) if soft else 0,
                             sample_weight if sample_weight is not None else rows, denom, rows, grad,
                             grad.stride(0) if compute_grad else 0, C, ignore_index, float(scale), SOFT=soft,
                             HAS_W=sample_weight is not None, MEAN=reduction == 1, COMPUTE_GRAD=compute_grad,
                             BLOCK=block, IS_F64=acc == torch.float64, num_warps=1 if interpret_mode() else 8)
    if reduction == 0:
        loss = (rows * scale).to(logits.dtype)
    elif reduction == 1:
        loss = (rows.sum() * scale / denom).to(logits.dtype)
    else:
        loss = (rows.sum() * scale).to(logits.dtype)
    return loss, grad
