// Schema of the fused filter-bank histogram:
//   filterbank_histogram(images (N, C, H, W), filters (F, C, kh, kw), edges (F, bins + 1), stride, padding)
//     -> (N, F, bins) float32, each channel's histogram summing to 1 (each response pixel adds 1/(H'W')).
// Responses are computed per image and chunk of filters and binned at once: memory is bounded by one
// tile, never the batch's full responses; counting is in integers, so results are deterministic.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def("filterbank_histogram(Tensor images, Tensor filters, Tensor edges, int[2] stride, int[2] padding) -> Tensor");
}
