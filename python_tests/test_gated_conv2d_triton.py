"""The Triton kernels against the float64 reference: compiled on CUDA tensors where a GPU is visible (the tests
marked `cuda`), else executed by the interpreter (TRITON_INTERPRET=1, set in conftest) on CPU tensors; plus AOT
compilation for sm80/sm90 in a subprocess."""
import os
import sys

import pytest
import torch

from tlkernels.ops import gated_conv2d_reference
from tlkernels.triton.gated_conv2d import gated_conv2d_backward, gated_conv2d_forward

from conftest import DEVICE, background_result, start_background
from test_gated_conv2d import grads, make_case as make_case_cpu


@pytest.fixture(autouse=True)
def _full_fp32():
    """float32 tolerances below assume float32 arithmetic: TF32 off for the compiled kernels and cuDNN."""
    from tlkernels.ops._utils import full_fp32
    with full_fp32():
        yield


def make_case(*args, **kwargs):
    """test_gated_conv2d's case on DEVICE (the reference's gradients are computed there too)."""
    tensors, kw = make_case_cpu(*args, **kwargs)
    return tuple(None if t is None else t.to(DEVICE) for t in tensors), kw

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


@pytest.mark.cuda
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


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 4, 6, 6, 6, 3, 1, 1, 1, 1), (2, 5, 6, 9, 8, 3, 2, 2, 2, 1),
                                   (1, 4, 4, 7, 7, 1, 2, 0, 1, 1)])  # stride 2 (and dilation): the dx phases
def test_triton_channels_last_and_partial_mask(shape):
    tensors, kw = make_case(shape, "filter_soft")
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


def start_aot(key, *args):
    """`python -m tlkernels.triton._aot *args` beside the suite (the compiler, not the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start_background(key, [sys.executable, "-m", "tlkernels.triton._aot", *args], env=env)


def assert_aot_passed(key, timeout):
    """The AOT run started under `key` exited 0 and reported no failure."""
    with background_result(key, timeout=timeout) as (returncode, stdout, stderr, _):
        assert returncode == 0, stdout[-4000:] + stderr[-2000:]
        assert stdout.splitlines()[-1] == "0 failed", stdout[-2000:]


def start_aot_kernels():
    start_aot("aot-kernels")


@pytest.mark.background.with_args(start_aot_kernels)  # (compiles beside the suite from its start)
def test_triton_kernels_compile_for_ampere_and_hopper():
    start_aot_kernels()  # (run alone, the test starts it now)
    assert_aot_passed("aot-kernels", timeout=900)


def test_float32_dots_honour_the_tf32_setting():
    """tl.dot defaults to TF32 for float32; the kernels take PyTorch's convolution setting instead."""
    from tlkernels.selfcheck import tf32_setting
    from tlkernels.triton.gated_conv2d import dot_precision
    with tf32_setting(True):
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "ieee" and dot_precision(torch.float64) == "ieee"
    with tf32_setting(False):
        assert dot_precision(torch.float32) == "ieee"


def test_autotune_keeps_only_configs_that_fit(settings):
    """Autotuning launches, per kernel and dtype, only the configs that compiled for sm80 and sm90 within shared
    memory and without register spills (tlkernels/triton/fitting_configs.json, measured by the AOT sweep)."""
    import triton
    from tlkernels.triton._common import GEMM_CONFIGS, TRITON_DTYPE, config_key, fitting_configs, prune_to_fitting
    table = fitting_configs()
    for kernel in ("fwd", "dx", "dw", "dgate"):
        for dt in ("fp32", "bf16", "fp16", "fp64"):
            assert table.get((kernel, dt)), (kernel, dt)
            assert table[(kernel, dt)] <= set(GEMM_CONFIGS)
    # the measured rows behind the table: a kept config fits on both targets, a dropped one does not
    import json
    from tlkernels.triton._common import FITTING_FILE
    rows = json.load(open(FITTING_FILE))["measured"]
    for r in rows:
        if tuple(r["config"]) in table[(r["kernel"], r["dtype"])]:
            assert r["fits"] and r["spills"] == 0 and r["shared"] <= {80: 166912, 90: 232448}[r["cc"]]
    # the prune hook picks by the dtype of the launch's tensor argument
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
               for m, n, k, w, s in GEMM_CONFIGS]
    prune = prune_to_fitting("fwd", "x_ptr")["early_config_prune"]
    settings(triton_interpret="0")  # (the compiler's configs, not the interpreter's single one)
    for dtype, name in TRITON_DTYPE.items():
        kept = prune(configs, {"x_ptr": torch.empty(1, dtype=dtype)})
        assert {config_key(c) for c in kept} == table[("fwd", name)]


def start_aot_configs():
    start_aot("aot-configs", "--configs")


@pytest.mark.background.with_args(start_aot_configs)  # (compiles beside the suite from its start)
def test_every_fitting_config_compiles_within_limits():
    """AOT: every config autotuning may launch, for float32, bfloat16, float16 and float64, compiled for sm80 and
    sm90 (Triton's compiler and ptxas, no GPU): shared memory within the target's limit, no register spills."""
    start_aot_configs()  # (run alone, the test starts it now)
    assert_aot_passed("aot-configs", timeout=1500)


@pytest.mark.cuda
def test_triton_split_reductions_equal_one_pass(monkeypatch):
    """Split-K weight gradients and split gate gradients (several programs per reduction, a second pass adding
    the partial sums) give the reference's gradients, and the same as one split."""
    import tlkernels.triton.gated_conv2d as tg
    tensors, kw = make_case((3, 4, 6, 9, 9, 3, 1, 1, 1, 1), "filter_soft", dtype=torch.float64)
    y_ref, g_ref, dy = grads(gated_conv2d_reference, tensors, kw)
    mask = [t is not None for t in tensors]
    monkeypatch.setattr(tg, "MIN_SPLIT_ROWS", 32)
    dev = torch.device(DEVICE)
    monkeypatch.setattr(tg, "INTERPRETER_SMS", 4)
    if dev.type == "cuda":  # (as many splits as in the interpreter: the SM count is what decides them)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"multi_processor_count": 4}))
    assert tg.row_splits(3 * 81, 1, dev)[0] > 1 and tg.row_splits(81, 3, dev)[0] > 1
    split = gated_conv2d_backward(dy, *tensors, None, *_conv_kw(kw), mask)
    monkeypatch.setattr(tg, "MIN_SPLIT_ROWS", 10 ** 9)
    one = gated_conv2d_backward(dy, *tensors, None, *_conv_kw(kw), mask)
    for a, b, r in zip([o for o, t in zip(split, tensors) if t is not None],
                       [o for o, t in zip(one, tensors) if t is not None], g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
def test_triton_nan_hard_gates_give_nan_as_the_reference():
    """A NaN hard gate gives NaN outputs and gradients where the blend formula does (the op's contract)."""
    tensors, kw = make_case((2, 3, 4, 6, 6, 3, 1, 1, 1, 1), "hard_flag", dtype=torch.float64)
    tensors = list(tensors)
    tensors[3] = tensors[3].detach().clone()
    tensors[3].view(-1)[1] = float("nan")
    y_ref, g_ref, dy = grads(gated_conv2d_reference, tensors, kw)
    y, _ = gated_conv2d_forward(*tensors, *_conv_kw(kw))
    assert y.isnan().any()
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    out = gated_conv2d_backward(dy, *tensors, None, *_conv_kw(kw), [t is not None for t in tensors])
    for a, b in zip([o for o, t in zip(out, tensors) if t is not None], g_ref):
        torch.testing.assert_close(a, b, equal_nan=True)
