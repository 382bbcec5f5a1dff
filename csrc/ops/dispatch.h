#pragma once
// The dispatcher handle of a tlkernels op with the C++ signature F of its one declaration (ops/<op>.h):
//   static auto op = op_handle<decltype(gated_conv2d)>("tlkernels::gated_conv2d");
#include <ATen/core/dispatch/Dispatcher.h>

namespace tlkernels {

template <class F>
c10::TypedOperatorHandle<F> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

}  // namespace tlkernels
