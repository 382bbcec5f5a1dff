// Python entry point of tlkernels._C. The ops register themselves with the dispatcher through
// static initialisers (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL) when the library is loaded;
// the module itself only has to exist so that `import tlkernels._C` loads the shared object.
// Not part of the CMake (libtorch) build: C++ users link the op library directly.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "tlkernels compiled ops (registered in torch.ops.tlkernels)", -1, NULL};
  return PyModule_Create(&module_def);
}
}
