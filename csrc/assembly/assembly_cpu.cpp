// CPU kernels of gaussian_assembly: the per-Gaussian math of assembly_math.h in at::parallel_for loops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <limits>

#include "assembly/assembly.h"
#include "assembly/assembly_math.h"

namespace flashavatar {
namespace {

// Inputs of Gaussian n in frame b, or false when a face index is out of range.
template <typename scalar_t, typename index_t>
bool gather_inputs(const scalar_t* verts_b /* [V, 3] */, int64_t n_verts, const index_t* faces /* [N, 3] */,
                   const scalar_t* bary, const scalar_t* rot, const scalar_t* log_scale, const scalar_t* raw_bn,
                   int64_t n, assembly::Inputs<scalar_t>& in) {
  const index_t f0 = faces[3 * n], f1 = faces[3 * n + 1], f2 = faces[3 * n + 2];
  if (f0 < 0 || f1 < 0 || f2 < 0 || f0 >= n_verts || f1 >= n_verts || f2 >= n_verts) return false;
  in.v0 = assembly::load_vec3(verts_b + 3 * static_cast<int64_t>(f0));
  in.v1 = assembly::load_vec3(verts_b + 3 * static_cast<int64_t>(f1));
  in.v2 = assembly::load_vec3(verts_b + 3 * static_cast<int64_t>(f2));
  in.bary = bary + 3 * n;
  in.rotation = rot + 4 * n;
  in.log_scale = log_scale + 3 * n;
  in.raw = raw_bn;
  return true;
}

}  // namespace

AssemblyOutputs gaussian_assembly_cpu(const at::Tensor& verts_in, const at::Tensor& faces_in,
                                      const at::Tensor& bary_in, const at::Tensor& rotation_in,
                                      const at::Tensor& log_scale_in, const at::Tensor& raw_in, double offset_scale,
                                      bool parity) {
  const char* op = "flashavatar::gaussian_assembly";
  check_assembly_args(op, verts_in, faces_in, bary_in, rotation_in, log_scale_in, raw_in);
  const at::Tensor verts = verts_in.contiguous(), faces = faces_in.contiguous(), bary = bary_in.contiguous(),
                   rotation = rotation_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   raw = raw_in.contiguous();
  const int64_t B = raw.size(0), N = raw.size(1), V = verts.size(1);
  at::Tensor means = at::empty({B, N, 3}, verts.options()), quats = at::empty({B, N, 4}, verts.options()),
             scales = at::empty({B, N, 3}, verts.options()), local = at::empty({B, N, 4}, verts.options());
  if (B * N == 0) return {means, quats, scales, local};
  AT_DISPATCH_FLOATING_TYPES(verts.scalar_type(), "gaussian_assembly_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(faces.scalar_type(), "gaussian_assembly_cpu_index", [&] {
      const scalar_t *vp = verts.data_ptr<scalar_t>(), *bp = bary.data_ptr<scalar_t>(),
                     *rp = rotation.data_ptr<scalar_t>(), *lp = log_scale.data_ptr<scalar_t>(),
                     *raw_p = raw.data_ptr<scalar_t>();
      const index_t* fp = faces.data_ptr<index_t>();
      scalar_t *mp = means.data_ptr<scalar_t>(), *qp = quats.data_ptr<scalar_t>(), *sp = scales.data_ptr<scalar_t>(),
               *lq = local.data_ptr<scalar_t>();
      const scalar_t os = static_cast<scalar_t>(offset_scale);
      at::parallel_for(0, B * N, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / N, n = i - b * N;
          assembly::Inputs<scalar_t> in;
          if (!gather_inputs(vp + b * V * 3, V, fp, bp, rp, lp, raw_p + assembly::kRawDim * i, n, in)) {
            const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
            for (int k = 0; k < 3; ++k) mp[3 * i + k] = sp[3 * i + k] = nan;
            for (int k = 0; k < 4; ++k) qp[4 * i + k] = lq[4 * i + k] = nan;
            continue;
          }
          assembly::forward(in, os, parity, mp + 3 * i, qp + 4 * i, sp + 3 * i, lq + 4 * i);
        }
      });
    });
  });
  return {means, quats, scales, local};
}

AssemblyOutputs gaussian_assembly_backward_cpu(const at::Tensor& grad_means_in, const at::Tensor& grad_quats_in,
                                               const at::Tensor& grad_scales_in, const at::Tensor& grad_local_in,
                                               const at::Tensor& verts_in, const at::Tensor& faces_in,
                                               const at::Tensor& bary_in, const at::Tensor& rotation_in,
                                               const at::Tensor& log_scale_in, const at::Tensor& raw_in,
                                               double offset_scale, bool parity, bool need_verts_grad) {
  const char* op = "flashavatar::gaussian_assembly_backward";
  check_assembly_args(op, verts_in, faces_in, bary_in, rotation_in, log_scale_in, raw_in);
  check_assembly_grads(op, grad_means_in, grad_quats_in, grad_scales_in, grad_local_in, raw_in);
  const auto dtype = verts_in.scalar_type();
  const at::Tensor verts = verts_in.contiguous(), faces = faces_in.contiguous(), bary = bary_in.contiguous(),
                   rotation = rotation_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   raw = raw_in.contiguous();
  const at::Tensor g_means = grad_means_in.to(dtype).contiguous(), g_quats = grad_quats_in.to(dtype).contiguous(),
                   g_scales = grad_scales_in.to(dtype).contiguous(), g_local = grad_local_in.to(dtype).contiguous();
  const int64_t B = raw.size(0), N = raw.size(1), V = verts.size(1);
  at::Tensor grad_verts = at::zeros_like(verts);
  // per (frame, Gaussian), summed over frames below: deterministic, no atomics
  at::Tensor grad_rot = at::zeros({B, N, 4}, verts.options()), grad_ls = at::zeros({B, N, 3}, verts.options());
  at::Tensor grad_raw = at::zeros({B, N, 10}, verts.options());
  if (B * N > 0) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "gaussian_assembly_backward_cpu", [&] {
      AT_DISPATCH_INDEX_TYPES(faces.scalar_type(), "gaussian_assembly_backward_cpu_index", [&] {
        const scalar_t *vp = verts.data_ptr<scalar_t>(), *bp = bary.data_ptr<scalar_t>(),
                       *rp = rotation.data_ptr<scalar_t>(), *lp = log_scale.data_ptr<scalar_t>(),
                       *raw_p = raw.data_ptr<scalar_t>();
        const scalar_t *gm = g_means.data_ptr<scalar_t>(), *gq = g_quats.data_ptr<scalar_t>(),
                       *gs = g_scales.data_ptr<scalar_t>(), *gl = g_local.data_ptr<scalar_t>();
        const index_t* fp = faces.data_ptr<index_t>();
        scalar_t *gv = grad_verts.data_ptr<scalar_t>(), *gr = grad_rot.data_ptr<scalar_t>(),
                 *gls = grad_ls.data_ptr<scalar_t>(), *graw = grad_raw.data_ptr<scalar_t>();
        const scalar_t os = static_cast<scalar_t>(offset_scale);
        // 1. every (frame, Gaussian) in parallel; corner gradients into a buffer [B, N, 3 corners, 3]
        at::Tensor corner = need_verts_grad ? at::empty({B, N, 9}, verts.options()) : at::Tensor();
        scalar_t* gc = need_verts_grad ? corner.data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, B * N, 256, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t b = i / N, n = i - b * N;
            assembly::Inputs<scalar_t> in;
            Vec3<scalar_t> g[3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
            if (gather_inputs(vp + b * V * 3, V, fp, bp, rp, lp, raw_p + assembly::kRawDim * i, n, in))
              assembly::backward(in, os, parity, gm + 3 * i, gq + 4 * i, gs + 3 * i, gl + 4 * i, g[0], g[1], g[2],
                                 gr + 4 * i, gls + 3 * i, graw + assembly::kRawDim * i);
            if (gc != nullptr)
              for (int k = 0; k < 3; ++k) {
                gc[9 * i + 3 * k] = g[k].x;
                gc[9 * i + 3 * k + 1] = g[k].y;
                gc[9 * i + 3 * k + 2] = g[k].z;
              }
          }
        });
        if (gc == nullptr) return;
        // 2. scatter into the vertices, one frame per task (no races, a fixed order: deterministic)
        at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            scalar_t* gv_b = gv + b * V * 3;
            for (int64_t n = 0; n < N; ++n) {
              const scalar_t* g = gc + 9 * (b * N + n);
              for (int k = 0; k < 3; ++k) {
                const int64_t f = static_cast<int64_t>(fp[3 * n + k]);
                if (f < 0 || f >= V) break;  // its outputs were NaN: no gradient
                gv_b[3 * f] += g[3 * k];
                gv_b[3 * f + 1] += g[3 * k + 1];
                gv_b[3 * f + 2] += g[3 * k + 2];
              }
            }
          }
        });
      });
    });
  }
  return {grad_verts, grad_rot.sum(0), grad_ls.sum(0), grad_raw};
}

}  // namespace flashavatar
