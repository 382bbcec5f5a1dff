import contextlib
import json
import os

import torch
import triton

from tlkernels._extension import interpret_mode


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The implicit-GEMM kernels gather the activation tile
# with per-element addresses and blend the weight tile per image, so they need far more registers than a plain
# GEMM: 2-stage pipelines, BLOCK_K 16-32 and 8 warps for 64x64 tiles and larger.
GEMM_CONFIGS = [
    (64, 64, 32, 8, 2), (64, 64, 16, 4, 2), (32, 64, 32, 4, 2), (64, 32, 32, 4, 2), (32, 32, 32, 4, 2),
    (128, 64, 16, 8, 2), (64, 128, 16, 8, 2), (128, 128, 16, 8, 2), (32, 32, 32, 8, 2), (32, 32, 16, 4, 2),
]


def gemm_configs():
    """Autotune configs for the implicit-GEMM kernels: Ampere-sized (BLOCK_K 32, 3-4 stages) and
    Hopper-sized (BLOCK_K 64, wider tiles). The interpreter gets one small config: every config would
    otherwise be executed, slowly, on the CPU."""
    if interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in GEMM_CONFIGS]


def device_of(t, op="the Triton kernels"):
    """Context for a Triton launch on tensor t: Triton launches on the current CUDA device and its current
    stream, so a tensor on another GPU (cuda:1 while device 0 is current) needs its device made current. CPU
    tensors run only in Triton's interpreter (TRITON_INTERPRET=1)."""
    if t.device.type != "cuda" and not interpret_mode():
        raise ValueError(f"{op}: the Triton kernels run CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                         f"got a {t.device} tensor")
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# The configs that fit, per kernel and dtype: compiled for sm80 and sm90, shared memory within the target's limit
# and no register spills (`python -m tlkernels.triton._aot --sweep --write` measures and writes this file).
FITTING_FILE = os.path.join(os.path.dirname(__file__), "fitting_configs.json")
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def fitting_configs():
    """{(kernel, dtype): set of config tuples} from FITTING_FILE."""
    with open(FITTING_FILE) as fh:
        data = json.load(fh)
    return {(k, d): {tuple(c) for c in cs} for k, by_dtype in data["fits"].items() for d, cs in by_dtype.items()}


def config_key(c):
    """A triton.Config as the tuple (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of GEMM_CONFIGS."""
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def prune_to_fitting(kernel, tensor_arg):
    """Autotune `prune_configs_by` for `kernel` ("fwd", "dx", "dw", "dgate"): keeps the configs that fit for the
    dtype of argument `tensor_arg`, so autotuning never launches a config that spills or exceeds shared memory."""
    table = fitting_configs()

    def prune(configs, named_args, **kwargs):
        if interpret_mode():  # the interpreter's single small config
            return configs
        keep = table.get((kernel, TRITON_DTYPE.get(named_args[tensor_arg].dtype)), set())
        return [c for c in configs if config_key(c) in keep]
    return {"early_config_prune": prune}
