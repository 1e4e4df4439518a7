// CUDA kernels of gaussian_assembly: one thread per (frame, Gaussian), the per-Gaussian math of assembly_math.h
// (the same as assembly_cpu.cpp). Consecutive threads are consecutive Gaussians of one frame, so the per-Gaussian
// tables (faces, barycentrics, rotation, log-scale: ~52 B each) and raw are read coalesced; across frames the
// tables are re-read from L2. The forward is memory bound: ~56 B written and 40 B of raw read per Gaussian-frame.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "assembly/assembly.h"
#include "assembly/assembly_math.h"

namespace flashavatar {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t k) { return static_cast<unsigned>((k + kThreads - 1) / kThreads); }

template <typename scalar_t, typename index_t>
__device__ __forceinline__ bool gather_inputs(const scalar_t* __restrict__ verts_b /* [V, 3] */, int64_t n_verts,
                                              const index_t* __restrict__ faces /* [N, 3] */,
                                              const scalar_t* __restrict__ bary /* [N, 3] */,
                                              const scalar_t* __restrict__ rot /* [N, 4] */,
                                              const scalar_t* __restrict__ log_scale /* [N, 3] */,
                                              const scalar_t* __restrict__ raw_i /* [10] */, int64_t n,
                                              assembly::Inputs<scalar_t>& in, int64_t f[3]) {
  f[0] = static_cast<int64_t>(faces[3 * n]);
  f[1] = static_cast<int64_t>(faces[3 * n + 1]);
  f[2] = static_cast<int64_t>(faces[3 * n + 2]);
  for (int k = 0; k < 3; ++k)
    if (f[k] < 0 || f[k] >= n_verts) return false;
  in.v0 = assembly::load_vec3(verts_b + 3 * f[0]);
  in.v1 = assembly::load_vec3(verts_b + 3 * f[1]);
  in.v2 = assembly::load_vec3(verts_b + 3 * f[2]);
  in.bary = bary + 3 * n;
  in.rotation = rot + 4 * n;
  in.log_scale = log_scale + 3 * n;
  in.raw = raw_i;
  return true;
}

template <typename scalar_t, typename index_t>
__global__ void assembly_fwd_kernel(int64_t total, int64_t n_gauss, int64_t n_verts,
                                    const scalar_t* __restrict__ verts /* [B, V, 3] */,
                                    const index_t* __restrict__ faces /* [N, 3] */,
                                    const scalar_t* __restrict__ bary /* [N, 3] */,
                                    const scalar_t* __restrict__ rot /* [N, 4] */,
                                    const scalar_t* __restrict__ log_scale /* [N, 3] */,
                                    const scalar_t* __restrict__ raw /* [B, N, 10] */, scalar_t offset_scale,
                                    bool parity, scalar_t* __restrict__ means /* [B, N, 3] */,
                                    scalar_t* __restrict__ quats /* [B, N, 4] */,
                                    scalar_t* __restrict__ scales /* [B, N, 3] */,
                                    scalar_t* __restrict__ local /* [B, N, 4] */) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / n_gauss, n = i - b * n_gauss;
  assembly::Inputs<scalar_t> in;
  int64_t f[3];
  if (!gather_inputs(verts + b * n_verts * 3, n_verts, faces, bary, rot, log_scale, raw + assembly::kRawDim * i, n,
                     in, f)) {
    const scalar_t nan = scalar_t(NAN);
    for (int k = 0; k < 3; ++k) means[3 * i + k] = scales[3 * i + k] = nan;
    for (int k = 0; k < 4; ++k) quats[4 * i + k] = local[4 * i + k] = nan;
    return;
  }
  assembly::forward(in, offset_scale, parity, means + 3 * i, quats + 4 * i, scales + 3 * i, local + 4 * i);
}

template <typename scalar_t, typename index_t>
__global__ void assembly_bwd_kernel(int64_t total, int64_t n_gauss, int64_t n_verts,
                                    const scalar_t* __restrict__ verts, const index_t* __restrict__ faces,
                                    const scalar_t* __restrict__ bary, const scalar_t* __restrict__ rot,
                                    const scalar_t* __restrict__ log_scale, const scalar_t* __restrict__ raw,
                                    scalar_t offset_scale, bool parity, bool need_verts_grad,
                                    const scalar_t* __restrict__ g_means /* [B, N, 3] */,
                                    const scalar_t* __restrict__ g_quats /* [B, N, 4] */,
                                    const scalar_t* __restrict__ g_scales /* [B, N, 3] */,
                                    const scalar_t* __restrict__ g_local /* [B, N, 4] */,
                                    scalar_t* __restrict__ grad_verts /* [B, V, 3], accumulated */,
                                    scalar_t* __restrict__ grad_rot /* [B, N, 4] */,
                                    scalar_t* __restrict__ grad_ls /* [B, N, 3] */,
                                    scalar_t* __restrict__ grad_raw /* [B, N, 10] */) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / n_gauss, n = i - b * n_gauss;
  assembly::Inputs<scalar_t> in;
  int64_t f[3];
  if (!gather_inputs(verts + b * n_verts * 3, n_verts, faces, bary, rot, log_scale, raw + assembly::kRawDim * i, n,
                     in, f))
    return;  // outputs were NaN; gradients stay zero
  Vec3<scalar_t> g[3];
  assembly::backward(in, offset_scale, parity, g_means + 3 * i, g_quats + 4 * i, g_scales + 3 * i, g_local + 4 * i,
                     g[0], g[1], g[2], grad_rot + 4 * i, grad_ls + 3 * i, grad_raw + assembly::kRawDim * i);
  if (!need_verts_grad) return;
  scalar_t* gv = grad_verts + b * n_verts * 3;
  for (int k = 0; k < 3; ++k) {  // a vertex is shared by many Gaussians
    atomicAdd(gv + 3 * f[k], g[k].x);
    atomicAdd(gv + 3 * f[k] + 1, g[k].y);
    atomicAdd(gv + 3 * f[k] + 2, g[k].z);
  }
}

}  // namespace

AssemblyOutputs gaussian_assembly_cuda(const at::Tensor& verts_in, const at::Tensor& faces_in,
                                       const at::Tensor& bary_in, const at::Tensor& rotation_in,
                                       const at::Tensor& log_scale_in, const at::Tensor& raw_in, double offset_scale,
                                       bool parity) {
  const char* op = "flashavatar::gaussian_assembly";
  check_assembly_args(op, verts_in, faces_in, bary_in, rotation_in, log_scale_in, raw_in);
  const c10::cuda::CUDAGuard guard(verts_in.device());
  const at::Tensor verts = verts_in.contiguous(), faces = faces_in.contiguous(), bary = bary_in.contiguous(),
                   rotation = rotation_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   raw = raw_in.contiguous();
  const int64_t B = raw.size(0), N = raw.size(1), V = verts.size(1);
  at::Tensor means = at::empty({B, N, 3}, verts.options()), quats = at::empty({B, N, 4}, verts.options()),
             scales = at::empty({B, N, 3}, verts.options()), local = at::empty({B, N, 4}, verts.options());
  const int64_t total = B * N;
  if (total == 0) return {means, quats, scales, local};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(verts.scalar_type(), "gaussian_assembly_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(faces.scalar_type(), "gaussian_assembly_cuda_index", [&] {
      assembly_fwd_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          total, N, V, verts.data_ptr<scalar_t>(), faces.data_ptr<index_t>(), bary.data_ptr<scalar_t>(),
          rotation.data_ptr<scalar_t>(), log_scale.data_ptr<scalar_t>(), raw.data_ptr<scalar_t>(),
          static_cast<scalar_t>(offset_scale), parity, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(),
          scales.data_ptr<scalar_t>(), local.data_ptr<scalar_t>());
      FA_CUDA_CHECK_LAUNCH();
    });
  });
  return {means, quats, scales, local};
}

AssemblyOutputs gaussian_assembly_backward_cuda(const at::Tensor& grad_means_in, const at::Tensor& grad_quats_in,
                                                const at::Tensor& grad_scales_in, const at::Tensor& grad_local_in,
                                                const at::Tensor& verts_in, const at::Tensor& faces_in,
                                                const at::Tensor& bary_in, const at::Tensor& rotation_in,
                                                const at::Tensor& log_scale_in, const at::Tensor& raw_in,
                                                double offset_scale, bool parity, bool need_verts_grad) {
  const char* op = "flashavatar::gaussian_assembly_backward";
  check_assembly_args(op, verts_in, faces_in, bary_in, rotation_in, log_scale_in, raw_in);
  check_assembly_grads(op, grad_means_in, grad_quats_in, grad_scales_in, grad_local_in, raw_in);
  const c10::cuda::CUDAGuard guard(verts_in.device());
  if (need_verts_grad)
    at::globalContext().alertNotDeterministic("flashavatar::gaussian_assembly_backward (atomicAdd into grad_verts)");
  const auto dtype = verts_in.scalar_type();
  const at::Tensor verts = verts_in.contiguous(), faces = faces_in.contiguous(), bary = bary_in.contiguous(),
                   rotation = rotation_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   raw = raw_in.contiguous();
  const at::Tensor g_means = grad_means_in.to(dtype).contiguous(), g_quats = grad_quats_in.to(dtype).contiguous(),
                   g_scales = grad_scales_in.to(dtype).contiguous(), g_local = grad_local_in.to(dtype).contiguous();
  const int64_t B = raw.size(0), N = raw.size(1), V = verts.size(1);
  at::Tensor grad_verts = at::zeros_like(verts);
  // per (frame, Gaussian), summed over frames below (a reduction instead of N x B atomics)
  at::Tensor grad_rot = at::zeros({B, N, 4}, verts.options()), grad_ls = at::zeros({B, N, 3}, verts.options());
  at::Tensor grad_raw = at::zeros({B, N, 10}, verts.options());
  const int64_t total = B * N;
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(dtype, "gaussian_assembly_backward_cuda", [&] {
      AT_DISPATCH_INDEX_TYPES(faces.scalar_type(), "gaussian_assembly_backward_cuda_index", [&] {
        assembly_bwd_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            total, N, V, verts.data_ptr<scalar_t>(), faces.data_ptr<index_t>(), bary.data_ptr<scalar_t>(),
            rotation.data_ptr<scalar_t>(), log_scale.data_ptr<scalar_t>(), raw.data_ptr<scalar_t>(),
            static_cast<scalar_t>(offset_scale), parity, need_verts_grad, g_means.data_ptr<scalar_t>(),
            g_quats.data_ptr<scalar_t>(),
            g_scales.data_ptr<scalar_t>(), g_local.data_ptr<scalar_t>(), grad_verts.data_ptr<scalar_t>(),
            grad_rot.data_ptr<scalar_t>(), grad_ls.data_ptr<scalar_t>(), grad_raw.data_ptr<scalar_t>());
        FA_CUDA_CHECK_LAUNCH();
      });
    });
  }
  return {grad_verts, grad_rot.sum(0), grad_ls.sum(0), grad_raw};
}

}  // namespace flashavatar
