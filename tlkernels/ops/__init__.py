"""tlkernels ops. Each is a torch.library op in the `tlkernels` namespace with a fake kernel and autograd,
a C++ CPU kernel, a GPU kernel and a pure-PyTorch reference beside it (the test oracle)."""
from tlkernels.ops.cross_entropy import cross_entropy, cross_entropy_reference, joint_cross_entropy
from tlkernels.ops.gated_conv2d import gated_conv2d, gated_conv2d_reference
from tlkernels.ops.l2sp import l2sp_penalty, l2sp_penalty_reference, l2sp_value_and_grad

__all__ = ["gated_conv2d", "gated_conv2d_reference", "l2sp_penalty", "l2sp_penalty_reference", "l2sp_value_and_grad",
           "cross_entropy", "cross_entropy_reference", "joint_cross_entropy"]
from tlkernels.ops.histogram import filterbank_histogram, filterbank_histogram_reference  # noqa: E402
from tlkernels.ops.knn import KnnIndex, knn_search, knn_search_reference  # noqa: E402
from tlkernels.ops.bins import fit_bin_edges  # noqa: E402

__all__ += ["KnnIndex", "filterbank_histogram", "filterbank_histogram_reference", "knn_search", "knn_search_reference",
            "fit_bin_edges"]
