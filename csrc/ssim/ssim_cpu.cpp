// CPU kernels of the fused SSIM op: the two separable passes of ssim_math.h as loops, one image per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "ssim/ssim.h"
#include "ssim/ssim_math.h"

namespace flashavatar {
namespace {

using ssim::kRadius;

// out[q] = sum_p M(q, p) in[p] (adjoint = false) or sum_q M(q, p) in[q] at index p (adjoint = true), for K
// interleaved values per index; `in` and `out` step by `stride` values between indices.
template <typename T, int K>
void blur_line(const ssim::Window<T>& win, const T* in, T* out, int n, int64_t stride, bool adjoint) {
  for (int i = 0; i < n; ++i) {
    T acc[K] = {};
    for (int j = std::max(0, i - kRadius); j <= std::min(n - 1, i + kRadius); ++j) {
      const T w = adjoint ? ssim::blur_weight(win.g, j, i, n) : ssim::blur_weight(win.g, i, j, n);
      for (int k = 0; k < K; ++k) acc[k] += w * in[j * stride + k];
    }
    for (int k = 0; k < K; ++k) out[i * stride + k] = acc[k];
  }
}

// Both passes over one [H, W, 5] plane: rows (along W) then columns (along H); `tmp` has the same size.
template <typename T>
void blur_plane(const ssim::Window<T>& win, T* plane, T* tmp, int H, int W, bool adjoint) {
  for (int r = 0; r < H; ++r) blur_line<T, 5>(win, plane + int64_t(r) * W * 5, tmp + int64_t(r) * W * 5, W, 5, adjoint);
  for (int c = 0; c < W; ++c) blur_line<T, 5>(win, tmp + c * 5, plane + c * 5, H, int64_t(W) * 5, adjoint);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ssim_fwd_cpu(const at::Tensor& pred_in, const at::Tensor& gt_in, double sigma,
                                                bool keep_moments) {
  SsimFwdArgs a = prepare_ssim_fwd("flashavatar::ssim_fwd", pred_in, gt_in, sigma, keep_moments);
  const at::Tensor &pred = a.pred, &gt = a.gt, &map = a.map, &moments = a.moments;
  const int64_t N = pred.size(0), H = pred.size(1), W = pred.size(2), C = pred.size(3), HW = H * W;
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "ssim_fwd_cpu", [&] {
    const auto win = ssim::make_window<scalar_t>(sigma);
    const scalar_t *xp = pred.data_ptr<scalar_t>(), *yp = gt.data_ptr<scalar_t>();
    scalar_t* mp = map.data_ptr<scalar_t>();
    scalar_t* kp = keep_moments ? moments.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> plane(HW * 5), tmp(HW * 5);
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out = mp + n * HW;
        std::fill(out, out + HW, scalar_t(0));
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < HW; ++i) {
            scalar_t v[5];
            ssim::moment_inputs(xp[(n * HW + i) * C + c], yp[(n * HW + i) * C + c], v);
            std::copy(v, v + 5, &plane[i * 5]);
          }
          blur_plane(win, plane.data(), tmp.data(), int(H), int(W), false);
          for (int64_t i = 0; i < HW; ++i) {
            const scalar_t* m = &plane[i * 5];
            out[i] += ssim::value(ssim::Moments<scalar_t>{m[0], m[1], m[2], m[3], m[4]}) / scalar_t(C);
            if (kp != nullptr)
              for (int k = 0; k < 5; ++k) kp[((k * N + n) * HW + i) * C + c] = m[k];
          }
        }
      }
    });
  });
  return {map, moments};
}

std::tuple<at::Tensor, at::Tensor> ssim_bwd_cpu(const at::Tensor& grad_map_in, const at::Tensor& pred_in,
                                                const at::Tensor& gt_in, const at::Tensor& moments_in, double sigma,
                                                bool need_pred, bool need_gt) {
  SsimBwdArgs a = prepare_ssim_bwd("flashavatar::ssim_bwd", grad_map_in, pred_in, gt_in, moments_in, sigma,
                                   need_pred, need_gt);
  const at::Tensor &grad_map = a.grad_map, &pred = a.pred, &gt = a.gt, &moments = a.moments;
  at::Tensor &grad_pred = a.grad_pred, &grad_gt = a.grad_gt;
  const int64_t N = pred.size(0), H = pred.size(1), W = pred.size(2), C = pred.size(3), HW = H * W;
  if (!need_pred && !need_gt) return {grad_pred, grad_gt};
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "ssim_bwd_cpu", [&] {
    const auto win = ssim::make_window<scalar_t>(sigma);
    const scalar_t *xp = pred.data_ptr<scalar_t>(), *yp = gt.data_ptr<scalar_t>(),
                   *gp = grad_map.data_ptr<scalar_t>(), *kp = moments.data_ptr<scalar_t>();
    scalar_t* gxp = need_pred ? grad_pred.data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = need_gt ? grad_gt.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> plane(HW * 5), tmp(HW * 5);
      for (int64_t n = begin; n < end; ++n)
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t at = (n * HW + i) * C + c, step = N * HW * C;
            const ssim::Moments<scalar_t> m{kp[at], kp[at + step], kp[at + 2 * step], kp[at + 3 * step],
                                            kp[at + 4 * step]};
            scalar_t cot[5];
            ssim::moment_cotangents(m, gp[n * HW + i] / scalar_t(C), cot);
            std::copy(cot, cot + 5, &plane[i * 5]);
          }
          blur_plane(win, plane.data(), tmp.data(), int(H), int(W), true);
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t at = (n * HW + i) * C + c;
            scalar_t adj[5], gx, gy;
            std::copy(&plane[i * 5], &plane[i * 5] + 5, adj);
            ssim::pixel_grads(adj, xp[at], yp[at], gx, gy);
            if (gxp != nullptr) gxp[at] = gx;
            if (gyp != nullptr) gyp[at] = gy;
          }
        }
    });
  });
  return {grad_pred, grad_gt};
}

}  // namespace flashavatar
