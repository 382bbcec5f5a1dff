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


# Every schema written in Python (the fallback's), by op name: a test checks each against the C++ definition.
FALLBACK_SCHEMAS = {}


def ensure_op(name: str, schema: str, reference_impl):
    """Define `tlkernels::name` from `schema` if the compiled library did not, backed by the reference."""
    FALLBACK_SCHEMAS[name] = schema
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


__all__ = ["HAS_C", "ensure_op", "register_gpu", "register_gpu_fallback", "op", "has_op",
           "bump_versions_of_mutated_args"]


_VERSION_LIB = None


def bump_versions_of_mutated_args(name: str):
    """Make `tlkernels::name` bump the autograd version counter of every tensor its schema marks as written
    (`Tensor(a!)`, `Tensor(a!)[]`), as ATen's own in-place ops do.

    Why: kernels that write through data pointers (our C++/CUDA kernels, and the reference run below the
    autograd keys) leave `tensor._version` unchanged, so anything keyed on it goes stale silently: autograd's
    "modified by an inplace operation" check, and caches such as AdaFilter's folded eval weights (an
    in-place optimizer step would leave them stale). The dispatcher's ADInplaceOrView
    slot is where ATen bumps versions; this registers the same thing for our op there, then redispatches
    to the backend kernel (the pattern of torch.library.custom_op for mutable ops)."""
    global _VERSION_LIB
    if _VERSION_LIB is None:
        _VERSION_LIB = torch.library.Library("tlkernels", "IMPL")
    opover = op(name)
    written = [i for i, a in enumerate(opover._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    below = torch._C._after_ADInplaceOrView_keyset

    def kernel(keyset, *args):
        for i in written:
            torch.autograd.graph.increment_version(args[i])  # a tensor or a list of tensors
        return opover.redispatch(keyset & below, *args)

    _VERSION_LIB.impl(name, kernel, "ADInplaceOrView", with_keyset=True)


def register_gpu_fallback(name: str, reference_impl, triton_impl=None):
    """For ops with a CUDA C++ kernel: CUDA tensors use it when the compiled library registered one for `name`,
    else the Triton kernel (if given and Triton is importable), else the reference."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"tlkernels::{name}", "CUDA"):
        if triton_impl is not None:
            register_gpu(name, triton_impl, reference_impl)
        else:
            torch.library.register_kernel(f"tlkernels::{name}", "cuda", reference_impl)
