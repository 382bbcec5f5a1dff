"""The Python side of the tlkernels ops: one statement per op (`register_op`) states where CUDA tensors go,
its reference, its fake kernel, its autograd when Python owns it, whether it writes its arguments and its
samples (the inputs every op's tests run: python_tests/test_op_samples.py); `OPS` keeps what each op was
registered with.

The compiled library (csrc/ops) owns every compiled op's schema, argument checks and CPU kernel, and the
autograd of cross_entropy and joint_cross_entropy. Without the compiled library none of these ops exists:
the front ends then call the pure-PyTorch references (`_extension.use_reference()`), so the public API keeps
working (slowly). The Triton kernels the compiled gated convolution runs are ops defined here
(`define_like`), their schemas derived from the compiled op's.
"""
from dataclasses import dataclass

import torch

from tlkernels._extension import HAS_C, HAS_TRITON

__all__ = ["HAS_C", "OPS", "register_op", "define_like", "op", "has_op"]

_LIB = None  # the definitions of the Python-only ops

# CUDA paths (register_op's `cuda`):
COMPILED = "compiled"  # the compiled library's CUDA kernel (ATen strategies or a .cu kernel); in a build without
#                        CUDA, the Triton kernel when given and importable, else the reference
TRITON = "triton"      # the Triton kernel when importable, else the reference
ONE_KERNEL = "one kernel"  # the op has one kernel for every device (the Triton ops)
CPU_ONLY = "cpu only"  # a helper of a front end that sends it CPU tensors only (the kNN search's)


@dataclass(frozen=True)
class OpInfo:
    owner: str             # "c++" (csrc/ops defines the op) or "python" (define_like)
    cuda: str              # COMPILED, TRITON, ONE_KERNEL or CPU_ONLY; what CUDA tensors run (see cuda_kernel)
    cuda_kernel: str       # what was registered for CUDA tensors in this process
    fake: bool             # a fake kernel is registered (torch.compile, torch.export, opcheck)
    autograd: str          # "python", "c++" (csrc/ops/*_autograd.cpp) or "none"
    mutates: bool          # writes arguments in place (their version counters are bumped)
    reference: object      # the pure-PyTorch kernel with the op's signature (None: none)
    samples: object        # samples() -> [argument tuples]: every op's tests (python_tests/test_op_samples.py)


OPS = {}


def has_op(name: str) -> bool:
    return hasattr(torch.ops.tlkernels, name)


def op(name: str):
    return getattr(torch.ops.tlkernels, name).default


def define_like(name, like, kernel, fake):
    """Define the Python-only op `tlkernels::name` with the schema of the compiled op `like` (the Triton kernels
    of the compiled gated convolution's `triton` strategy), one kernel for every device; its reference and
    samples are `like`'s. Nothing is defined where Triton does not import (the strategy then says so)."""
    if not has_op(like) or not HAS_TRITON:
        return
    global _LIB
    _LIB = _LIB or torch.library.Library("tlkernels", "FRAGMENT")
    schema = str(op(like)._schema).split("::", 1)[1]
    _LIB.define(name + schema[len(like):])
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    register_op(name, OPS[like].reference, cuda=ONE_KERNEL, fake=fake, samples=OPS[like].samples, owner="python")


def register_op(name, reference, *, cuda, fake, samples, triton=None, autograd=None, mutates=False, owner="c++"):
    """Complete `tlkernels::name`, every piece stated (nothing when the compiled library, which defines the op,
    is not loaded).

    reference the pure-PyTorch kernel CUDA tensors run where neither a compiled nor a Triton kernel serves them
    cuda      COMPILED, TRITON, ONE_KERNEL or CPU_ONLY (above); `triton` is the Triton kernel they refer to
    fake      the fake kernel (output shapes, dtypes and strides as every real kernel returns them)
    autograd  (backward, setup_context) for ops whose derivative Python owns; None for ops without one or whose
              autograd the compiled library registers (csrc/ops/*_autograd.cpp)
    mutates   the op writes arguments its schema marks `(a!)` (the compiled library bumps their autograd version
              counters: csrc/ops/inplace_versions.h)
    samples   samples() -> a list of argument tuples, small and deterministic, covering the op's argument kinds
              (one test checks each against the reference, with opcheck and, for differentiable ops, gradcheck)
    """
    if not has_op(name):
        return
    qualname = f"tlkernels::{name}"
    if cuda in (ONE_KERNEL, CPU_ONLY):
        cuda_kernel = "one kernel" if cuda == ONE_KERNEL else "none"
    elif cuda == COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
        cuda_kernel = "compiled"
    elif cuda in (COMPILED, TRITON):
        use_triton = triton is not None and HAS_TRITON
        torch.library.register_kernel(qualname, "cuda", triton if use_triton else reference)
        cuda_kernel = "triton" if use_triton else "reference"
    else:
        raise ValueError(f"register_op({name!r}): cuda must be {COMPILED!r}, {TRITON!r}, {ONE_KERNEL!r} or "
                         f"{CPU_ONLY!r}, got {cuda!r}")
    torch.library.register_fake(qualname)(fake)
    if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
        grad = "c++"
    elif autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        grad = "python"
    else:
        grad = "none"
    OPS[name] = OpInfo(owner, cuda, cuda_kernel, True, grad, mutates, reference, samples)
