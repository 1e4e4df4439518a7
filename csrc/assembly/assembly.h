// Contract of gaussian_assembly: the Gaussians of a mesh-attached avatar (FlashAvatar) for B frames, from the
// posed mesh and the deformation MLP's outputs, in one pass (one thread per (frame, Gaussian)). The math is in
// assembly_math.h (shared by the CUDA kernel and the CPU loop); it is GaussianAvatar.forward's.
//
//   verts [B, V, 3]        posed vertices (float32 or float64; all float inputs share the dtype)
//   faces [N, 3]           int32 or int64 vertex indices of each Gaussian's triangle, in [0, V)
//   barycentrics [N, 3]    the Gaussian's slot in its triangle (a constant: no gradient)
//   rotation [N, 4]        base rotation (w, x, y, z), any norm (normalised inside)
//   log_scale [N, 3]       base log-scale
//   raw [B, N, 10]         MLP outputs after tanh: offset (3), rotation delta (4), log-scale delta (3)
//   offset_scale           metres per unit of raw offset; parity: FlashAvatar's original rotation / scale rule
// Outputs (input dtype): means [B, N, 3], quats [B, N, 4] (unit, world), scales [B, N, 3] (std-devs),
//   local_quats [B, N, 4] = normalise(rotation) ⊗ q_delta (the residual rotation relative to the triangle).
// A Gaussian whose face index is out of range gets NaN outputs (checking the indices on the host would need a
// device synchronisation, which CUDA-graph capture does not allow).
//
// gaussian_assembly_backward: cotangents of the four outputs (same shapes) -> (grad_verts [B, V, 3],
// grad_rotation [N, 4], grad_log_scale [N, 3], grad_raw [B, N, 10]). grad_verts is accumulated with atomics on
// CUDA (not bitwise deterministic; reported through alertNotDeterministic); with need_verts_grad = false it is
// left at zero and no atomics run (the usual case: the posed mesh is a constant of training).
#pragma once
#include <torch/types.h>

#include <tuple>

#include "common/checks.h"

namespace flashavatar {

inline void check_assembly_args(const char* op, const at::Tensor& verts, const at::Tensor& faces,
                                const at::Tensor& barycentrics, const at::Tensor& rotation,
                                const at::Tensor& log_scale, const at::Tensor& raw) {
  FA_CHECK(op, verts.dim() == 3 && verts.size(2) == 3, "verts must have shape [B, V, 3], got ", sizes_str(verts));
  FA_CHECK(op, faces.dim() == 2 && faces.size(1) == 3, "faces must have shape [N, 3], got ", sizes_str(faces));
  const int64_t n = faces.size(0), b = verts.size(0);
  FA_CHECK(op, faces.scalar_type() == at::kInt || faces.scalar_type() == at::kLong,
           "faces must be int32 or int64, got ", faces.scalar_type());
  FA_CHECK(op, barycentrics.dim() == 2 && barycentrics.size(0) == n && barycentrics.size(1) == 3,
           "barycentrics must have shape [N, 3] with N = ", n, ", got ", sizes_str(barycentrics));
  FA_CHECK(op, rotation.dim() == 2 && rotation.size(0) == n && rotation.size(1) == 4,
           "rotation must have shape [N, 4] with N = ", n, ", got ", sizes_str(rotation));
  FA_CHECK(op, log_scale.dim() == 2 && log_scale.size(0) == n && log_scale.size(1) == 3,
           "log_scale must have shape [N, 3] with N = ", n, ", got ", sizes_str(log_scale));
  FA_CHECK(op, raw.dim() == 3 && raw.size(0) == b && raw.size(1) == n && raw.size(2) == 10,
           "raw must have shape [B, N, 10] with B = ", b, ", N = ", n, ", got ", sizes_str(raw));
  FA_CHECK_FLOAT(op, verts);
  for (const at::Tensor* t : {&barycentrics, &rotation, &log_scale, &raw})
    FA_CHECK(op, t->scalar_type() == verts.scalar_type(), "all float inputs must share verts' dtype ",
             verts.scalar_type(), ", got ", t->scalar_type());
  for (const at::Tensor* t : {&faces, &barycentrics, &rotation, &log_scale, &raw})
    FA_CHECK(op, t->device() == verts.device(), "all inputs must be on verts' device ", verts.device(), ", got ",
             t->device());
}

inline void check_assembly_grads(const char* op, const at::Tensor& grad_means, const at::Tensor& grad_quats,
                                 const at::Tensor& grad_scales, const at::Tensor& grad_local,
                                 const at::Tensor& raw) {
  const int64_t b = raw.size(0), n = raw.size(1);
  const at::Tensor* grads[4] = {&grad_means, &grad_quats, &grad_scales, &grad_local};
  const int64_t widths[4] = {3, 4, 3, 4};
  const char* names[4] = {"grad_means", "grad_quats", "grad_scales", "grad_local_quats"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& g = *grads[i];
    FA_CHECK(op, g.dim() == 3 && g.size(0) == b && g.size(1) == n && g.size(2) == widths[i], names[i],
             " must have shape [", b, ", ", n, ", ", widths[i], "], got ", sizes_str(g));
    FA_CHECK(op, g.device() == raw.device(), names[i], " must be on ", raw.device(), ", got ", g.device());
  }
}

using AssemblyOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AssemblyOutputs gaussian_assembly_cpu(const at::Tensor& verts, const at::Tensor& faces,
                                      const at::Tensor& barycentrics, const at::Tensor& rotation,
                                      const at::Tensor& log_scale, const at::Tensor& raw, double offset_scale,
                                      bool parity);
AssemblyOutputs gaussian_assembly_backward_cpu(const at::Tensor& grad_means, const at::Tensor& grad_quats,
                                               const at::Tensor& grad_scales, const at::Tensor& grad_local,
                                               const at::Tensor& verts, const at::Tensor& faces,
                                               const at::Tensor& barycentrics, const at::Tensor& rotation,
                                               const at::Tensor& log_scale, const at::Tensor& raw,
                                               double offset_scale, bool parity, bool need_verts_grad);
#ifdef WITH_CUDA
AssemblyOutputs gaussian_assembly_cuda(const at::Tensor& verts, const at::Tensor& faces,
                                       const at::Tensor& barycentrics, const at::Tensor& rotation,
                                       const at::Tensor& log_scale, const at::Tensor& raw, double offset_scale,
                                       bool parity);
AssemblyOutputs gaussian_assembly_backward_cuda(const at::Tensor& grad_means, const at::Tensor& grad_quats,
                                                const at::Tensor& grad_scales, const at::Tensor& grad_local,
                                                const at::Tensor& verts, const at::Tensor& faces,
                                                const at::Tensor& barycentrics, const at::Tensor& rotation,
                                                const at::Tensor& log_scale, const at::Tensor& raw,
                                                double offset_scale, bool parity, bool need_verts_grad);
#endif

}  // namespace flashavatar
