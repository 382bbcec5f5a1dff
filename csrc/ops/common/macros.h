#pragma once
// Per-element math shared by the CPU and CUDA builds: the CPU build compiles (and the tests
// exercise) exactly the same helper the CUDA kernels call.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define TLK_HD __host__ __device__ __forceinline__
#else
#define TLK_HD inline
#endif
