// CUDA filter-bank histogram: responses of a tile of images come from one cuDNN conv; one block per
// (image, filter) row bins them into integer counters privatised in shared memory (atomicAdd on shared
// ints: order-independent, so deterministic), then writes the normalised histogram. The binning is the
// bin_index helper the CPU build uses and tests.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/check.h"
#include "ops/common/histogram_math.h"
#include "ops/histogram.h"

namespace tlkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBins = 4096;           // shared-memory counters per block
constexpr int64_t kTileElems = 1 << 24;  // responses per conv tile (64 MB of float32)

__global__ void bin_rows_kernel(const float* __restrict__ r, const float* __restrict__ edges, float* __restrict__ out,
                                int64_t P, int F, int nb, int64_t n0) {
  extern __shared__ int counts[];
  const int64_t row = blockIdx.x;  // (image in tile) * F + filter
  const int f = static_cast<int>(row % F);
  for (int b = threadIdx.x; b < nb; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  const float* e = edges + static_cast<int64_t>(f) * (nb + 1);
  const float* rr = r + row * P;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) atomicAdd(&counts[bin_index<float>(rr[i], e, nb)], 1);
  __syncthreads();
  float* o = out + (n0 * F + row) * nb;
  const float inv = 1.0f / static_cast<float>(P);
  for (int b = threadIdx.x; b < nb; b += blockDim.x) o[b] = counts[b] * inv;
}

at::Tensor filterbank_histogram_cuda(const at::Tensor& images, const at::Tensor& filters, const at::Tensor& edges,
                                     at::IntArrayRef stride, at::IntArrayRef padding) {
  const HistogramShape sh = check_filterbank_histogram_args(images, filters, edges, stride, padding);
  const int64_t N = sh.N, F = sh.F, nb = sh.bins, OH = sh.OH, OW = sh.OW;
  TORCH_CHECK_VALUE(nb <= kMaxBins, "filterbank_histogram: at most ", kMaxBins, " bins on CUDA, got ", nb);
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor e = edges.to(at::kFloat).contiguous();
  check_edges_increasing(e);
  const at::Tensor w = filters.to(at::kFloat).contiguous();
  at::Tensor out = at::zeros({N, F, nb}, images.options().dtype(at::kFloat));
  if (N == 0 || F == 0) return out;  // (the tile size below divides by F)
  const int64_t P = OH * OW;
  const int64_t tile = std::max<int64_t>(1, kTileElems / (F * P));
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n = std::min(tile, N - n0);
    const at::Tensor r = at::conv2d(images.narrow(0, n0, n).to(at::kFloat), w, {}, stride, padding).contiguous();
    bin_rows_kernel<<<static_cast<unsigned>(n * F), kThreads, nb * sizeof(int), c10::cuda::getCurrentCUDAStream()>>>(
        r.data_ptr<float>(), e.data_ptr<float>(), out.data_ptr<float>(), P, static_cast<int>(F), static_cast<int>(nb),
        n0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CUDA, m) { m.impl("filterbank_histogram", &filterbank_histogram_cuda); }

}  // namespace tlkernels
