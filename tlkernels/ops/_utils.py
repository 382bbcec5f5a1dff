"""Argument checks shared by the ops. Messages name the op, the argument, what was expected and what came."""
import contextlib
import functools

import torch


def fail(op, msg, exc=ValueError):
    raise exc(f"{op}: {msg}")


def compiled_checks(check_op, *args):
    """Run a compiled op's argument checks, `torch.ops.tlkernels.<check_op>(*args)` (csrc/ops/: the checks alone,
    one composite kernel, no output), before the dispatcher picks a kernel by the tensors' devices and before a
    reference runs. Skipped without the compiled library (the references then run unchecked) and while
    torch.compile traces (no values to read: the kernels' own checks apply)."""
    from tlkernels._extension import HAS_C
    if HAS_C and not torch.compiler.is_compiling():
        getattr(torch.ops.tlkernels, check_op)(*args)


def check_tensor(op, name, t, *, dim=None, dtype=None, device=None, floating=False):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if dim is not None and t.dim() not in (dim if isinstance(dim, tuple) else (dim,)):
        fail(op, f"{name} must be {' or '.join(f'{d}-D' for d in (dim if isinstance(dim, tuple) else (dim,)))}, "
                 f"got {t.dim()}-D with shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        fail(op, f"{name} must be a floating-point tensor, got {t.dtype}", TypeError)
    if dtype is not None and t.dtype != dtype:
        fail(op, f"{name} must have dtype {dtype} (the dtype of the first input), got {t.dtype}", TypeError)
    if device is not None and t.device != device:
        fail(op, f"{name} must be on device {device} (the device of the first input), got {t.device}")


def pair(op, name, v, allow_zero=False):
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        fail(op, f"{name} must be an int or a pair of ints, got {v!r}", TypeError)
    lo = 0 if allow_zero else 1
    if any(i < lo for i in v):
        fail(op, f"{name} must be >= {lo}, got {tuple(v)}")
    return tuple(v)


def autocast_casts(t):
    """True when torch.autocast is on for t's device and t is floating point: the op's autocast kernel
    (csrc/ops/autocast/) will cast t, so arguments may still differ in floating dtype here."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and torch.amp.is_autocast_available(t.device.type)
            and torch.is_autocast_enabled(t.device.type))


def autocast_dtype(device_type, dtype):
    """The dtype a tensor of `dtype` on device_type takes in a lower-precision op (a convolution, gated_conv2d)
    under torch.autocast: autocast's dtype for floating point but float64 while autocast is on there, else
    `dtype` itself (torch's own rule)."""
    if (dtype.is_floating_point and dtype != torch.float64 and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return dtype


def conv_output_hw(input, weight, stride, padding, dilation=(1, 1)):
    """[H_out, W_out] of F.conv2d(input, weight, None, stride, padding, dilation) for `input` (N, C, H, W) and
    `weight` (F, C, kH, kW), from PyTorch's own shape function (F.conv2d on meta tensors; the compiled ops call
    at::native::conv_output_size): the formula is PyTorch's, written nowhere here. Symbolic sizes stay symbolic."""
    key = (*input.shape[2:], *weight.shape[2:], *stride, *padding, *dilation)
    if all(type(v) is int for v in key):
        return list(_conv_output_hw(*key))  # (a launch path's call: once per shape)
    return list(_conv_output_hw.__wrapped__(*key))


@functools.lru_cache(maxsize=1024)
def _conv_output_hw(h, w, kh, kw, sh, sw, ph, pw, dh, dw):
    x, k = torch.empty((1, 1, h, w), device="meta"), torch.empty((1, 1, kh, kw), device="meta")
    return tuple(torch.nn.functional.conv2d(x, k, None, (sh, sw), (ph, pw), (dh, dw)).shape[2:])


@contextlib.contextmanager
def full_fp32():
    """float32 matmuls and convolutions in full precision inside, whatever the process set (TF32 on CUDA under
    torch.set_float32_matmul_precision("high") or cuDNN's default, bf16 in oneDNN under "medium"), restored
    afterwards. For results that must not depend on the device: histogram binning turns rounding into another
    bin, and nearest-neighbour ties sit on a grid finer than TF32's 2**-11. (The legacy setters: the flags they
    write agree with the newer per-backend ones, so neither API then refuses the other's state.)"""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    cudnn = torch.backends.cudnn
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
