// CPU kernels of gaussian_w2: the same per-pair math as w2.cu (gaussian_w2.h), in an at::parallel_for loop.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include "emd/emd.h"
#include "emd/gaussian_w2.h"

namespace flashavatar {

at::Tensor gaussian_w2_cpu(const at::Tensor& mu0_in, const at::Tensor& cov0_in, const at::Tensor& mu1_in,
                           const at::Tensor& cov1_in) {
  const char* op = "flashavatar::gaussian_w2";
  check_w2_cov_args(op, mu0_in, cov0_in, mu1_in, cov1_in);
  const at::Tensor mu0 = mu0_in.contiguous(), cov0 = cov0_in.contiguous(), mu1 = mu1_in.contiguous(),
                   cov1 = cov1_in.contiguous();
  const int64_t k = mu0.size(0);
  at::Tensor out = at::empty({k}, mu0.options());
  if (k == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_cpu", [&] {
    const scalar_t *m0 = mu0.data_ptr<scalar_t>(), *c0 = cov0.data_ptr<scalar_t>(), *m1 = mu1.data_ptr<scalar_t>(),
                   *c1 = cov1.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, k, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        o[i] = static_cast<scalar_t>(w2::w2_cov_forward(m0 + 3 * i, c0 + 9 * i, m1 + 3 * i, c1 + 9 * i));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& mu0_in, const at::Tensor& cov0_in, const at::Tensor& mu1_in,
    const at::Tensor& cov1_in) {
  const char* op = "flashavatar::gaussian_w2_backward";
  check_w2_cov_args(op, mu0_in, cov0_in, mu1_in, cov1_in);
  FA_CHECK(op, grad_in.dim() == 1 && grad_in.size(0) == mu0_in.size(0), "grad must have shape [K] with K = ",
           mu0_in.size(0), ", got ", sizes_str(grad_in));
  const at::Tensor grad = grad_in.to(mu0_in.scalar_type()).contiguous();
  const at::Tensor mu0 = mu0_in.contiguous(), cov0 = cov0_in.contiguous(), mu1 = mu1_in.contiguous(),
                   cov1 = cov1_in.contiguous();
  at::Tensor d_mu0 = at::empty_like(mu0), d_cov0 = at::empty_like(cov0), d_mu1 = at::empty_like(mu1),
             d_cov1 = at::empty_like(cov1);
  const int64_t k = mu0.size(0);
  if (k == 0) return {d_mu0, d_cov0, d_mu1, d_cov1};
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_backward_cpu", [&] {
    const scalar_t *g = grad.data_ptr<scalar_t>(), *m0 = mu0.data_ptr<scalar_t>(), *c0 = cov0.data_ptr<scalar_t>(),
                   *m1 = mu1.data_ptr<scalar_t>(), *c1 = cov1.data_ptr<scalar_t>();
    scalar_t *dm0 = d_mu0.data_ptr<scalar_t>(), *dc0 = d_cov0.data_ptr<scalar_t>(),
             *dm1 = d_mu1.data_ptr<scalar_t>(), *dc1 = d_cov1.data_ptr<scalar_t>();
    at::parallel_for(0, k, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        w2::w2_cov_backward(static_cast<double>(g[i]), m0 + 3 * i, c0 + 9 * i, m1 + 3 * i, c1 + 9 * i, dm0 + 3 * i,
                            dc0 + 9 * i, dm1 + 3 * i, dc1 + 9 * i);
    });
  });
  return {d_mu0, d_cov0, d_mu1, d_cov1};
}

at::Tensor gaussian_w2_sq_cpu(const at::Tensor& mu0_in, const at::Tensor& s0_in, const at::Tensor& q0_in,
                              const at::Tensor& mu1_in, const at::Tensor& s1_in, const at::Tensor& q1_in) {
  const char* op = "flashavatar::gaussian_w2_sq";
  check_w2_sq_args(op, mu0_in, s0_in, q0_in, mu1_in, s1_in, q1_in);
  const at::Tensor mu0 = mu0_in.contiguous(), s0 = s0_in.contiguous(), q0 = q0_in.contiguous(),
                   mu1 = mu1_in.contiguous(), s1 = s1_in.contiguous(), q1 = q1_in.contiguous();
  const int64_t k = mu0.size(0);
  at::Tensor out = at::empty({k}, mu0.options());
  if (k == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_sq_cpu", [&] {
    const scalar_t *m0 = mu0.data_ptr<scalar_t>(), *a0 = s0.data_ptr<scalar_t>(), *r0 = q0.data_ptr<scalar_t>(),
                   *m1 = mu1.data_ptr<scalar_t>(), *a1 = s1.data_ptr<scalar_t>(), *r1 = q1.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, k, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        o[i] = static_cast<scalar_t>(
            w2::w2_sq_forward(m0 + 3 * i, a0 + 3 * i, r0 + 4 * i, m1 + 3 * i, a1 + 3 * i, r1 + 4 * i));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_sq_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& mu0_in, const at::Tensor& s0_in, const at::Tensor& q0_in,
    const at::Tensor& mu1_in, const at::Tensor& s1_in, const at::Tensor& q1_in) {
  const char* op = "flashavatar::gaussian_w2_sq_backward";
  check_w2_sq_args(op, mu0_in, s0_in, q0_in, mu1_in, s1_in, q1_in);
  FA_CHECK(op, grad_in.dim() == 1 && grad_in.size(0) == mu0_in.size(0), "grad must have shape [K] with K = ",
           mu0_in.size(0), ", got ", sizes_str(grad_in));
  const at::Tensor grad = grad_in.to(mu0_in.scalar_type()).contiguous();
  const at::Tensor mu0 = mu0_in.contiguous(), s0 = s0_in.contiguous(), q0 = q0_in.contiguous(),
                   mu1 = mu1_in.contiguous(), s1 = s1_in.contiguous(), q1 = q1_in.contiguous();
  at::Tensor d_mu0 = at::empty_like(mu0), d_s0 = at::empty_like(s0), d_q0 = at::empty_like(q0),
             d_mu1 = at::empty_like(mu1), d_s1 = at::empty_like(s1), d_q1 = at::empty_like(q1);
  const int64_t k = mu0.size(0);
  if (k == 0) return {d_mu0, d_s0, d_q0, d_mu1, d_s1, d_q1};
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_sq_backward_cpu", [&] {
    const scalar_t *g = grad.data_ptr<scalar_t>(), *m0 = mu0.data_ptr<scalar_t>(), *a0 = s0.data_ptr<scalar_t>(),
                   *r0 = q0.data_ptr<scalar_t>(), *m1 = mu1.data_ptr<scalar_t>(), *a1 = s1.data_ptr<scalar_t>(),
                   *r1 = q1.data_ptr<scalar_t>();
    scalar_t *dm0 = d_mu0.data_ptr<scalar_t>(), *da0 = d_s0.data_ptr<scalar_t>(), *dr0 = d_q0.data_ptr<scalar_t>(),
             *dm1 = d_mu1.data_ptr<scalar_t>(), *da1 = d_s1.data_ptr<scalar_t>(), *dr1 = d_q1.data_ptr<scalar_t>();
    at::parallel_for(0, k, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        w2::w2_sq_backward(static_cast<double>(g[i]), m0 + 3 * i, a0 + 3 * i, r0 + 4 * i, m1 + 3 * i, a1 + 3 * i,
                           r1 + 4 * i, dm0 + 3 * i, da0 + 3 * i, dr0 + 4 * i, dm1 + 3 * i, da1 + 3 * i, dr1 + 4 * i);
    });
  });
  return {d_mu0, d_s0, d_q0, d_mu1, d_s1, d_q1};
}

}  // namespace flashavatar
