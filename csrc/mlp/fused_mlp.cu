// CUDA fused_mlp (contract in fused_mlp.h). Why: through cuBLAS each of the six layers is one GEMM whose
// activations make a round trip through memory, and at 64 frames of a uv-128 avatar (927k rows) that ran at
// ~246 TFLOP/s, a quarter of the bf16 peak (benchmarks/NOTES_end_to_end.md). Here a block keeps its 128 rows'
// activations in shared memory through every layer; only the weights (128 KB per layer, L2-resident) and the
// first layer's inputs are read, and only the outputs are written.
//
// Measured (H200, uv 128, bf16, graph replay; benchmarks/NOTES_end_to_end.md): level with cuBLAS, not faster:
// 2.53 ms at batch 64 (242 TFLOP/s) against 2.48, 0.064 ms at batch 1 against 0.066; since the first and last
// layers became their own one-pass ops (mlp_layers.cu) the unfused path takes 1.71 ms against this kernel's 2.57.
// So the Animator keeps the GEMMs by default (fused_mlp=False). This kernel is now bound by its own issue rate:
// one block per SM (198 KB), 8 warps, no overlap of the next k-step's fragment loads with the MMAs, 32-bit shared
// loads instead of ldmatrix.
// Next: ldmatrix.x4 fragments, k-slices of the weights double-buffered (so two blocks fit per SM), then wgmma.
//
// Block: 256 threads = 8 warps over a 128 x 256 output tile, warp w computing rows 32 (w % 4) .. + 32 and columns
// 128 (w / 4) .. + 128 with mma.sync m16n8k16 (f32 accumulation). Shared memory: activations [128][264] and one
// layer's weights [256][264] in the input dtype; rows padded by 8 elements so the fragment loads (32-bit words at
// row g, column 2t of each 16 x 16 / 16 x 8 tile) fall on 32 different banks. A layer: MMAs over k, barrier, the
// next layer's weights start streaming in (cp.async) while the epilogue writes relu(acc + bias) back over the
// activations, barrier. The output layer (O <= 16 columns, zero-padded rows of W) is one 16 x 16 tile per warp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/types.h>

#include <atomic>
#include <cstring>

#include "mlp/fused_mlp.h"
#include "mlp/mma.cuh"

namespace flashavatar {
namespace {

constexpr int kH = static_cast<int>(kFusedMlpWidth);
constexpr int kRows = 128;        // rows per block
constexpr int kThreads = 256;     // 8 warps
constexpr int kStride = kH + 8;   // shared-memory row stride, elements
constexpr int kOutRows = 16;      // the output layer's weight rows in shared memory (zero beyond O)
constexpr size_t kSmemBytes = size_t(kRows + kH) * kStride * 2;  // 202,752 B

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem_src));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Rows [0, n_rows) of a [n_rows, 256] weight matrix into `wts` (asynchronously), rows [n_rows, pad_rows) zeroed.
template <typename T>
__device__ __forceinline__ void load_weights(T* wts, const T* __restrict__ w, int n_rows, int pad_rows) {
  for (int c = threadIdx.x; c < pad_rows * (kH / 8); c += kThreads) {
    const int r = c / (kH / 8), k = (c % (kH / 8)) * 8;
    T* dst = wts + r * kStride + k;
    if (r < n_rows)
      cp_async16(dst, w + static_cast<int64_t>(r) * kH + k);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
  cp_async_commit();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    fused_mlp_kernel(const T* __restrict__ h_pe /* [N, H] */, const T* __restrict__ cond /* [B, H] */,
                     const T* __restrict__ w_hidden /* [L, H, H] */, const float* __restrict__ b_hidden /* [L, H] */,
                     const T* __restrict__ w_out /* [O, H] */, const float* __restrict__ b_out /* [O] */,
                     float* __restrict__ out /* [B * N, O] */, int64_t rows, int64_t n_gauss, int n_layers,
                     int n_out) {
  using M = Mma<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* act = reinterpret_cast<T*>(smem_raw);  // [kRows][kStride]
  T* wts = act + kRows * kStride;           // [kH][kStride]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates: row group, thread in group
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  if (n_layers > 0)
    load_weights(wts, w_hidden, kH, kH);
  else
    load_weights(wts, w_out, n_out, kOutRows);
  // first layer: relu(h_pe[g] + cond[f]) for the block's rows, 8 elements per 16-byte load (rows past the end: 0)
  for (int c = threadIdx.x; c < kRows * (kH / 8); c += kThreads) {
    const int r = c / (kH / 8), k = (c % (kH / 8)) * 8;
    const int64_t row = row0 + r;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row < rows) {
      const int64_t f = row / n_gauss, gi = row - f * n_gauss;
      const uint4 a = *reinterpret_cast<const uint4*>(h_pe + gi * kH + k);
      const uint4 b = *reinterpret_cast<const uint4*>(cond + f * kH + k);
      const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
      uint32_t ov[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 x = M::unpack(av[q]), y = M::unpack(bv[q]);
        ov[q] = M::pack(fmaxf(x.x + y.x, 0.f), fmaxf(x.y + y.y, 0.f));
      }
      v = make_uint4(ov[0], ov[1], ov[2], ov[3]);
    }
    *reinterpret_cast<uint4*>(act + r * kStride + k) = v;
  }
  cp_async_wait_all();
  __syncthreads();

  // hidden layers: warp tile 32 rows x 128 columns = 2 x 16 MMA tiles of 16 x 8
  const int wm = (warp & 3) * 32, wn = (warp >> 2) * 128;
  for (int l = 0; l < n_layers; ++l) {
    float acc[2][16][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 16; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
#pragma unroll 2
    for (int k0 = 0; k0 < kH; k0 += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const T* p = act + (wm + mt * 16 + g) * kStride + k0 + 2 * t;
        a[mt][0] = ld32(p);                    // row g,     k 2t..2t+1
        a[mt][1] = ld32(p + 8 * kStride);      // row g + 8, k 2t..2t+1
        a[mt][2] = ld32(p + 8);                // row g,     k 2t+8..2t+9
        a[mt][3] = ld32(p + 8 * kStride + 8);  // row g + 8, k 2t+8..2t+9
      }
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const T* p = wts + (wn + nt * 8 + g) * kStride + k0 + 2 * t;  // B[k][n] = W[n][k]: column n = row n of W
        const uint32_t b[2] = {ld32(p), ld32(p + 8)};
        M::run(acc[0][nt], a[0], b);
        M::run(acc[1][nt], a[1], b);
      }
    }
    __syncthreads();  // every warp is done with this layer's activations and weights
    if (l + 1 < n_layers)
      load_weights(wts, w_hidden + static_cast<int64_t>(l + 1) * kH * kH, kH, kH);
    else
      load_weights(wts, w_out, n_out, kOutRows);
    const float* bias = b_hidden + static_cast<int64_t>(l) * kH;
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const int col = wn + nt * 8 + 2 * t;
      const float b0 = bias[col], b1 = bias[col + 1];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r = wm + mt * 16 + g;
        *reinterpret_cast<uint32_t*>(act + r * kStride + col) =
            M::pack(fmaxf(acc[mt][nt][0] + b0, 0.f), fmaxf(acc[mt][nt][1] + b1, 0.f));
        *reinterpret_cast<uint32_t*>(act + (r + 8) * kStride + col) =
            M::pack(fmaxf(acc[mt][nt][2] + b0, 0.f), fmaxf(acc[mt][nt][3] + b1, 0.f));
      }
    }
    cp_async_wait_all();
    __syncthreads();
  }

  // output layer: warp w takes rows 16 w .. + 16, all (<= 16) output columns as two 16 x 8 tiles
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const int rm = warp * 16;
#pragma unroll 4
  for (int k0 = 0; k0 < kH; k0 += 16) {
    const T* p = act + (rm + g) * kStride + k0 + 2 * t;
    const uint32_t a[4] = {ld32(p), ld32(p + 8 * kStride), ld32(p + 8), ld32(p + 8 * kStride + 8)};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const T* q = wts + (nt * 8 + g) * kStride + k0 + 2 * t;
      const uint32_t b[2] = {ld32(q), ld32(q + 8)};
      M::run(acc[nt], a, b);
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);
      const int64_t row = row0 + rm + g + (e >> 1) * 8;
      if (col < n_out && row < rows) out[row * n_out + col] = acc[nt][e] + b_out[col];
    }
}

}  // namespace

at::Tensor fused_mlp_cuda(const at::Tensor& h_pe_in, const at::Tensor& cond_in, const at::Tensor& w_hidden_in,
                          const at::Tensor& b_hidden_in, const at::Tensor& w_out_in, const at::Tensor& b_out_in) {
  const char* op = "flashavatar::fused_mlp";
  check_fused_mlp_args(op, h_pe_in, cond_in, w_hidden_in, b_hidden_in, w_out_in, b_out_in);
  const c10::cuda::CUDAGuard guard(h_pe_in.device());
  const at::Tensor h_pe = h_pe_in.contiguous(), cond = cond_in.contiguous(), w_hidden = w_hidden_in.contiguous(),
                   b_hidden = b_hidden_in.contiguous(), w_out = w_out_in.contiguous(), b_out = b_out_in.contiguous();
  for (const at::Tensor* t : {&h_pe, &cond, &w_hidden, &w_out})  // 16-byte vector loads and cp.async
    FA_CHECK(op, reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "inputs must be 16-byte aligned");
  const int64_t B = cond.size(0), N = h_pe.size(0), O = w_out.size(0), rows = B * N;
  at::Tensor out = at::empty({B, N, O}, h_pe.options().dtype(at::kFloat));
  if (rows == 0) return out;
  int dev = 0, smem_optin = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  FA_CHECK(op, major >= 8 && static_cast<size_t>(smem_optin) >= kSmemBytes,
           "needs an sm_80+ GPU with ", kSmemBytes, " bytes of shared memory per block (this one: sm_", major,
           "x, ", smem_optin, " bytes); use the unfused path");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((rows + kRows - 1) / kRows));
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    auto kernel = fused_mlp_kernel<T>;
    // the opt-in to 198 KB of shared memory, once per device and dtype (not a stream operation: fine while a
    // CUDA graph is being captured, but there is no need to repeat it)
    static std::atomic<uint64_t> opted_in{0};
    const uint64_t bit = uint64_t(1) << (dev & 63);
    if (!(opted_in.load() & bit)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kSmemBytes)));
      opted_in.fetch_or(bit);
    }
    kernel<<<grid, kThreads, kSmemBytes, stream>>>(
        reinterpret_cast<const T*>(h_pe.data_ptr()), reinterpret_cast<const T*>(cond.data_ptr()),
        reinterpret_cast<const T*>(w_hidden.data_ptr()), b_hidden.data_ptr<float>(),
        reinterpret_cast<const T*>(w_out.data_ptr()), b_out.data_ptr<float>(), out.data_ptr<float>(), rows, N,
        static_cast<int>(w_hidden.size(0)), static_cast<int>(O));
    FA_CUDA_CHECK_LAUNCH();
  };
  if (h_pe.scalar_type() == at::kBFloat16)
    launch(__nv_bfloat16{});
  else
    launch(__half{});
  return out;
}

}  // namespace flashavatar
