// fused_mlp: the Animator's deformation MLP over every (frame, Gaussian) row in one launch (inference only).
// A row r = f * N + g of frame f and Gaussian g:
//   h_0 = relu(h_pe[g] + cond[f])                            (the two halves of the first layer, rounded to T)
//   h_l = relu(W_l h_(l-1) + b_l), l = 1..L                   (float32 accumulation, rounded to T)
//   out[r] = W_out h_L + b_out                                (float32, not rounded)
// which is what the Animator's chunked cuBLAS path computes (the same roundings; sums in another order).
//   h_pe     [N, 256] T = bfloat16 or float16 (the per-Gaussian half of layer 1, its bias included)
//   cond     [B, 256] T (the per-frame half of layer 1)
//   w_hidden [L, 256, 256] T, torch.nn.Linear layout [out, in]; b_hidden [L, 256] float32
//   w_out    [O, 256] T with 1 <= O <= 16;                      b_out [O] float32
//   returns  [B, N, O] float32
// CUDA: one 256-thread block per 128 rows, the rows' activations and one layer's weights in shared memory
// (198 KB: needs an sm_80+ GPU that opts in to that much), bf16/fp16 tensor-core MMAs (mma.sync m16n8k16). CPU:
// the same roundings through ATen (the reference the CUDA kernel is tested against).
#pragma once
#include <torch/types.h>

#include "common/checks.h"

namespace flashavatar {

constexpr int64_t kFusedMlpWidth = 256;
constexpr int64_t kFusedMlpMaxOut = 16;

inline void check_fused_mlp_args(const char* op, const at::Tensor& h_pe, const at::Tensor& cond,
                                 const at::Tensor& w_hidden, const at::Tensor& b_hidden, const at::Tensor& w_out,
                                 const at::Tensor& b_out) {
  const int64_t H = kFusedMlpWidth;
  FA_CHECK(op, h_pe.dim() == 2 && h_pe.size(1) == H, "h_pe must have shape [N, 256], got ", sizes_str(h_pe));
  FA_CHECK(op, cond.dim() == 2 && cond.size(1) == H, "cond must have shape [B, 256], got ", sizes_str(cond));
  FA_CHECK(op, h_pe.scalar_type() == at::kBFloat16 || h_pe.scalar_type() == at::kHalf,
           "h_pe must be bfloat16 or float16, got ", h_pe.scalar_type());
  FA_CHECK(op, w_hidden.dim() == 3 && w_hidden.size(1) == H && w_hidden.size(2) == H,
           "w_hidden must have shape [L, 256, 256], got ", sizes_str(w_hidden));
  FA_CHECK(op, b_hidden.dim() == 2 && b_hidden.size(0) == w_hidden.size(0) && b_hidden.size(1) == H,
           "b_hidden must have shape [L, 256] = [", w_hidden.size(0), ", 256], got ", sizes_str(b_hidden));
  FA_CHECK(op, w_out.dim() == 2 && w_out.size(0) >= 1 && w_out.size(0) <= kFusedMlpMaxOut && w_out.size(1) == H,
           "w_out must have shape [O, 256] with 1 <= O <= 16, got ", sizes_str(w_out));
  FA_CHECK(op, b_out.dim() == 1 && b_out.size(0) == w_out.size(0), "b_out must have shape [O] = [", w_out.size(0),
           "], got ", sizes_str(b_out));
  FA_CHECK_SAME_DTYPE(op, h_pe, cond);
  FA_CHECK_SAME_DTYPE(op, h_pe, w_hidden);
  FA_CHECK_SAME_DTYPE(op, h_pe, w_out);
  FA_CHECK(op, b_hidden.scalar_type() == at::kFloat && b_out.scalar_type() == at::kFloat,
           "b_hidden and b_out must be float32, got ", b_hidden.scalar_type(), " and ", b_out.scalar_type());
  for (const at::Tensor* t : {&cond, &w_hidden, &b_hidden, &w_out, &b_out})
    FA_CHECK(op, t->device() == h_pe.device(), "all inputs must be on h_pe's device ", h_pe.device(), ", got ",
             t->device());
}

at::Tensor fused_mlp_cpu(const at::Tensor& h_pe, const at::Tensor& cond, const at::Tensor& w_hidden,
                         const at::Tensor& b_hidden, const at::Tensor& w_out, const at::Tensor& b_out);
#ifdef WITH_CUDA
at::Tensor fused_mlp_cuda(const at::Tensor& h_pe, const at::Tensor& cond, const at::Tensor& w_hidden,
                          const at::Tensor& b_hidden, const at::Tensor& w_out, const at::Tensor& b_out);
#endif

}  // namespace flashavatar
