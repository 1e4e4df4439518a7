// CPU mlp_input / mlp_head (contract in mlp_layers.h): ATen, the reference the CUDA kernels are checked against.
#include "mlp/mlp_layers.h"

namespace flashavatar {

at::Tensor mlp_input_cpu(const at::Tensor& h_pe, const at::Tensor& cond) {
  check_mlp_input_args("flashavatar::mlp_input", h_pe, cond);
  return mlp_input_aten(h_pe, cond);
}

at::Tensor mlp_head_cpu(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, bool apply_tanh) {
  check_mlp_head_args("flashavatar::mlp_head", h, w, b);
  return mlp_head_aten(h, w, b, apply_tanh);
}

}  // namespace flashavatar
