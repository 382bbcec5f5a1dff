// Schema of the fused filter-bank histogram:
//   filterbank_histogram(images (N, C, H, W), filters (F, C, kh, kw), edges (F, bins + 1), stride, padding)
//     -> (N, F, bins) float32, each channel's histogram summing to 1 (each response pixel adds 1/(H'W')).
// Responses are computed per image and chunk of filters and binned at once: memory is bounded by one
// tile, never the batch's full responses; counting is in integers, so results are deterministic.
#include <ATen/native/ConvUtils.h>
#include <torch/library.h>

#include "ops/dispatch.h"
#include "ops/check.h"
#include "ops/histogram.h"

namespace tlkernels {

at::Tensor filterbank_histogram(const at::Tensor& images, const at::Tensor& filters, const at::Tensor& edges,
                                at::IntArrayRef stride, at::IntArrayRef padding) {
  static auto op = op_handle<decltype(filterbank_histogram)>("tlkernels::filterbank_histogram");
  return op.call(images, filters, edges, stride, padding);
}

HistogramShape check_filterbank_histogram_args(const at::Tensor& images, const at::Tensor& filters,
                                               const at::Tensor& edges, at::IntArrayRef stride,
                                               at::IntArrayRef padding) {
  const char* op = "filterbank_histogram";
  TORCH_CHECK_VALUE(images.dim() == 4, op, ": images must be 4-D (N, C, H, W), got ", images.dim(), "-D with shape ",
                    shape_str(images.sizes()));
  TORCH_CHECK_VALUE(filters.dim() == 4, op, ": filters must be 4-D (F, C, kh, kw), got ", filters.dim(),
                    "-D with shape ", shape_str(filters.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(filters.scalar_type()), op, ": filters must be a floating-point tensor, got ",
                   dtype_str(filters.scalar_type()));
  TORCH_CHECK_VALUE(filters.device() == images.device(), op, ": filters must be on device ", images.device(),
                    " (the images' device), got ", filters.device());
  TORCH_CHECK_VALUE(filters.size(1) == images.size(1), op, ": filters must have C = ", images.size(1),
                    " input channels (the images'), got ", filters.size(1));
  TORCH_CHECK_VALUE(images.size(1) >= 1, op, ": images must have at least one channel, got shape ",
                    shape_str(images.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(edges.scalar_type()), op, ": edges must be a floating-point tensor, got ",
                   dtype_str(edges.scalar_type()));
  TORCH_CHECK_VALUE(edges.dim() == 2 && edges.size(0) == filters.size(0) && edges.size(1) >= 2, op,
                    ": edges must have shape (F, bins + 1) = (", filters.size(0), ", >= 2), got ",
                    shape_str(edges.sizes()));
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 && stride[1] >= 1 &&
                        padding[0] >= 0 && padding[1] >= 0,
                    op, ": stride must be >= 1 and padding >= 0 (2 values each), got stride ", shape_str(stride),
                    " and padding ", shape_str(padding));
  const auto out = at::native::conv_output_size(images.sizes(), filters.sizes(), padding, stride);
  const int64_t OH = out[2], OW = out[3];
  TORCH_CHECK_VALUE(OH > 0 && OW > 0, op, ": images ", shape_str(images.sizes().slice(2)),
                    " are smaller than the filters ", shape_str(filters.sizes().slice(2)));
  return {images.size(0), filters.size(0), edges.size(1) - 1, OH, OW};
}

void check_edges_increasing(const at::Tensor& edges) {
  const char* msg = "filterbank_histogram: edges must be strictly increasing along each row";
  TORCH_CHECK_VALUE(!edges.is_meta(), "filterbank_histogram: edges is a meta tensor: binning needs the edge values");
  if (edges.size(1) <= 2) return;
  const at::Tensor increasing = (edges.narrow(1, 1, edges.size(1) - 1) > edges.narrow(1, 0, edges.size(1) - 1)).all();
  if (edges.is_cpu()) {
    TORCH_CHECK_VALUE(increasing.item<bool>(), msg);
  } else {
    at::_assert_async(increasing, msg);  // (no host sync on GPUs: the error comes at the next sync)
  }
}

namespace {
// Every check, for the Python front end (before the dispatcher picks a kernel by the tensors' devices) and the
// reference: meta images (tracing) skip the edges' values.
void check_only(const at::Tensor& images, const at::Tensor& filters, const at::Tensor& edges, at::IntArrayRef stride,
                at::IntArrayRef padding) {
  check_filterbank_histogram_args(images, filters, edges, stride, padding);
  if (!images.is_meta()) check_edges_increasing(edges);
}
}  // namespace

}  // namespace tlkernels

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def("filterbank_histogram(Tensor images, Tensor filters, Tensor edges, int[2] stride, int[2] padding) -> Tensor");
  m.def("_filterbank_histogram_check(Tensor images, Tensor filters, Tensor edges, int[2] stride, int[2] padding) -> ()");
}

TORCH_LIBRARY_IMPL(tlkernels, CompositeExplicitAutograd, m) {
  m.impl("_filterbank_histogram_check", &tlkernels::check_only);
}
