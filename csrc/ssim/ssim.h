// Contract of the fused SSIM op (math: ssim_math.h). Images are channel-last, as the rasteriser writes them.
//
//   ssim_fwd(pred, gt, sigma, keep_moments) -> (ssim_map, moments)
//     pred, gt [N, H, W, C] float32 or float64, one device, H and W > 5 (reflection needs them)
//     ssim_map [N, H, W]            per-pixel SSIM, mean over the C channels
//     moments  [5, N, H, W, C]      blurred x, y, x^2, y^2, x y (the backward's input); [0] if not kept
//   ssim_bwd(grad_map, pred, gt, moments, sigma, need_pred, need_gt) -> (grad_pred, grad_gt)
//     grad_map [N, H, W]; each gradient [N, H, W, C], or [0] when not asked for
#pragma once
#include <torch/types.h>

#include <tuple>

#include "common/checks.h"

namespace flashavatar {

inline void check_ssim_images(const char* op, const at::Tensor& pred, const at::Tensor& gt) {
  FA_CHECK(op, pred.dim() == 4, "pred must have shape [N, H, W, C], got ", sizes_str(pred));
  FA_CHECK(op, gt.sizes() == pred.sizes(), "gt must have pred's shape ", sizes_str(pred), ", got ", sizes_str(gt));
  FA_CHECK_FLOAT(op, pred);
  FA_CHECK_SAME_DTYPE(op, pred, gt);
  FA_CHECK_SAME_DEVICE(op, pred, gt);
  FA_CHECK(op, pred.size(1) > 5 && pred.size(2) > 5,
           "pred must be at least 6 x 6 pixels (reflection padding of the 11-tap window), got ", sizes_str(pred));
  FA_CHECK(op, pred.size(3) >= 1, "pred must have at least one channel, got ", sizes_str(pred));
}

inline void check_ssim_bwd_args(const char* op, const at::Tensor& grad_map, const at::Tensor& pred,
                                const at::Tensor& gt, const at::Tensor& moments) {
  check_ssim_images(op, pred, gt);
  const int64_t N = pred.size(0), H = pred.size(1), W = pred.size(2), C = pred.size(3);
  FA_CHECK(op, grad_map.dim() == 3 && grad_map.size(0) == N && grad_map.size(1) == H && grad_map.size(2) == W,
           "grad_map must have shape [N, H, W] = [", N, ", ", H, ", ", W, "], got ", sizes_str(grad_map));
  FA_CHECK(op, moments.dim() == 5 && moments.size(0) == 5 && moments.size(1) == N && moments.size(2) == H &&
                   moments.size(3) == W && moments.size(4) == C,
           "moments must have shape [5, N, H, W, C] (ssim_fwd with keep_moments=True), got ", sizes_str(moments));
  FA_CHECK_SAME_DTYPE(op, grad_map, pred);
  FA_CHECK_SAME_DTYPE(op, moments, pred);
  FA_CHECK_SAME_DEVICE(op, grad_map, pred);
  FA_CHECK_SAME_DEVICE(op, moments, pred);
}

// Checked, contiguous inputs and the allocated outputs of one call (shared by the CPU and CUDA paths).
struct SsimFwdArgs {
  at::Tensor pred, gt, map, moments;
};
inline SsimFwdArgs prepare_ssim_fwd(const char* op, const at::Tensor& pred, const at::Tensor& gt, double sigma,
                                    bool keep_moments) {
  check_ssim_images(op, pred, gt);
  FA_CHECK(op, sigma > 0, "sigma must be positive, got ", sigma);
  SsimFwdArgs a{pred.contiguous(), gt.contiguous(), {}, {}};
  const int64_t N = pred.size(0), H = pred.size(1), W = pred.size(2), C = pred.size(3);
  a.map = at::empty({N, H, W}, pred.options());
  a.moments = keep_moments ? at::empty({5, N, H, W, C}, pred.options()) : at::empty({0}, pred.options());
  return a;
}

struct SsimBwdArgs {
  at::Tensor grad_map, pred, gt, moments, grad_pred, grad_gt;
};
inline SsimBwdArgs prepare_ssim_bwd(const char* op, const at::Tensor& grad_map, const at::Tensor& pred,
                                    const at::Tensor& gt, const at::Tensor& moments, double sigma, bool need_pred,
                                    bool need_gt) {
  check_ssim_bwd_args(op, grad_map, pred, gt, moments);
  FA_CHECK(op, sigma > 0, "sigma must be positive, got ", sigma);
  return {grad_map.contiguous(),
          pred.contiguous(),
          gt.contiguous(),
          moments.contiguous(),
          need_pred ? at::empty_like(pred, at::MemoryFormat::Contiguous) : at::empty({0}, pred.options()),
          need_gt ? at::empty_like(gt, at::MemoryFormat::Contiguous) : at::empty({0}, gt.options())};
}

std::tuple<at::Tensor, at::Tensor> ssim_fwd_cpu(const at::Tensor& pred, const at::Tensor& gt, double sigma,
                                                bool keep_moments);
std::tuple<at::Tensor, at::Tensor> ssim_bwd_cpu(const at::Tensor& grad_map, const at::Tensor& pred,
                                                const at::Tensor& gt, const at::Tensor& moments, double sigma,
                                                bool need_pred, bool need_gt);
#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> ssim_fwd_cuda(const at::Tensor& pred, const at::Tensor& gt, double sigma,
                                                 bool keep_moments);
std::tuple<at::Tensor, at::Tensor> ssim_bwd_cuda(const at::Tensor& grad_map, const at::Tensor& pred,
                                                 const at::Tensor& gt, const at::Tensor& moments, double sigma,
                                                 bool need_pred, bool need_gt);
#endif

}  // namespace flashavatar
