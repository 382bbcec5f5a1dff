"""Triton GPU kernels, one file per op (kernels + launcher). They serve CUDA tensors; the tests run them
on the CPU with TRITON_INTERPRET=1 on small shapes."""
