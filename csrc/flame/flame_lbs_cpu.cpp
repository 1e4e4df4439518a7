// CPU kernels of flame_lbs: the loops of flame_lbs_math.h around one at::addmm.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include "flame/flame_lbs.h"
#include "flame/flame_lbs_math.h"

namespace flashavatar {

at::Tensor flame_lbs_cpu(const at::Tensor& shape_in, const at::Tensor& expr_in, const at::Tensor& jaw_in,
                         const at::Tensor& eyes_in, const at::Tensor& eyelids_in, const at::Tensor& dirs,
                         const at::Tensor& base, const at::Tensor& lbs_weights_in, const at::Tensor& eyelid_dirs_in,
                         bool use_eyelids) {
  const char* op = "flashavatar::flame_lbs";
  check_flame_lbs_args(op, shape_in, expr_in, jaw_in, eyes_in, eyelids_in, dirs, base, lbs_weights_in,
                       eyelid_dirs_in);
  const at::Tensor shape = shape_in.contiguous(), expr = expr_in.contiguous(), jaw = jaw_in.contiguous(),
                   eyes = eyes_in.contiguous(), eyelids = eyelids_in.contiguous(),
                   lbs_weights = lbs_weights_in.contiguous(), eyelid_dirs = eyelid_dirs_in.contiguous();
  const int64_t B = expr.size(0), E = expr.size(1), S = shape.size(1), U = lbs_weights.size(0);
  const int64_t F = S + E + flame_lbs::kPoseFeatures;
  at::Tensor verts = at::empty({B, U, 3}, expr.options());
  if (B == 0 || U == 0) return verts;
  at::Tensor feats = at::empty({B, F}, expr.options());
  at::Tensor rot = at::empty({B, flame_lbs::kPosed, 9}, expr.options());  // world rotations of jaw and eyes
  AT_DISPATCH_FLOATING_TYPES(expr.scalar_type(), "flame_lbs_cpu_features", [&] {
    const scalar_t *sp = shape.data_ptr<scalar_t>(), *ep = expr.data_ptr<scalar_t>(), *jp = jaw.data_ptr<scalar_t>(),
                   *yp = eyes.data_ptr<scalar_t>();
    scalar_t *fp = feats.data_ptr<scalar_t>(), *rp = rot.data_ptr<scalar_t>();
    const int64_t shape_stride = shape.size(0) == 1 ? 0 : S;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < F; ++k) {
        scalar_t entry;
        bool is_rot;
        fp[b * F + k] = flame_lbs::feature(k, S, E, sp + b * shape_stride, ep + b * E, jp + 6 * b, yp + 12 * b, &entry,
                                           &is_rot);
        if (is_rot) rp[b * 27 + (k - S - E - 9)] = entry;
      }
  });
  const at::Tensor lin = at::addmm(base, feats, dirs);  // [B, U*4 + 15]
  AT_DISPATCH_FLOATING_TYPES(expr.scalar_type(), "flame_lbs_cpu_skin", [&] {
    const scalar_t *lp = lin.data_ptr<scalar_t>(), *rp = rot.data_ptr<scalar_t>(),
                   *wp = lbs_weights.data_ptr<scalar_t>(), *dp = eyelid_dirs.data_ptr<scalar_t>(),
                   *ep = eyelids.data_ptr<scalar_t>();
    scalar_t* vp = verts.data_ptr<scalar_t>();
    const int64_t L = 4 * U + 15;
    at::parallel_for(0, B * U, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / U, u = i - b * U;
        flame_lbs::skin_vertex(u, U, lp + b * L, rp + b * 27, wp + 5 * u, dp, ep + 2 * b, use_eyelids, vp + 3 * i);
      }
    });
  });
  return verts;
}

}  // namespace flashavatar
