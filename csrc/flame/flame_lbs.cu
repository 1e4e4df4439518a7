// CUDA kernels of flame_lbs: blendshape coefficients (one thread per (frame, coefficient)), one cuBLAS GEMM, then
// skinning + eyelids (one thread per (frame, vertex)); the math of flame_lbs_math.h, as flame_lbs_cpu.cpp.
// Three launches instead of the ~25 small kernels of the torch path (what a batch-1 CUDA graph pays for).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "flame/flame_lbs.h"
#include "flame/flame_lbs_math.h"

namespace flashavatar {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t k) { return static_cast<unsigned>((k + kThreads - 1) / kThreads); }

template <typename scalar_t>
__global__ void features_kernel(int64_t B, int64_t S, int64_t E, int64_t shape_stride,
                                const scalar_t* __restrict__ shape /* [1|B, S] */,
                                const scalar_t* __restrict__ expr /* [B, E] */,
                                const scalar_t* __restrict__ jaw /* [B, 6] */,
                                const scalar_t* __restrict__ eyes /* [B, 12] */,
                                scalar_t* __restrict__ feats /* [B, S + E + 36] */,
                                scalar_t* __restrict__ rot /* [B, 3, 9] */) {
  const int64_t F = S + E + flame_lbs::kPoseFeatures;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= B * F) return;
  const int64_t b = i / F, k = i - b * F;
  scalar_t entry;
  bool is_rot;
  feats[i] = flame_lbs::feature(k, S, E, shape + b * shape_stride, expr + b * E, jaw + 6 * b, eyes + 12 * b, &entry,
                                &is_rot);
  if (is_rot) rot[b * 27 + (k - S - E - 9)] = entry;
}

template <typename scalar_t>
__global__ void skin_kernel(int64_t B, int64_t U, const scalar_t* __restrict__ lin /* [B, U*4 + 15] */,
                            const scalar_t* __restrict__ rot /* [B, 3, 9] */,
                            const scalar_t* __restrict__ weights /* [U, 5] */,
                            const scalar_t* __restrict__ eyelid_dirs /* [2, U*3] */,
                            const scalar_t* __restrict__ eyelids /* [B, 2] */, bool use_eyelids,
                            scalar_t* __restrict__ verts /* [B, U, 3] */) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= B * U) return;
  const int64_t b = i / U, u = i - b * U;
  flame_lbs::skin_vertex(u, U, lin + b * (4 * U + 15), rot + b * 27, weights + 5 * u, eyelid_dirs, eyelids + 2 * b,
                         use_eyelids, verts + 3 * i);
}

}  // namespace

at::Tensor flame_lbs_cuda(const at::Tensor& shape_in, const at::Tensor& expr_in, const at::Tensor& jaw_in,
                          const at::Tensor& eyes_in, const at::Tensor& eyelids_in, const at::Tensor& dirs,
                          const at::Tensor& base, const at::Tensor& lbs_weights_in,
                          const at::Tensor& eyelid_dirs_in, bool use_eyelids) {
  const char* op = "flashavatar::flame_lbs";
  check_flame_lbs_args(op, shape_in, expr_in, jaw_in, eyes_in, eyelids_in, dirs, base, lbs_weights_in,
                       eyelid_dirs_in);
  const c10::cuda::CUDAGuard guard(expr_in.device());
  const at::Tensor shape = shape_in.contiguous(), expr = expr_in.contiguous(), jaw = jaw_in.contiguous(),
                   eyes = eyes_in.contiguous(), eyelids = eyelids_in.contiguous(),
                   lbs_weights = lbs_weights_in.contiguous(), eyelid_dirs = eyelid_dirs_in.contiguous();
  const int64_t B = expr.size(0), E = expr.size(1), S = shape.size(1), U = lbs_weights.size(0);
  const int64_t F = S + E + flame_lbs::kPoseFeatures;
  at::Tensor verts = at::empty({B, U, 3}, expr.options());
  if (B == 0 || U == 0) return verts;
  at::Tensor feats = at::empty({B, F}, expr.options());
  at::Tensor rot = at::empty({B, flame_lbs::kPosed, 9}, expr.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(expr.scalar_type(), "flame_lbs_cuda_features", [&] {
    features_kernel<scalar_t><<<blocks_for(B * F), kThreads, 0, stream>>>(
        B, S, E, shape.size(0) == 1 ? 0 : S, shape.data_ptr<scalar_t>(), expr.data_ptr<scalar_t>(),
        jaw.data_ptr<scalar_t>(), eyes.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(), rot.data_ptr<scalar_t>());
    FA_CUDA_CHECK_LAUNCH();
  });
  const at::Tensor lin = at::addmm(base, feats, dirs);  // [B, U*4 + 15], on the current stream
  AT_DISPATCH_FLOATING_TYPES(expr.scalar_type(), "flame_lbs_cuda_skin", [&] {
    skin_kernel<scalar_t><<<blocks_for(B * U), kThreads, 0, stream>>>(
        B, U, lin.data_ptr<scalar_t>(), rot.data_ptr<scalar_t>(), lbs_weights.data_ptr<scalar_t>(),
        eyelid_dirs.data_ptr<scalar_t>(), eyelids.data_ptr<scalar_t>(), use_eyelids, verts.data_ptr<scalar_t>());
    FA_CUDA_CHECK_LAUNCH();
  });
  return verts;
}

}  // namespace flashavatar
