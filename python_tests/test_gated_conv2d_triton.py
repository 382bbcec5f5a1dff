"""The Triton kernels executed by the interpreter (TRITON_INTERPRET=1, set in conftest) on CPU tensors,
against the float64 reference; plus AOT compilation for sm80/sm90 in a subprocess."""
import os
import subprocess
import sys

import pytest
import torch

from tlkernels.ops import gated_conv2d_reference
from tlkernels.triton.gated_conv2d import gated_conv2d_backward, gated_conv2d_forward

from test_gated_conv2d import grads, make_case

CASES = [
    ((2, 3, 5, 6, 6, 3, 1, 1, 1, 1), "filter_soft"),
    ((2, 4, 6, 7, 7, 3, 2, 1, 1, 2), "image_soft"),
    ((3, 3, 4, 5, 5, 1, 1, 0, 1, 1), "hard_flag"),
    ((2, 2, 3, 9, 9, 3, 2, 2, 2, 1), "image_hard"),
    ((2, 3, 20, 5, 5, 3, 1, 1, 1, 1), "filter_soft"),   # C_out > BLOCK_N: several filter tiles
    ((0, 3, 4, 5, 5, 3, 1, 1, 1, 1), "filter_soft"),
]


def _conv_kw(kw):
    s, p, d = kw["stride"], kw["padding"], kw["dilation"]
    return (s, s), (p, p), (d, d), kw["groups"], kw["hard"]


@pytest.mark.parametrize("shape,gate_kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_forward_backward_interpreted(shape, gate_kind, dtype):
    tensors, kw = make_case(shape, gate_kind, dtype=dtype, bias=shape[1] != 4)
    y_ref, g_ref, dy = grads(gated_conv2d_reference, tensors, kw)
    y, _ = gated_conv2d_forward(*tensors, *_conv_kw(kw))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    out = gated_conv2d_backward(dy, *tensors, None, *_conv_kw(kw), [t is not None for t in tensors])
    got = [o for o, t in zip(out, tensors) if t is not None]
    for a, b in zip(got, g_ref):
        torch.testing.assert_close(a, b, **tol)


def test_triton_channels_last_and_partial_mask():
    tensors, kw = make_case((2, 4, 6, 6, 6, 3, 1, 1, 1, 1), "filter_soft")
    x = tensors[0].contiguous(memory_format=torch.channels_last)
    y, _ = gated_conv2d_forward(x, *tensors[1:], *_conv_kw(kw))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, gated_conv2d_reference(*tensors, **kw))
    dy = torch.randn_like(y)
    mask = [False, False, True, True, False, False]  # frozen weight_pre: its kernel branch is compiled out
    out = gated_conv2d_backward(dy, x, *tensors[1:], None, *_conv_kw(kw), mask)
    ref = gated_conv2d_backward(dy, *tensors, None, *_conv_kw(kw), [True] * 6)
    assert out[0].numel() == 0 and out[1].numel() == 0
    torch.testing.assert_close(out[2], ref[2])
    torch.testing.assert_close(out[3], ref[3])


def test_triton_kernels_compile_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "tlkernels.triton._aot"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "0 failed", r.stdout


def test_float32_dots_honour_the_tf32_setting():
    """tl.dot defaults to TF32 for float32; the kernels take PyTorch's convolution setting instead."""
    from tlkernels.selfcheck import tf32_setting
    from tlkernels.triton.gated_conv2d import dot_precision
    with tf32_setting(True):
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "ieee" and dot_precision(torch.float64) == "ieee"
    with tf32_setting(False):
        assert dot_precision(torch.float32) == "ieee"
