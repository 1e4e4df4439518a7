// Contract of flame_lbs: posed FLAME vertices (a subset of U vertices) for B frames in three launches (blendshape
// coefficients, one GEMM, skinning + eyelids), for the tracker's flat kinematic chain (global = neck = identity,
// jaw and eyes under them; see flame_lbs_math.h). The Animator's per-frame FLAME (flashavatar/animate.py).
//
//   shape [1 or B, S], expr [B, E], jaw [B, 6], eyes [B, 12] (two 6D rotations), eyelids [B, 2]
//   dirs [S + E + 36, U*4 + 15]   blendshapes of the homogeneous vertices (U x 4) and the rest joints (5 x 3)
//   base [U*4 + 15]               template vertices (with the homogeneous 1) and joints
//   lbs_weights [U, 5], eyelid_dirs [2, U*3]; use_eyelids: add the eyelid blendshapes after skinning
// Every float input shares one dtype (float32 or float64) and device. Output: vertices [B, U, 3].
#pragma once
#include <torch/types.h>

#include "common/checks.h"

namespace flashavatar {

inline void check_flame_lbs_args(const char* op, const at::Tensor& shape, const at::Tensor& expr,
                                 const at::Tensor& jaw, const at::Tensor& eyes, const at::Tensor& eyelids,
                                 const at::Tensor& dirs, const at::Tensor& base, const at::Tensor& lbs_weights,
                                 const at::Tensor& eyelid_dirs) {
  FA_CHECK(op, expr.dim() == 2, "expr must have shape [B, E], got ", sizes_str(expr));
  const int64_t B = expr.size(0), E = expr.size(1);
  FA_CHECK(op, shape.dim() == 2 && (shape.size(0) == 1 || shape.size(0) == B),
           "shape must have shape [1 or B, S] with B = ", B, ", got ", sizes_str(shape));
  const int64_t S = shape.size(1);
  FA_CHECK(op, jaw.dim() == 2 && jaw.size(0) == B && jaw.size(1) == 6, "jaw must have shape [B, 6], got ",
           sizes_str(jaw));
  FA_CHECK(op, eyes.dim() == 2 && eyes.size(0) == B && eyes.size(1) == 12, "eyes must have shape [B, 12], got ",
           sizes_str(eyes));
  FA_CHECK(op, eyelids.dim() == 2 && eyelids.size(0) == B && eyelids.size(1) == 2,
           "eyelids must have shape [B, 2], got ", sizes_str(eyelids));
  FA_CHECK(op, lbs_weights.dim() == 2 && lbs_weights.size(1) == 5, "lbs_weights must have shape [U, 5], got ",
           sizes_str(lbs_weights));
  const int64_t U = lbs_weights.size(0);
  FA_CHECK(op, dirs.dim() == 2 && dirs.size(0) == S + E + 36 && dirs.size(1) == 4 * U + 15,
           "dirs must have shape [S + E + 36, U*4 + 15] = [", S + E + 36, ", ", 4 * U + 15, "], got ",
           sizes_str(dirs));
  FA_CHECK(op, base.dim() == 1 && base.size(0) == 4 * U + 15, "base must have shape [U*4 + 15] = [", 4 * U + 15,
           "], got ", sizes_str(base));
  FA_CHECK(op, eyelid_dirs.dim() == 2 && eyelid_dirs.size(0) == 2 && eyelid_dirs.size(1) == 3 * U,
           "eyelid_dirs must have shape [2, U*3] = [2, ", 3 * U, "], got ", sizes_str(eyelid_dirs));
  FA_CHECK_FLOAT(op, expr);
  for (const at::Tensor* t : {&shape, &jaw, &eyes, &eyelids, &dirs, &base, &lbs_weights, &eyelid_dirs}) {
    FA_CHECK(op, t->scalar_type() == expr.scalar_type(), "all inputs must share expr's dtype ", expr.scalar_type(),
             ", got ", t->scalar_type());
    FA_CHECK(op, t->device() == expr.device(), "all inputs must be on expr's device ", expr.device(), ", got ",
             t->device());
  }
}

at::Tensor flame_lbs_cpu(const at::Tensor& shape, const at::Tensor& expr, const at::Tensor& jaw,
                         const at::Tensor& eyes, const at::Tensor& eyelids, const at::Tensor& dirs,
                         const at::Tensor& base, const at::Tensor& lbs_weights, const at::Tensor& eyelid_dirs,
                         bool use_eyelids);
#ifdef WITH_CUDA
at::Tensor flame_lbs_cuda(const at::Tensor& shape, const at::Tensor& expr, const at::Tensor& jaw,
                          const at::Tensor& eyes, const at::Tensor& eyelids, const at::Tensor& dirs,
                          const at::Tensor& base, const at::Tensor& lbs_weights, const at::Tensor& eyelid_dirs,
                          bool use_eyelids);
#endif

}  // namespace flashavatar
