// CUDA kernels of gaussian_w2: one thread per Gaussian pair, the same math as w2_cpu.cpp (gaussian_w2.h),
// computed in float64 whatever the input dtype (a few hundred flops per pair; the op is memory bound).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include "emd/emd.h"
#include "emd/gaussian_w2.h"

namespace flashavatar {
namespace {

constexpr int kThreads = 128;

inline int blocks_for(int64_t k) { return static_cast<int>((k + kThreads - 1) / kThreads); }

template <typename scalar_t>
__global__ void w2_cov_fwd_kernel(int64_t k, const scalar_t* __restrict__ mu0 /* [K,3] */,
                                  const scalar_t* __restrict__ cov0 /* [K,9] */,
                                  const scalar_t* __restrict__ mu1 /* [K,3] */,
                                  const scalar_t* __restrict__ cov1 /* [K,9] */, scalar_t* __restrict__ out /* [K] */) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= k) return;
  out[i] = static_cast<scalar_t>(w2::w2_cov_forward(mu0 + 3 * i, cov0 + 9 * i, mu1 + 3 * i, cov1 + 9 * i));
}

template <typename scalar_t>
__global__ void w2_cov_bwd_kernel(int64_t k, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ mu0,
                                  const scalar_t* __restrict__ cov0, const scalar_t* __restrict__ mu1,
                                  const scalar_t* __restrict__ cov1, scalar_t* __restrict__ d_mu0,
                                  scalar_t* __restrict__ d_cov0, scalar_t* __restrict__ d_mu1,
                                  scalar_t* __restrict__ d_cov1) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= k) return;
  w2::w2_cov_backward(static_cast<double>(grad[i]), mu0 + 3 * i, cov0 + 9 * i, mu1 + 3 * i, cov1 + 9 * i,
                      d_mu0 + 3 * i, d_cov0 + 9 * i, d_mu1 + 3 * i, d_cov1 + 9 * i);
}

template <typename scalar_t>
__global__ void w2_sq_fwd_kernel(int64_t k, const scalar_t* __restrict__ mu0, const scalar_t* __restrict__ s0,
                                 const scalar_t* __restrict__ q0, const scalar_t* __restrict__ mu1,
                                 const scalar_t* __restrict__ s1, const scalar_t* __restrict__ q1,
                                 scalar_t* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= k) return;
  out[i] = static_cast<scalar_t>(
      w2::w2_sq_forward(mu0 + 3 * i, s0 + 3 * i, q0 + 4 * i, mu1 + 3 * i, s1 + 3 * i, q1 + 4 * i));
}

template <typename scalar_t>
__global__ void w2_sq_bwd_kernel(int64_t k, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ mu0,
                                 const scalar_t* __restrict__ s0, const scalar_t* __restrict__ q0,
                                 const scalar_t* __restrict__ mu1, const scalar_t* __restrict__ s1,
                                 const scalar_t* __restrict__ q1, scalar_t* __restrict__ d_mu0,
                                 scalar_t* __restrict__ d_s0, scalar_t* __restrict__ d_q0,
                                 scalar_t* __restrict__ d_mu1, scalar_t* __restrict__ d_s1,
                                 scalar_t* __restrict__ d_q1) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= k) return;
  w2::w2_sq_backward(static_cast<double>(grad[i]), mu0 + 3 * i, s0 + 3 * i, q0 + 4 * i, mu1 + 3 * i, s1 + 3 * i,
                     q1 + 4 * i, d_mu0 + 3 * i, d_s0 + 3 * i, d_q0 + 4 * i, d_mu1 + 3 * i, d_s1 + 3 * i,
                     d_q1 + 4 * i);
}

}  // namespace

at::Tensor gaussian_w2_cuda(const at::Tensor& mu0_in, const at::Tensor& cov0_in, const at::Tensor& mu1_in,
                            const at::Tensor& cov1_in) {
  const char* op = "flashavatar::gaussian_w2";
  check_w2_cov_args(op, mu0_in, cov0_in, mu1_in, cov1_in);
  const c10::cuda::CUDAGuard guard(mu0_in.device());
  const at::Tensor mu0 = mu0_in.contiguous(), cov0 = cov0_in.contiguous(), mu1 = mu1_in.contiguous(),
                   cov1 = cov1_in.contiguous();
  const int64_t k = mu0.size(0);
  at::Tensor out = at::empty({k}, mu0.options());
  if (k == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_cuda", [&] {
    w2_cov_fwd_kernel<scalar_t><<<blocks_for(k), kThreads, 0, stream>>>(
        k, mu0.data_ptr<scalar_t>(), cov0.data_ptr<scalar_t>(), mu1.data_ptr<scalar_t>(), cov1.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>());
    FA_CUDA_CHECK_LAUNCH();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& mu0_in, const at::Tensor& cov0_in, const at::Tensor& mu1_in,
    const at::Tensor& cov1_in) {
  const char* op = "flashavatar::gaussian_w2_backward";
  check_w2_cov_args(op, mu0_in, cov0_in, mu1_in, cov1_in);
  FA_CHECK(op, grad_in.dim() == 1 && grad_in.size(0) == mu0_in.size(0), "grad must have shape [K] with K = ",
           mu0_in.size(0), ", got ", sizes_str(grad_in));
  FA_CHECK_SAME_DEVICE(op, grad_in, mu0_in);
  const c10::cuda::CUDAGuard guard(mu0_in.device());
  const at::Tensor grad = grad_in.to(mu0_in.scalar_type()).contiguous();
  const at::Tensor mu0 = mu0_in.contiguous(), cov0 = cov0_in.contiguous(), mu1 = mu1_in.contiguous(),
                   cov1 = cov1_in.contiguous();
  at::Tensor d_mu0 = at::empty_like(mu0), d_cov0 = at::empty_like(cov0), d_mu1 = at::empty_like(mu1),
             d_cov1 = at::empty_like(cov1);
  const int64_t k = mu0.size(0);
  if (k == 0) return {d_mu0, d_cov0, d_mu1, d_cov1};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_backward_cuda", [&] {
    w2_cov_bwd_kernel<scalar_t><<<blocks_for(k), kThreads, 0, stream>>>(
        k, grad.data_ptr<scalar_t>(), mu0.data_ptr<scalar_t>(), cov0.data_ptr<scalar_t>(), mu1.data_ptr<scalar_t>(),
        cov1.data_ptr<scalar_t>(), d_mu0.data_ptr<scalar_t>(), d_cov0.data_ptr<scalar_t>(),
        d_mu1.data_ptr<scalar_t>(), d_cov1.data_ptr<scalar_t>());
    FA_CUDA_CHECK_LAUNCH();
  });
  return {d_mu0, d_cov0, d_mu1, d_cov1};
}

at::Tensor gaussian_w2_sq_cuda(const at::Tensor& mu0_in, const at::Tensor& s0_in, const at::Tensor& q0_in,
                               const at::Tensor& mu1_in, const at::Tensor& s1_in, const at::Tensor& q1_in) {
  const char* op = "flashavatar::gaussian_w2_sq";
  check_w2_sq_args(op, mu0_in, s0_in, q0_in, mu1_in, s1_in, q1_in);
  const c10::cuda::CUDAGuard guard(mu0_in.device());
  const at::Tensor mu0 = mu0_in.contiguous(), s0 = s0_in.contiguous(), q0 = q0_in.contiguous(),
                   mu1 = mu1_in.contiguous(), s1 = s1_in.contiguous(), q1 = q1_in.contiguous();
  const int64_t k = mu0.size(0);
  at::Tensor out = at::empty({k}, mu0.options());
  if (k == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_sq_cuda", [&] {
    w2_sq_fwd_kernel<scalar_t><<<blocks_for(k), kThreads, 0, stream>>>(
        k, mu0.data_ptr<scalar_t>(), s0.data_ptr<scalar_t>(), q0.data_ptr<scalar_t>(), mu1.data_ptr<scalar_t>(),
        s1.data_ptr<scalar_t>(), q1.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    FA_CUDA_CHECK_LAUNCH();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_sq_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& mu0_in, const at::Tensor& s0_in, const at::Tensor& q0_in,
    const at::Tensor& mu1_in, const at::Tensor& s1_in, const at::Tensor& q1_in) {
  const char* op = "flashavatar::gaussian_w2_sq_backward";
  check_w2_sq_args(op, mu0_in, s0_in, q0_in, mu1_in, s1_in, q1_in);
  FA_CHECK(op, grad_in.dim() == 1 && grad_in.size(0) == mu0_in.size(0), "grad must have shape [K] with K = ",
           mu0_in.size(0), ", got ", sizes_str(grad_in));
  FA_CHECK_SAME_DEVICE(op, grad_in, mu0_in);
  const c10::cuda::CUDAGuard guard(mu0_in.device());
  const at::Tensor grad = grad_in.to(mu0_in.scalar_type()).contiguous();
  const at::Tensor mu0 = mu0_in.contiguous(), s0 = s0_in.contiguous(), q0 = q0_in.contiguous(),
                   mu1 = mu1_in.contiguous(), s1 = s1_in.contiguous(), q1 = q1_in.contiguous();
  at::Tensor d_mu0 = at::empty_like(mu0), d_s0 = at::empty_like(s0), d_q0 = at::empty_like(q0),
             d_mu1 = at::empty_like(mu1), d_s1 = at::empty_like(s1), d_q1 = at::empty_like(q1);
  const int64_t k = mu0.size(0);
  if (k == 0) return {d_mu0, d_s0, d_q0, d_mu1, d_s1, d_q1};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mu0.scalar_type(), "gaussian_w2_sq_backward_cuda", [&] {
    w2_sq_bwd_kernel<scalar_t><<<blocks_for(k), kThreads, 0, stream>>>(
        k, grad.data_ptr<scalar_t>(), mu0.data_ptr<scalar_t>(), s0.data_ptr<scalar_t>(), q0.data_ptr<scalar_t>(),
        mu1.data_ptr<scalar_t>(), s1.data_ptr<scalar_t>(), q1.data_ptr<scalar_t>(), d_mu0.data_ptr<scalar_t>(),
        d_s0.data_ptr<scalar_t>(), d_q0.data_ptr<scalar_t>(), d_mu1.data_ptr<scalar_t>(), d_s1.data_ptr<scalar_t>(),
        d_q1.data_ptr<scalar_t>());
    FA_CUDA_CHECK_LAUNCH();
  });
  return {d_mu0, d_s0, d_q0, d_mu1, d_s1, d_q1};
}

}  // namespace flashavatar
