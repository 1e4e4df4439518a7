// CPU fused_mlp: the op's arithmetic through ATen (float32 products and sums of values rounded to the input dtype
// after every layer), the reference the CUDA kernel is checked against. Not fast: the Animator's CPU path uses its
// own chunked GEMMs.
#include "mlp/fused_mlp.h"

namespace flashavatar {

at::Tensor fused_mlp_cpu(const at::Tensor& h_pe, const at::Tensor& cond, const at::Tensor& w_hidden,
                         const at::Tensor& b_hidden, const at::Tensor& w_out, const at::Tensor& b_out) {
  check_fused_mlp_args("flashavatar::fused_mlp", h_pe, cond, w_hidden, b_hidden, w_out, b_out);
  const auto dt = h_pe.scalar_type();
  const int64_t B = cond.size(0), N = h_pe.size(0);
  // [B, N, 256]: the first layer's halves, rounded like every later activation
  at::Tensor h = (h_pe.to(at::kFloat).unsqueeze(0) + cond.to(at::kFloat).unsqueeze(1)).relu_().to(dt);
  h = h.reshape({B * N, kFusedMlpWidth});
  for (int64_t l = 0; l < w_hidden.size(0); ++l)
    h = at::addmm(b_hidden[l], h.to(at::kFloat), w_hidden[l].to(at::kFloat).t()).relu_().to(dt);
  return at::addmm(b_out, h.to(at::kFloat), w_out.to(at::kFloat).t()).reshape({B, N, w_out.size(0)});
}

}  // namespace flashavatar
