// Host/device portability macros shared by every op. Math written once with FA_HOST_DEVICE compiles
// into the CUDA kernels (nvcc) and into the CPU loops (the host compiler), so both paths agree.
#pragma once

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__
#define FA_INLINE __forceinline__
#else
#define FA_HOST_DEVICE
#define FA_INLINE inline
#endif

#define FA_HD FA_HOST_DEVICE FA_INLINE
