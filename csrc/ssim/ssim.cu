// CUDA kernels of the fused SSIM op. One 16 x 16 block per output tile and image: the tile plus a halo of
// kRadius pixels is staged in shared memory, blurred along rows, then along columns (ssim_math.h), one channel
// at a time. The forward writes the SSIM map (and the five moments for the backward); the backward blurs the
// moments' cotangents with the adjoint weights the same way. Two launches per training step instead of the
// pads, convolutions and element-wise chain of the PyTorch formulation (and of its autograd graph).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "ssim/ssim.h"
#include "ssim/ssim_math.h"

namespace flashavatar {
namespace {

using ssim::kRadius;
using ssim::kTaps;
constexpr int kTile = 16;
constexpr int kHalo = kTile + 2 * kRadius;
constexpr int kThreads = kTile * kTile;

// The row pass over the staged halo: for every halo row and the tile's columns, the K = 5 values of
// `src` blurred along x (forward: sum over p of M(q, p); adjoint: sum over q of M(q, p)), into dst.
template <typename T>
__device__ __forceinline__ void row_pass(const T* win, const T (*src)[kHalo][kHalo + 1],
                                         T (*dst)[kHalo][kTile + 1], int x0, int W, bool adjoint, int tid) {
  for (int i = tid; i < kHalo * kTile; i += kThreads) {
    const int r = i / kTile, j = i - r * kTile, x = x0 + j;
    T acc[5] = {};
    if (x < W) {
#pragma unroll
      for (int k = 0; k < kTaps; ++k) {
        const int o = x - kRadius + k;  // the other end of the tap
        if (o < 0 || o >= W) continue;
        const T w = adjoint ? ssim::blur_weight(win, o, x, W) : ssim::blur_weight(win, x, o, W);
#pragma unroll
        for (int m = 0; m < 5; ++m) acc[m] += w * src[m][r][j + k];
      }
    }
#pragma unroll
    for (int m = 0; m < 5; ++m) dst[m][r][j] = acc[m];
  }
}

// The column pass for this thread's pixel (tile row ty, image row y).
template <typename T>
__device__ __forceinline__ void column_pass(const T* win, const T (*src)[kHalo][kTile + 1], int ty,
                                            int tx, int y, int H, bool adjoint, T (&out)[5]) {
#pragma unroll
  for (int m = 0; m < 5; ++m) out[m] = T(0);
#pragma unroll
  for (int k = 0; k < kTaps; ++k) {
    const int o = y - kRadius + k;
    if (o < 0 || o >= H) continue;
    const T w = adjoint ? ssim::blur_weight(win, o, y, H) : ssim::blur_weight(win, y, o, H);
#pragma unroll
    for (int m = 0; m < 5; ++m) out[m] += w * src[m][ty + k][tx];
  }
}

// Where this thread is: image n, tile origin (x0, y0), pixel (x, y) = tile origin + (tx, ty).
struct TileIndex {
  int n, x0, y0, tx, ty, tid, x, y;
  __device__ TileIndex()
      : n(blockIdx.z), x0(blockIdx.x * kTile), y0(blockIdx.y * kTile), tx(threadIdx.x), ty(threadIdx.y),
        tid(threadIdx.y * kTile + threadIdx.x), x(x0 + tx), y(y0 + ty) {}
};

// The taps into shared memory (the reflected taps are indexed at run time): constant indices here keep the
// kernel parameter out of local memory.
template <typename T>
__device__ __forceinline__ void stage_window(const ssim::Window<T>& win, T* s_win, int tid) {
#pragma unroll
  for (int k = 0; k < kTaps; ++k)
    if (tid == k) s_win[k] = win.g[k];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ssim_fwd_kernel(const T* __restrict__ pred, const T* __restrict__ gt,  // [N, H, W, C]
                    int N, int H, int W, int C, ssim::Window<T> win,
                    T* __restrict__ map,       // [N, H, W]
                    T* __restrict__ moments) {  // [5, N, H, W, C] or null
  __shared__ T s_in[5][kHalo][kHalo + 1];       // x, y, x^2, y^2, x y over the halo (zero outside the image)
  __shared__ T s_row[5][kHalo][kTile + 1];
  __shared__ T s_win[kTaps];
  const TileIndex t;
  const int n = t.n, x0 = t.x0, y0 = t.y0, tx = t.tx, ty = t.ty, tid = t.tid, x = t.x, y = t.y;
  stage_window(win, s_win, tid);  // visible after the first barrier below
  const bool inside = x < W && y < H;
  const int64_t plane = int64_t(N) * H * W * C;
  T total = T(0);
  for (int c = 0; c < C; ++c) {
    for (int i = tid; i < kHalo * kHalo; i += kThreads) {
      const int r = i / kHalo, col = i - r * kHalo, gy = y0 - kRadius + r, gx = x0 - kRadius + col;
      T v[5] = {};
      if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
        const int64_t at = ((int64_t(n) * H + gy) * W + gx) * C + c;
        ssim::moment_inputs(pred[at], gt[at], v);
      }
#pragma unroll
      for (int m = 0; m < 5; ++m) s_in[m][r][col] = v[m];
    }
    __syncthreads();
    row_pass(s_win, s_in, s_row, x0, W, false, tid);
    __syncthreads();
    if (inside) {
      T mo[5];
      column_pass(s_win, s_row, ty, tx, y, H, false, mo);
      total += ssim::value(ssim::Moments<T>{mo[0], mo[1], mo[2], mo[3], mo[4]});
      if (moments != nullptr) {
        const int64_t at = ((int64_t(n) * H + y) * W + x) * C + c;
#pragma unroll
        for (int m = 0; m < 5; ++m) moments[m * plane + at] = mo[m];
      }
    }
    __syncthreads();  // before the next channel overwrites the staging
  }
  if (inside) map[(int64_t(n) * H + y) * W + x] = total / T(C);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ssim_bwd_kernel(const T* __restrict__ grad_map,                      // [N, H, W]
                    const T* __restrict__ pred, const T* __restrict__ gt,  // [N, H, W, C]
                    const T* __restrict__ moments,                        // [5, N, H, W, C]
                    int N, int H, int W, int C, ssim::Window<T> win,
                    T* __restrict__ grad_pred, T* __restrict__ grad_gt) {  // [N, H, W, C] or null
  __shared__ T s_cot[5][kHalo][kHalo + 1];  // d loss / d moments over the halo (zero outside the image)
  __shared__ T s_row[5][kHalo][kTile + 1];
  __shared__ T s_win[kTaps];
  const TileIndex t;
  const int n = t.n, x0 = t.x0, y0 = t.y0, tx = t.tx, ty = t.ty, tid = t.tid, x = t.x, y = t.y;
  stage_window(win, s_win, tid);  // visible after the first barrier below
  const int64_t plane = int64_t(N) * H * W * C;
  const T inv_c = T(1) / T(C);
  for (int c = 0; c < C; ++c) {
    for (int i = tid; i < kHalo * kHalo; i += kThreads) {
      const int r = i / kHalo, col = i - r * kHalo, gy = y0 - kRadius + r, gx = x0 - kRadius + col;
      T cot[5] = {};
      if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
        const int64_t pix = (int64_t(n) * H + gy) * W + gx, at = pix * C + c;
        const ssim::Moments<T> m{moments[at], moments[plane + at], moments[2 * plane + at], moments[3 * plane + at],
                                 moments[4 * plane + at]};
        ssim::moment_cotangents(m, grad_map[pix] * inv_c, cot);
      }
#pragma unroll
      for (int m = 0; m < 5; ++m) s_cot[m][r][col] = cot[m];
    }
    __syncthreads();
    row_pass(s_win, s_cot, s_row, x0, W, true, tid);
    __syncthreads();
    if (x < W && y < H) {
      T adj[5], gx, gy;
      column_pass(s_win, s_row, ty, tx, y, H, true, adj);
      const int64_t at = ((int64_t(n) * H + y) * W + x) * C + c;
      ssim::pixel_grads(adj, pred[at], gt[at], gx, gy);
      if (grad_pred != nullptr) grad_pred[at] = gx;
      if (grad_gt != nullptr) grad_gt[at] = gy;
    }
    __syncthreads();
  }
}

void check_grid(const char* op, int64_t N) {
  FA_CHECK(op, N <= 65535, "at most 65535 images per call on CUDA, got ", N);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ssim_fwd_cuda(const at::Tensor& pred_in, const at::Tensor& gt_in, double sigma,
                                                 bool keep_moments) {
  const c10::cuda::CUDAGuard guard(pred_in.device());
  SsimFwdArgs a = prepare_ssim_fwd("flashavatar::ssim_fwd", pred_in, gt_in, sigma, keep_moments);
  check_grid("flashavatar::ssim_fwd", pred_in.size(0));
  const at::Tensor &pred = a.pred, &gt = a.gt, &map = a.map, &moments = a.moments;
  const int64_t N = pred.size(0), H = pred.size(1), W = pred.size(2), C = pred.size(3);
  if (N == 0) return {map, moments};
  const dim3 grid((W + kTile - 1) / kTile, (H + kTile - 1) / kTile, N), block(kTile, kTile);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "ssim_fwd_cuda", [&] {
    ssim_fwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
        pred.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), int(N), int(H), int(W), int(C),
        ssim::make_window<scalar_t>(sigma), map.data_ptr<scalar_t>(),
        keep_moments ? moments.data_ptr<scalar_t>() : nullptr);
    FA_CUDA_CHECK_LAUNCH();
  });
  return {map, moments};
}

std::tuple<at::Tensor, at::Tensor> ssim_bwd_cuda(const at::Tensor& grad_map_in, const at::Tensor& pred_in,
                                                 const at::Tensor& gt_in, const at::Tensor& moments_in, double sigma,
                                                 bool need_pred, bool need_gt) {
  const c10::cuda::CUDAGuard guard(pred_in.device());
  SsimBwdArgs a = prepare_ssim_bwd("flashavatar::ssim_bwd", grad_map_in, pred_in, gt_in, moments_in, sigma,
                                   need_pred, need_gt);
  check_grid("flashavatar::ssim_bwd", pred_in.size(0));
  const at::Tensor &grad_map = a.grad_map, &pred = a.pred, &gt = a.gt, &moments = a.moments;
  at::Tensor &grad_pred = a.grad_pred, &grad_gt = a.grad_gt;
  const int64_t N = pred.size(0), H = pred.size(1), W = pred.size(2), C = pred.size(3);
  if (N == 0 || (!need_pred && !need_gt)) return {grad_pred, grad_gt};
  const dim3 grid((W + kTile - 1) / kTile, (H + kTile - 1) / kTile, N), block(kTile, kTile);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "ssim_bwd_cuda", [&] {
    ssim_bwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
        grad_map.data_ptr<scalar_t>(), pred.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(),
        moments.data_ptr<scalar_t>(), int(N), int(H), int(W), int(C), ssim::make_window<scalar_t>(sigma),
        need_pred ? grad_pred.data_ptr<scalar_t>() : nullptr, need_gt ? grad_gt.data_ptr<scalar_t>() : nullptr);
    FA_CUDA_CHECK_LAUNCH();
  });
  return {grad_pred, grad_gt};
}

}  // namespace flashavatar
