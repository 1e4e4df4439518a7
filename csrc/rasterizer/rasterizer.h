// flashavatar's differentiable Gaussian rasteriser: contract and dispatch.
//
// Conventions (SPEC §5, gsplat "classic" mode): EWA projection with x/z, y/z clamped to 1.3x the field of
// view, eps2d (0.3 px) added to the 2D covariance diagonal, pixel centres at (x + 0.5, y + 0.5),
// alpha = min(0.99, o exp(-1/2 d^T conic d)), Gaussians with alpha < 1/255 at a pixel are skipped there, a
// pixel stops before the Gaussian that would bring its transmittance to <= 1e-4, Gaussians with camera depth
// outside [near, far] are culled. Screen bounds come from the opacity (where alpha can reach 1/255), so the
// image equals a dense per-pixel evaluation and never depends on the tiling.
//
// Every tensor carries a leading batch dimension B (one Gaussian set per frame) and C cameras per set:
// the B*C images are rendered in one launch sequence. The Python wrapper adds/removes the batch dims.
//
//   means      [B, N, 3]     world-space centres
//   quats      [B, N, 4]     (w, x, y, z), normalised inside
//   scales     [B, N, 3]     standard deviations along the rotated axes
//   opacities  [B, N]        in [0, 1]
//   colors     [B, N, K, D]  K = 1 and sh_degree = -1: plain colours; otherwise SH coefficients, K >= (deg+1)^2
//   viewmats   [B, C, 4, 4]  world -> camera (OpenCV), row-major
//   Ks         [B, C, 3, 3]  pinhole intrinsics
//   backgrounds[B, C, D]     optional (undefined tensor: none)
//
// Forward returns (render [B,C,H,W,D], alpha [B,C,H,W,1], depth [B,C,H,W,1] = sum_i w_i z_i (not normalised),
// radii [B,C,N] int32 (0 = culled), means2d [B,C,N,2], conics [B,C,N,3], colors_eval [B,C,N,D],
// depths [B,C,N], and the state the backward pass reuses: last_ids [B,C,H,W] int32 (list position after the
// pixel's last contributor), transmittance [B,C,H,W] (final T, kept exactly rather than as 1 - alpha), sorted_ids [B*C*N]
// int32, isect_ids [capacity] int32, tile_ranges [B*C*tiles, 2] int32, offsets [B*C*N] int32, chunk_state float:
// each pixel's T and colour/depth prefix sums at every 256-entry boundary of its tile's list, and its final sums,
// so the backward can split long lists over several blocks; empty when not kept). The CPU path recomputes what it
// needs, so its tiling tensors are empty.
#pragma once
#include <torch/types.h>

#include <tuple>

namespace flashavatar {

using RasterFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor>;
using RasterBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates the inputs (shapes, dtypes, devices, contiguity) with messages naming the op and the argument.
// Returns D (channels).
int64_t rasterize_check_inputs(const char* op, const at::Tensor& means, const at::Tensor& quats,
                               const at::Tensor& scales, const at::Tensor& opacities, const at::Tensor& colors,
                               const at::Tensor& viewmats, const at::Tensor& Ks,
                               const c10::optional<at::Tensor>& backgrounds, int64_t width, int64_t height,
                               int64_t sh_degree, bool colors_may_be_shared = false);

RasterFwdOut rasterize_fwd_cpu(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                               const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                               const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                               int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                               double eps2d, int64_t capacity);

// Gradients (means [B,N,3], quats [B,N,4], scales [B,N,3], opacities [B,N], colors [B,N,K,D]).
RasterBwdOut rasterize_bwd_cpu(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                               const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                               const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                               int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                               double eps2d, const at::Tensor& alpha, const at::Tensor& radii,
                               const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors_eval,
                               const at::Tensor& depths, const at::Tensor& last_ids, const at::Tensor& transmittance,
                               const at::Tensor& sorted_ids, const at::Tensor& isect_ids,
                               const at::Tensor& tile_ranges, const at::Tensor& offsets,
                               const at::Tensor& chunk_state, const at::Tensor& grad_render, const c10::optional<at::Tensor>& grad_alpha,
                               const c10::optional<at::Tensor>& grad_depth);

#ifdef WITH_CUDA
RasterFwdOut rasterize_fwd_cuda(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                                const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                                int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                                double eps2d, int64_t capacity);
RasterBwdOut rasterize_bwd_cuda(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                                const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                                int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                                double eps2d, const at::Tensor& alpha, const at::Tensor& radii,
                                const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors_eval,
                                const at::Tensor& depths, const at::Tensor& last_ids, const at::Tensor& transmittance,
                                const at::Tensor& sorted_ids, const at::Tensor& isect_ids,
                                const at::Tensor& tile_ranges, const at::Tensor& offsets,
                                const at::Tensor& chunk_state, const at::Tensor& grad_render,
                                const c10::optional<at::Tensor>& grad_alpha, const c10::optional<at::Tensor>& grad_depth);
#endif

}  // namespace flashavatar
