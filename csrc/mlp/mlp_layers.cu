// CUDA mlp_input / mlp_head (contract in mlp_layers.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/types.h>

#include <algorithm>

#include "mlp/mlp_layers.h"
#include "mlp/mma.cuh"

namespace flashavatar {
namespace {

constexpr int kThreads = 128;
constexpr int kHeadWidth = 256;  // the tensor-core head's H
constexpr int kHeadMaxOut = 16;  // and its largest O (two 8-column MMA tiles)

int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// V consecutive values in one aligned load / store (16 bytes for the vector path).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// out[(f N + g) H + k .. + V] = relu(h_pe[g H + k ..] + cond[f H + k ..]), V values per thread and step.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    mlp_input_kernel(const T* __restrict__ h_pe /* [N, H] */, const T* __restrict__ cond /* [B, H] */,
                     T* __restrict__ out /* [B, N, H] */, int64_t n, int64_t width, int64_t packs) {
  using P = Pack<T, V>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += stride) {
    const int64_t e = i * V, row = e / width, k = e - row * width, f = row / n, g = row - f * n;
    const P a = *reinterpret_cast<const P*>(h_pe + g * width + k);
    const P c = *reinterpret_cast<const P*>(cond + f * width + k);
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float x = static_cast<float>(a.v[j]) + static_cast<float>(c.v[j]);
      o.v[j] = T(x < 0.f ? 0.f : x);  // NaN stays NaN, as torch.relu
    }
    *reinterpret_cast<P*>(out + e) = o;
  }
}

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// One warp per 16-row tile of h at a time (grid-stride), all O <= 16 outputs as two m16n8k16 column tiles. The
// dot products run over k in any order as long as A and B agree, so each thread loads 16-byte pieces of its rows:
// in the 32-column chunk c, thread (g, t) holds row g's (and g + 8's) columns 32c + 8t .. + 7, and k-step 2c + q
// (q = 0, 1) takes columns 32c + 8t + 4q .. + 3 as the fragment's k = 2t, 2t + 1, 2t + 8, 2t + 9. The weights'
// fragments follow the same map and stay in registers (64 per thread) for every tile.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mlp_head_kernel(const T* __restrict__ h /* [R, 256] */, const T* __restrict__ w /* [O, 256] */,
                    const float* __restrict__ b /* [O] */, float* __restrict__ out /* [R, O] */, int64_t rows,
                    int n_out, bool apply_tanh) {
  using M = Mma<T>;
  constexpr int H = kHeadWidth, kChunks = H / 32;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint32_t wf[2 * kChunks][2][2];  // [k-step][column tile][b0, b1]
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int o = nt * 8 + g;  // B[k][n] = w[n][k]: the thread's column n = g of the tile
        const T* p = w + int64_t(o) * H + 32 * c + 8 * t + 4 * q;
        wf[2 * c + q][nt][0] = o < n_out ? ld32(p) : 0u;
        wf[2 * c + q][nt][1] = o < n_out ? ld32(p + 2) : 0u;
      }
  float bias[2][2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = nt * 8 + 2 * t + e;
      bias[nt][e] = col < n_out ? b[col] : 0.f;
    }
  const int64_t tiles = (rows + 15) / 16;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t tile = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; tile < tiles; tile += warps) {
    const int64_t r0 = tile * 16 + g, r1 = r0 + 8;
    uint4 x0[kChunks], x1[kChunks];  // rows r0, r1: columns 32c + 8t .. + 7 of chunk c (read once: streaming)
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      x0[c] = r0 < rows ? __ldcs(reinterpret_cast<const uint4*>(h + r0 * H + 32 * c + 8 * t)) : make_uint4(0, 0, 0, 0);
      x1[c] = r1 < rows ? __ldcs(reinterpret_cast<const uint4*>(h + r1 * H + 32 * c + 8 * t)) : make_uint4(0, 0, 0, 0);
    }
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint32_t a0[4] = {x0[c].x, x1[c].x, x0[c].y, x1[c].y};  // k-step 2c
      const uint32_t a1[4] = {x0[c].z, x1[c].z, x0[c].w, x1[c].w};  // k-step 2c + 1
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        M::run(acc[nt], a0, wf[2 * c][nt]);
        M::run(acc[nt], a1, wf[2 * c + 1][nt]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1);
        const int64_t row = e < 2 ? r0 : r1;
        if (col < n_out && row < rows) {
          const float v = acc[nt][e] + bias[nt][e & 1];
          out[row * n_out + col] = apply_tanh ? tanhf(v) : v;
        }
      }
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

at::Tensor mlp_input_cuda(const at::Tensor& h_pe_in, const at::Tensor& cond_in) {
  check_mlp_input_args("flashavatar::mlp_input", h_pe_in, cond_in);
  const c10::cuda::CUDAGuard guard(h_pe_in.device());
  const at::Tensor h_pe = h_pe_in.contiguous(), cond = cond_in.contiguous();
  const int64_t B = cond.size(0), N = h_pe.size(0), H = h_pe.size(1);
  at::Tensor out = at::empty({B, N, H}, h_pe.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto tag, auto vec) {
    using T = decltype(tag);
    constexpr int V = decltype(vec)::value;
    const int64_t packs = out.numel() / V;
    const int blocks = static_cast<int>(std::min<int64_t>((packs + kThreads - 1) / kThreads, 32LL * sm_count()));
    mlp_input_kernel<T, V><<<blocks, kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(h_pe.data_ptr()), reinterpret_cast<const T*>(cond.data_ptr()),
        reinterpret_cast<T*>(out.data_ptr()), N, H, packs);
    FA_CUDA_CHECK_LAUNCH();
  };
  auto by_width = [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (H % V == 0 && aligned16(h_pe) && aligned16(cond) && aligned16(out))
      launch(tag, std::integral_constant<int, V>{});
    else
      launch(tag, std::integral_constant<int, 1>{});
  };
  switch (h_pe.scalar_type()) {
    case at::kBFloat16: by_width(c10::BFloat16{}); break;
    case at::kHalf: by_width(c10::Half{}); break;
    default: by_width(float{}); break;
  }
  return out;
}

at::Tensor mlp_head_cuda(const at::Tensor& h_in, const at::Tensor& w_in, const at::Tensor& b_in, bool apply_tanh) {
  check_mlp_head_args("flashavatar::mlp_head", h_in, w_in, b_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const int64_t R = h.size(0), H = h.size(1), O = w.size(0);
  const bool tensor_cores = (h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kHalf) && H == kHeadWidth &&
                            O <= kHeadMaxOut && aligned16(h) && aligned16(w);
  int major = 0;
  if (tensor_cores) {
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  }
  if (!tensor_cores || major < 8) return mlp_head_aten(h, w, b, apply_tanh);
  at::Tensor out = at::empty({R, O}, h.options().dtype(at::kFloat));
  if (R == 0) return out;
  const int64_t tiles = (R + 15) / 16;
  const int blocks = static_cast<int>(std::min<int64_t>((tiles + 3) / 4, 8LL * sm_count()));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    mlp_head_kernel<T><<<blocks, kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(h.data_ptr()), reinterpret_cast<const T*>(w.data_ptr()), b.data_ptr<float>(),
        out.data_ptr<float>(), R, static_cast<int>(O), apply_tanh);
    FA_CUDA_CHECK_LAUNCH();
  };
  if (h.scalar_type() == at::kBFloat16)
    launch(__nv_bfloat16{});
  else
    launch(__half{});
  return out;
}

}  // namespace flashavatar
