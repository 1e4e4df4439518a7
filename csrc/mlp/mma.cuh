// Tensor-core helpers of the MLP kernels (fused_mlp.cu, mlp_layers.cu): one m16n8k16 MMA with float32
// accumulation, and packing two floats into / out of one 32-bit register of the input dtype T (bf16 or fp16).
// Fragment layout (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4): A (row-major 16 x 16) a0 = A[g][2t..2t+1],
// a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; B (16 x 8) b0 = B[2t..2t+1][g], b1 = B[2t+8..][g];
// D (16 x 8) d0, d1 = D[g][2t..2t+1], d2, d3 = D[g+8][2t..2t+1].
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace flashavatar {

// Two floats as one 32-bit register of T and back (round to nearest even).
template <typename T>
struct HalfPair;
template <>
struct HalfPair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ T2 from(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
  static __device__ __forceinline__ float2 to(T2 v) { return __bfloat1622float2(v); }
};
template <>
struct HalfPair<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ T2 from(float lo, float hi) { return __floats2half2_rn(lo, hi); }
  static __device__ __forceinline__ float2 to(T2 v) { return __half22float2(v); }
};

template <typename T>
struct Mma {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const typename HalfPair<T>::T2 v = HalfPair<T>::from(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    typename HalfPair<T>::T2 v;
    memcpy(&v, &u, 4);
    return HalfPair<T>::to(v);
  }
};

}  // namespace flashavatar
