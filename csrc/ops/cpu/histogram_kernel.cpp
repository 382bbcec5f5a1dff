// CPU kernel of the fused filter-bank histogram. Work item = (image, chunk of filters): one small conv
// (oneDNN) produces that tile of responses, which is binned straight away into int32 counters private to
// the item. Tiles are capped at kTileElems floats, so peak extra memory is threads x tile, whatever N is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/check.h"
#include "ops/common/histogram_math.h"

namespace tlkernels {
namespace {

constexpr int64_t kLutCells = 4096;
constexpr int64_t kTileElems = 1 << 20;  // 4 MB of float32 responses per work item (48 filters at 128x128)

at::Tensor filterbank_histogram_cpu(const at::Tensor& images, const at::Tensor& filters, const at::Tensor& edges,
                                    at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "filterbank_histogram";
  TORCH_CHECK(images.dim() == 4, op, ": images must be 4-D (N, C, H, W), got ", images.dim(), "-D");
  TORCH_CHECK(filters.dim() == 4, op, ": filters must be 4-D (F, C, kh, kw), got ", filters.dim(), "-D");
  TORCH_CHECK(filters.size(1) == images.size(1), op, ": filters must have C = ", images.size(1),
              " input channels (the images'), got ", filters.size(1));
  TORCH_CHECK(edges.dim() == 2 && edges.size(0) == filters.size(0) && edges.size(1) >= 2, op,
              ": edges must have shape (F, bins + 1) = (", filters.size(0), ", >= 2), got ", shape_str(edges.sizes()));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": stride must be >= 1 and padding >= 0 (2 values each)");
  const at::Tensor e = edges.to(at::kFloat).contiguous();
  TORCH_CHECK((e.narrow(1, 1, e.size(1) - 1) > e.narrow(1, 0, e.size(1) - 1)).all().item<bool>(), op,
              ": edges must be strictly increasing along each row");
  const int64_t N = images.size(0), F = filters.size(0), nb = e.size(1) - 1;
  const int64_t OH = (images.size(2) + 2 * padding[0] - filters.size(2)) / stride[0] + 1;
  const int64_t OW = (images.size(3) + 2 * padding[1] - filters.size(3)) / stride[1] + 1;
  TORCH_CHECK(OH > 0 && OW > 0, op, ": images ", shape_str(images.sizes().slice(2)),
              " are smaller than the filters ", shape_str(filters.sizes().slice(2)));
  at::Tensor out = at::zeros({N, F, nb}, images.options().dtype(at::kFloat));
  if (N == 0) return out;
  at::Tensor x = images.to(at::kFloat);
  at::Tensor w = filters.to(at::kFloat).contiguous();
  // Filters identical across input channels (a grey-level bank such as gabor_bank on RGB) act on the channel
  // sum: conv(x, [w0, w0, w0]) = conv(x0 + x1 + x2, w0), a third of the work.
  if (w.size(1) > 1 && at::equal(w, w.narrow(1, 0, 1).expand_as(w))) {
    x = x.sum(1, /*keepdim=*/true);
    w = w.narrow(1, 0, 1).contiguous();
  }
  const int64_t P = OH * OW;
  const int64_t fchunk = std::max<int64_t>(1, std::min<int64_t>(F, kTileElems / P));
  const int64_t nchunks = (F + fchunk - 1) / fchunk;
  const float inv = 1.0f / static_cast<float>(P);
  const float* ep = e.const_data_ptr<float>();
  float* op_ = out.mutable_data_ptr<float>();
  // Per channel, a lookup table over a uniform grid of [e1, e_{nb-1}]: cell -> bin of its left end (by the
  // shared bin_index), so binning is a multiply, a load and (rarely) a compare or two, not a binary search.
  struct Lut {
    float lo, inv;
    std::vector<int32_t> bin;
  };
  std::vector<Lut> luts(F);
  for (int64_t ch = 0; ch < F; ++ch) {
    const float* ef = ep + ch * (nb + 1);
    Lut& L = luts[ch];
    const float hi = nb > 2 ? ef[nb - 1] : ef[1] + 1.0f;
    L.lo = ef[1];
    L.inv = static_cast<float>(kLutCells) / std::max(hi - L.lo, 1e-30f);
    L.bin.resize(kLutCells);
    for (int64_t c = 0; c < kLutCells; ++c) {
      const float left = L.lo + static_cast<float>(c) / L.inv;
      int b = bin_index<float>(left, ef, static_cast<int>(nb));
      while (b > 0 && left < ef[b]) --b;  // float rounding of `left`: never start past the true bin
      L.bin[c] = b;
    }
  }
  // Items run in parallel; the conv inside each runs single-threaded (we are already in a parallel region).
  at::parallel_for(0, N * nchunks, 1, [&](int64_t ib, int64_t ie) {
    std::vector<int32_t> counts(fchunk * nb);
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t n = it / nchunks, f0 = (it % nchunks) * fchunk, fc = std::min(fchunk, F - f0);
      const at::Tensor r = at::conv2d(x.narrow(0, n, 1), w.narrow(0, f0, fc), {}, stride, padding).contiguous();
      const float* rp = r.const_data_ptr<float>();
      std::fill(counts.begin(), counts.end(), 0);
      for (int64_t f = 0; f < fc; ++f) {
        const int64_t ch = f0 + f;
        const float* ef = ep + ch * (nb + 1);
        int32_t* cf = counts.data() + f * nb;
        const float* rf = rp + f * P;
        const Lut& L = luts[ch];
        for (int64_t i = 0; i < P; ++i) {
          const float v = rf[i];
          int b;
          if (!(v >= ef[1])) {
            b = 0;
          } else if (v >= ef[nb - 1]) {
            b = static_cast<int>(nb) - 1;
          } else {  // the cell's first bin, then step over the edges inside the cell (usually none)
            const int64_t c = std::min<int64_t>(kLutCells - 1, static_cast<int64_t>((v - L.lo) * L.inv));
            b = L.bin[c];
            while (v >= ef[b + 1]) ++b;
          }
          ++cf[b];
        }
        float* of = op_ + (n * F + f0 + f) * nb;
        for (int64_t b = 0; b < nb; ++b) of[b] = static_cast<float>(cf[b]) * inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tlkernels, CPU, m) { m.impl("filterbank_histogram", &filterbank_histogram_cpu); }

}  // namespace tlkernels
