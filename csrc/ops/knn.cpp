// Schema of the kNN chunk selection: given the GEMM of a chunk, cross (Q, m), with the row and column
// constants of the expanded distance d = row_c + col_c + scale * cross, merge the chunk into the running
// best lists (Q, k) sorted by (distance, index). Distances are rounded to 2^-bits of the magnitude of their
// terms, so equal descriptors tie exactly and the lower index wins whatever the chunking.
#include <torch/library.h>

#include "ops/inplace_versions.h"

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def(
      "knn_select_chunk(Tensor cross, Tensor row_c, Tensor col_c, float scale, Tensor best_d, Tensor best_i, "
      "int base, int k, int bits) -> (Tensor, Tensor)");
  // The database side of the symmetric-KL expansion in one pass over a chunk p (m, D): out (m, 2D) receives
  // [log(p + eps), p] and the result is r(p) = 1/2 sum_k w_k p_k log(p_k + eps), per row.
  m.def("knn_expand_skl_(Tensor p, Tensor w, float eps, Tensor(a!) out) -> Tensor");
}

TORCH_LIBRARY_IMPL(tlkernels, ADInplaceOrView, m) {
  m.impl("knn_expand_skl_", tlkernels::bump_written_versions_kernel());
}
