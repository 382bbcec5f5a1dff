"""tlkernels ops. Each is a torch.library op in the `tlkernels` namespace with a fake kernel and autograd,
a C++ CPU kernel, a GPU kernel and a pure-PyTorch reference beside it (the test oracle)."""
from tlkernels.ops.gated_conv2d import gated_conv2d, gated_conv2d_reference

__all__ = ["gated_conv2d", "gated_conv2d_reference"]
