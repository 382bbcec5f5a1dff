#pragma once
#include <ATen/ATen.h>
#include <sstream>
#include <string>

namespace tlkernels {

// Error messages name the op, the argument, what was expected and what came.
inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// Output size of a convolution along one dimension (PyTorch's formula; <= 0 when the kernel does not fit).
inline int64_t conv_output_dim(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation = 1) {
  return (in + 2 * padding - (dilation * (kernel - 1) + 1)) / stride + 1;
}

}  // namespace tlkernels
