"""Registration of the tlkernels ops with torch.library: one statement per op (`register_op`) states its schema,
its pure-PyTorch fallback, where CUDA tensors go, its fake kernel, its autograd and whether it writes its
arguments; `OPS` keeps what each op was registered with.

The schemas live in C++ (csrc/ops/<op>.cpp, TORCH_LIBRARY_FRAGMENT) so that C++ users get the same ops. When
the compiled library is missing, the same schema strings are defined here and every device gets the fallback
(the pure-PyTorch reference), so the public API keeps working (slowly). A test checks every schema written here
against the C++ definition.
"""
from dataclasses import dataclass

import torch

from tlkernels._extension import HAS_C, HAS_TRITON

__all__ = ["HAS_C", "OPS", "register_op", "op", "has_op"]

_LIB = None  # the fallback's definitions
_VERSION_LIB = None  # the version-counter kernels of ops that write their arguments

# CUDA paths (register_op's `cuda`):
COMPILED = "compiled"  # the compiled library's CUDA kernel (ATen strategies or a .cu kernel); without one, the
#                        Triton kernel when given and importable, else the fallback
TRITON = "triton"      # the Triton kernel when importable, else the fallback
EVERYWHERE = "fallback"  # the fallback on every device (the op's only kernel: the Triton ops, the fallbacks)


@dataclass(frozen=True)
class OpInfo:
    schema: str            # the schema (None: defined by the compiled library only)
    cuda: str              # COMPILED, TRITON or EVERYWHERE; what CUDA tensors run (see cuda_kernel)
    cuda_kernel: str       # what was registered for CUDA tensors in this process
    fake: bool             # a fake kernel is registered (torch.compile, torch.export, opcheck)
    autograd: str          # "python", "c++" (csrc/ops/*_autograd.cpp) or "none"
    mutates: bool          # writes arguments in place (their version counters are bumped)


OPS = {}


def has_op(name: str) -> bool:
    return hasattr(torch.ops.tlkernels, name)


def op(name: str):
    return getattr(torch.ops.tlkernels, name).default


def register_op(name, schema, fallback, *, cuda, fake, triton=None, autograd=None, mutates=False):
    """Register `tlkernels::name`, every piece stated.

    schema    its schema string (as the C++ TORCH_LIBRARY_FRAGMENT writes it); None: an op of the compiled
              library only, registered here only when it loaded
    fallback  the pure-PyTorch kernel, for every device when the compiled library does not define the op
    cuda      COMPILED, TRITON or EVERYWHERE (above); `triton` is the Triton kernel they refer to
    fake      the fake kernel (output shapes, dtypes and strides as every real kernel returns them)
    autograd  (backward, setup_context), or None for ops without a derivative. Ops whose autograd the compiled
              library registers in C++ keep it; the Python pair then serves the fallback.
    mutates   the op writes arguments its schema marks `(a!)`: bump their autograd version counters
    """
    if schema is None and not has_op(name):
        return
    defined_here = not has_op(name)
    if defined_here:
        global _LIB
        _LIB = _LIB or torch.library.Library("tlkernels", "FRAGMENT")
        _LIB.define(schema)
        _LIB.impl(name, fallback, "CompositeExplicitAutograd")
    qualname = f"tlkernels::{name}"
    if cuda == EVERYWHERE:
        cuda_kernel = "fallback"
    elif cuda == COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
        cuda_kernel = "compiled"
    elif cuda in (COMPILED, TRITON):
        use_triton = triton is not None and HAS_TRITON
        torch.library.register_kernel(qualname, "cuda", triton if use_triton else fallback)
        cuda_kernel = "triton" if use_triton else "fallback"
    else:
        raise ValueError(f"register_op({name!r}): cuda must be {COMPILED!r}, {TRITON!r} or {EVERYWHERE!r}, "
                         f"got {cuda!r}")
    torch.library.register_fake(qualname)(fake)
    if autograd is None:
        grad = "none"
    elif torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
        grad = "c++"
    else:
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        grad = "python"
    if mutates:
        _bump_versions_of_mutated_args(name)
    OPS[name] = OpInfo(schema, cuda, cuda_kernel, True, grad, mutates)


def _bump_versions_of_mutated_args(name: str):
    """Make `tlkernels::name` bump the autograd version counter of every tensor its schema marks as written
    (`Tensor(a!)`, `Tensor(a!)[]`), as ATen's own in-place ops do.

    Why: kernels that write through data pointers (our C++/CUDA kernels, and the reference run below the
    autograd keys) leave `tensor._version` unchanged, so anything keyed on it goes stale silently: autograd's
    "modified by an inplace operation" check, and caches such as AdaFilter's folded eval weights (an
    in-place optimizer step would leave them stale). The dispatcher's ADInplaceOrView
    slot is where ATen bumps versions; this registers the same thing for our op there, then redispatches
    to the backend kernel (the pattern of torch.library.custom_op for mutable ops)."""
    global _VERSION_LIB
    _VERSION_LIB = _VERSION_LIB or torch.library.Library("tlkernels", "IMPL")
    opover = op(name)
    written = [i for i, a in enumerate(opover._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    below = torch._C._after_ADInplaceOrView_keyset

    def kernel(keyset, *args):
        for i in written:
            torch.autograd.graph.increment_version(args[i])  # a tensor or a list of tensors
        return opover.redispatch(keyset & below, *args)

    _VERSION_LIB.impl(name, kernel, "ADInplaceOrView", with_keyset=True)
