#pragma once
// Argument checks of filterbank_histogram, shared by the CPU and CUDA kernels (csrc/ops/histogram.cpp).
#include <ATen/ATen.h>

namespace tlkernels {

// The op's C++ signature, declared once: calls filterbank_histogram through the dispatcher (ops/histogram.cpp);
// every kernel is a function of the same type.
at::Tensor filterbank_histogram(const at::Tensor& images, const at::Tensor& filters, const at::Tensor& edges,
                                at::IntArrayRef stride, at::IntArrayRef padding);

struct HistogramShape {
  int64_t N, F, bins, OH, OW;  // images, filters, bins per histogram, response map size
};

// Shapes, dtypes, devices, stride and padding (ValueError / TypeError naming the op and the argument); returns
// the sizes the kernels use. The kernels check what only they can afford (the CPU kernel: edges strictly
// increasing, check_edges_increasing; the CUDA kernel: the shared-memory bin limit).
HistogramShape check_filterbank_histogram_args(const at::Tensor& images, const at::Tensor& filters,
                                               const at::Tensor& edges, at::IntArrayRef stride,
                                               at::IntArrayRef padding);

// Edges hold values (not a meta tensor) and increase strictly along each row: a host read for CPU edges, an
// asynchronous device assertion for GPU ones.
void check_edges_increasing(const at::Tensor& edges);

}  // namespace tlkernels
