import contextlib

import torch
import triton

from tlkernels._extension import interpret_mode


def gemm_configs():
    """Autotune configs for the implicit-GEMM kernels: Ampere-sized (BLOCK_K 32, 3-4 stages) and
    Hopper-sized (BLOCK_K 64, wider tiles). The interpreter gets one small config: every config would
    otherwise be executed, slowly, on the CPU."""
    if interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    cfg = [
        # Ampere (A100): 164 KB shared memory, 3-4 stage pipelines
        (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (32, 64, 32, 2, 5),
        # Hopper (H100): larger K tiles keep the tensor cores fed
        (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in cfg]


def device_of(t):
    """Context for a Triton launch on tensor t: Triton launches on the current CUDA device and its current
    stream, so a tensor on another GPU (cuda:1 while device 0 is current) needs its device made current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
