// _intra_op_threads() -> int: how many threads at::parallel_for really uses inside this library.
// ATen's parallel_for is a header template: compiled without OpenMP (-fopenmp) it silently runs every
// chunk on the calling thread, so a build flag slip would make all CPU kernels serial without any
// error. The test suite calls this probe to catch that.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

namespace tlkernels {
namespace {

int64_t intra_op_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 4096, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t < 64) seen.fetch_or(uint64_t{1} << t);
  });
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tlkernels, m) { m.def("_intra_op_threads() -> int", &intra_op_threads); }

}  // namespace tlkernels
