#pragma once
// Per-element binning shared by the CPU kernel and the CUDA histogram kernel: the bin of value v among
// `nbins` bins with increasing edges e[0..nbins]; values outside [e[0], e[nbins]] clamp to the end bins;
// NaN goes to the last bin (torch.bucketize's order, used by the reference).
#include "ops/common/macros.h"

namespace tlkernels {

template <typename T>
TLK_HD int bin_index(T v, const T* e, int nbins) {
  if (v != v) return nbins - 1;          // NaN: the last bin, as torch.bucketize
  if (!(v >= e[1])) return 0;
  if (v >= e[nbins - 1]) return nbins - 1;
  int lo = 1, hi = nbins - 1;            // invariant: e[lo] <= v < e[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (v >= e[mid]) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace tlkernels
