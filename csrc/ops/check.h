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

// A dtype as Python spells it (torch.float32).
inline std::string dtype_str(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

}  // namespace tlkernels
