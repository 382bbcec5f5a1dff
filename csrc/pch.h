// The headers nearly every source of the compiled library includes, compiled once per build (a precompiled
// header: tools/pch.py for setup.py's GCC build, target_precompile_headers in CMakeLists.txt). Parsing them is
// most of each file's compile time. Sources still include what they use; this file only makes that cheaper.
#include <ATen/ATen.h>
#include <torch/library.h>
