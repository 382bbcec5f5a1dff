"""Loads the compiled op library and decides which backend serves each call.

`import tlkernels` never fails because `_C` is missing: the ops then fall back to their
pure-PyTorch references and `extension_status()` says what is missing and how to fix it.
"""
import warnings

import torch

from tlkernels import config

_C_ERROR = None
try:
    from tlkernels import _C  # noqa: F401  (registers torch.ops.tlkernels.* through static initialisers)
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _C = None
    _C_ERROR = e

HAS_C = _C is not None

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

_FIX = ("build it with `pip install --no-build-isolation -e .` from the repository root "
        "(needs a C++ compiler; see README)")

if not HAS_C:
    warnings.warn(f"tlkernels: the compiled extension tlkernels._C could not be loaded ({_C_ERROR}); "
                  f"ops fall back to the slow pure-PyTorch reference. To fix: {_FIX}.", RuntimeWarning,
                  stacklevel=2)

config.declare("backend", ("auto", "reference"))
def _triton_reads(text):
    """TRITON_INTERPRET as Triton itself reads it (1, true, on, yes, ...), as "1" or "0"."""
    if not HAS_TRITON:
        return "1" if text == "1" else "0"
    from triton import knobs
    return "1" if knobs.runtime.interpret else "0"


config.declare("triton_interpret", ("0", "1"), read=_triton_reads)
if HAS_C:
    config.declare_compiled(torch.ops.tlkernels._config_choices(), torch.ops.tlkernels._set_config)


def backend() -> str:
    """The `backend` setting: 'auto' (compiled CPU / Triton GPU kernels) or 'reference'."""
    return config.get("backend")


def use_reference() -> bool:
    """True under backend=reference (TLKERNELS_BACKEND), or without the compiled library (which defines the ops):
    every front end then calls its pure-PyTorch reference."""
    return not HAS_C or config.get("backend") == "reference"


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), as in our tests."""
    return config.get("triton_interpret") == "1"


def extension_status() -> str:
    """A few lines saying what is loaded: the compiled library (or why not), Triton, the backend, torch."""
    lines = [f"tlkernels._C: {'loaded' if HAS_C else 'MISSING (' + str(_C_ERROR) + '); ' + _FIX}",
             f"triton: {'available' if HAS_TRITON else 'missing (CUDA tensors use the reference)'}"
             f"{'' if HAS_C else ' (unused: without tlkernels._C every op runs its reference)'}",
             f"backend: {backend()}", f"torch: {torch.__version__}, CUDA build: {torch.version.cuda}"]
    return "\n".join(lines)
