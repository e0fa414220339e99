// EPX_HD: marks functions usable from host and device code (plain C++ when not compiled by nvcc).
#pragma once
#if defined(__CUDACC__)
#define EPX_HD __host__ __device__ __forceinline__
#else
#define EPX_HD inline
#endif
