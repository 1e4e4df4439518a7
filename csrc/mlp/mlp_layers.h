// The first and last layers of the Animator's MLP as their own ops, around the cuBLAS hidden layers. At batch 64
// of a uv-128 avatar (927k rows) the torch versions took 0.82 ms (a broadcast add + an in-place ReLU over
// 927k x 256 values) and 0.29 ms (an fp32-output GEMM with 10 columns, bias add, tanh) of a 2.5 ms MLP
// (benchmarks/results/profile_batch_h200.log); each is one pass over memory here.
//
//   mlp_input(h_pe [N, H], cond [B, H]) -> [B, N, H]
//       relu(h_pe[g] + cond[f]) for frame f, Gaussian g: the sum in float32, rounded to the inputs' dtype
//       (float32, bfloat16 or float16), exactly what torch.relu(h_pe[None] + cond[:, None]) gives.
//   mlp_head(h [R, H], w [O, H], b [O], apply_tanh) -> [R, O] float32
//       h w^T + b (then tanh), products of the dtype's values summed in float32.
// CUDA: mlp_input in 16-byte vectors; mlp_head on tensor cores (mma.sync m16n8k16, the weights' fragments held
// in registers, each warp streaming 16-row tiles of h) for bf16/fp16, H = 256 and O <= 16, through ATen
// otherwise. CPU: ATen (the reference the CUDA kernels are tested against).
#pragma once
#include <torch/types.h>

#include "common/checks.h"

namespace flashavatar {

inline void check_mlp_input_args(const char* op, const at::Tensor& h_pe, const at::Tensor& cond) {
  FA_CHECK(op, h_pe.dim() == 2, "h_pe must have shape [N, H], got ", sizes_str(h_pe));
  FA_CHECK(op, cond.dim() == 2 && cond.size(1) == h_pe.size(1), "cond must have shape [B, H] = [B, ", h_pe.size(1),
           "], got ", sizes_str(cond));
  FA_CHECK(op,
           h_pe.scalar_type() == at::kFloat || h_pe.scalar_type() == at::kBFloat16 ||
               h_pe.scalar_type() == at::kHalf,
           "h_pe must be float32, bfloat16 or float16, got ", h_pe.scalar_type());
  FA_CHECK_SAME_DTYPE(op, h_pe, cond);
  FA_CHECK_SAME_DEVICE(op, h_pe, cond);
}

inline void check_mlp_head_args(const char* op, const at::Tensor& h, const at::Tensor& w, const at::Tensor& b) {
  FA_CHECK(op, h.dim() == 2, "h must have shape [R, H], got ", sizes_str(h));
  FA_CHECK(op, w.dim() == 2 && w.size(0) >= 1 && w.size(1) == h.size(1), "w must have shape [O, H] = [O, ",
           h.size(1), "] with O >= 1, got ", sizes_str(w));
  FA_CHECK(op, b.dim() == 1 && b.size(0) == w.size(0), "b must have shape [O] = [", w.size(0), "], got ",
           sizes_str(b));
  FA_CHECK(op,
           h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kHalf,
           "h must be float32, bfloat16 or float16, got ", h.scalar_type());
  FA_CHECK_SAME_DTYPE(op, h, w);
  FA_CHECK(op, b.scalar_type() == at::kFloat, "b must be float32, got ", b.scalar_type());
  FA_CHECK_SAME_DEVICE(op, h, w);
  FA_CHECK_SAME_DEVICE(op, h, b);
}

// The ATen forms (CPU kernels, and the CUDA fallback for shapes the kernels do not take).
inline at::Tensor mlp_input_aten(const at::Tensor& h_pe, const at::Tensor& cond) {
  return (h_pe.to(at::kFloat).unsqueeze(0) + cond.to(at::kFloat).unsqueeze(1)).relu_().to(h_pe.scalar_type());
}
inline at::Tensor mlp_head_aten(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, bool apply_tanh) {
  at::Tensor out = at::addmm(b, h.to(at::kFloat), w.to(at::kFloat).t());
  return apply_tanh ? out.tanh_() : out;
}

at::Tensor mlp_input_cpu(const at::Tensor& h_pe, const at::Tensor& cond);
at::Tensor mlp_head_cpu(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, bool apply_tanh);
#ifdef WITH_CUDA
at::Tensor mlp_input_cuda(const at::Tensor& h_pe, const at::Tensor& cond);
at::Tensor mlp_head_cuda(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, bool apply_tanh);
#endif

}  // namespace flashavatar
