"""Helpers for registering tlkernels ops with torch.library.

The schemas live in C++ (csrc/ops/*.cpp, TORCH_LIBRARY_FRAGMENT) so that C++ users get the same
ops. When the compiled library is missing, the same schema strings are defined here and every
device gets the pure-PyTorch reference, so the public API keeps working (slowly).
"""
import torch

from tlkernels._extension import HAS_C, HAS_TRITON

_LIB = None


def _fallback_lib():
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("tlkernels", "FRAGMENT")
    return _LIB


def has_op(name: str) -> bool:
    return hasattr(torch.ops.tlkernels, name)


def ensure_op(name: str, schema: str, reference_impl):
    """Define `tlkernels::name` from `schema` if the compiled library did not, backed by the reference."""
    if has_op(name):
        return False
    lib = _fallback_lib()
    lib.define(schema)
    lib.impl(name, reference_impl, "CompositeExplicitAutograd")
    return True


def register_gpu(name: str, triton_impl, reference_impl):
    """CUDA tensors go to the Triton kernel when Triton is importable, else to the reference."""
    torch.library.register_kernel(f"tlkernels::{name}", "cuda", triton_impl if HAS_TRITON else reference_impl)


def op(name: str):
    return getattr(torch.ops.tlkernels, name).default


__all__ = ["HAS_C", "ensure_op", "register_gpu", "op", "has_op"]


def register_gpu_fallback(name: str, reference_impl):
    """CUDA tensors use the reference unless the compiled library registered a CUDA kernel for `name`."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"tlkernels::{name}", "CUDA"):
        torch.library.register_kernel(f"tlkernels::{name}", "cuda", reference_impl)
