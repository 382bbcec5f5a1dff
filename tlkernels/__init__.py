"""tlkernels: fused CPU / Triton / CUDA kernels for adaptive fine-tuning of CNNs."""
from tlkernels._extension import HAS_C, extension_status  # noqa: F401  (loads the compiled ops first)
from tlkernels import ops  # noqa: F401
from tlkernels import nn  # noqa: F401
from tlkernels import optim  # noqa: F401
from tlkernels import methods  # noqa: F401
from tlkernels import filters, select  # noqa: F401
from tlkernels import _choices

_choices.install()  # TLKERNELS_CHOICE_CACHE: measured strategy choices saved between processes

__version__ = "0.1.0"
