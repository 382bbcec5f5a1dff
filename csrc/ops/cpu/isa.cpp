// The cap on the instruction set of the hand-written CPU paths (ops/cpu/avx2.h reads it).
#include "ops/config.h"

namespace tlkernels {
extern const config::Setting kCpuIsa;
const config::Setting kCpuIsa("cpu_isa", {"native", "avx512", "avx2", "scalar"});
}  // namespace tlkernels
