#pragma once
// Whether CPU tensors on this thread take the path choices CUDA tensors take (set by the op
// `_emulate_cuda(bool on) -> bool`, Python's tlkernels.ops.gated_conv2d.emulate_cuda()): no value read from the
// device where CUDA reads none, no measured choice, no CPU-only engine. Tests count that path's
// device reads and convolutions on the CPU.

namespace tlkernels {

inline bool& emulate_cuda() {
  thread_local bool on = false;
  return on;
}

// True when `t` takes the CPU tensors' path (a CPU tensor, not under emulation).
template <class T>
inline bool cpu_path(const T& t) {
  return t.is_cpu() && !emulate_cuda();
}

}  // namespace tlkernels
