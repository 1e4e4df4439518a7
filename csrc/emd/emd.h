// Contract of the optimal-transport op family: batched exact Earth Mover's distance (emd) and the closed-form
// squared 2-Wasserstein distance between 3D Gaussians (gaussian_w2). Host declarations of the CPU and CUDA
// kernels registered in csrc/bindings.cpp; the shared math lives in gaussian_w2.h and auction.h / ssp.h.
#pragma once
#include <torch/types.h>

#include <tuple>

#include "common/checks.h"

namespace flashavatar {

// ---------------------------------------------------------------------------------------------------------
// gaussian_w2: K independent pairs, flattened by the Python wrapper (which broadcasts the leading dims).
//   mu0, mu1 [K, 3]; cov0, cov1 [K, 3, 3] (symmetrised inside); scales [K, 3] std-devs; quats [K, 4] (w,x,y,z).
//   Output [K], same dtype (float32 or float64; all arithmetic in float64).
// ---------------------------------------------------------------------------------------------------------
inline void check_w2_cov_args(const char* op, const at::Tensor& mu0, const at::Tensor& cov0, const at::Tensor& mu1,
                              const at::Tensor& cov1) {
  FA_CHECK(op, mu0.dim() == 2 && mu0.size(1) == 3, "mu0 must have shape [K, 3], got ", sizes_str(mu0));
  FA_CHECK(op, mu1.sizes() == mu0.sizes(), "mu1 must have the shape of mu0 ", sizes_str(mu0), ", got ", sizes_str(mu1));
  const int64_t k = mu0.size(0);
  FA_CHECK(op, cov0.dim() == 3 && cov0.size(0) == k && cov0.size(1) == 3 && cov0.size(2) == 3,
           "cov0 must have shape [K, 3, 3] with K = ", k, ", got ", sizes_str(cov0));
  FA_CHECK(op, cov1.sizes() == cov0.sizes(), "cov1 must have the shape of cov0 ", sizes_str(cov0), ", got ",
           sizes_str(cov1));
  FA_CHECK_FLOAT(op, mu0);
  FA_CHECK_SAME_DTYPE(op, mu0, cov0);
  FA_CHECK_SAME_DTYPE(op, mu0, mu1);
  FA_CHECK_SAME_DTYPE(op, mu0, cov1);
  FA_CHECK_SAME_DEVICE(op, mu0, cov0);
  FA_CHECK_SAME_DEVICE(op, mu0, mu1);
  FA_CHECK_SAME_DEVICE(op, mu0, cov1);
}

inline void check_w2_sq_args(const char* op, const at::Tensor& mu0, const at::Tensor& scales0,
                             const at::Tensor& quats0, const at::Tensor& mu1, const at::Tensor& scales1,
                             const at::Tensor& quats1) {
  FA_CHECK(op, mu0.dim() == 2 && mu0.size(1) == 3, "mu0 must have shape [K, 3], got ", sizes_str(mu0));
  const int64_t k = mu0.size(0);
  FA_CHECK(op, mu1.sizes() == mu0.sizes(), "mu1 must have the shape of mu0 ", sizes_str(mu0), ", got ", sizes_str(mu1));
  FA_CHECK(op, scales0.dim() == 2 && scales0.size(0) == k && scales0.size(1) == 3,
           "scales0 must have shape [K, 3] with K = ", k, ", got ", sizes_str(scales0));
  FA_CHECK(op, scales1.sizes() == scales0.sizes(), "scales1 must have shape [K, 3] with K = ", k, ", got ",
           sizes_str(scales1));
  FA_CHECK(op, quats0.dim() == 2 && quats0.size(0) == k && quats0.size(1) == 4,
           "quats0 must have shape [K, 4] with K = ", k, ", got ", sizes_str(quats0));
  FA_CHECK(op, quats1.sizes() == quats0.sizes(), "quats1 must have shape [K, 4] with K = ", k, ", got ",
           sizes_str(quats1));
  FA_CHECK_FLOAT(op, mu0);
  for (const at::Tensor* t : {&scales0, &quats0, &mu1, &scales1, &quats1}) {
    FA_CHECK(op, t->scalar_type() == mu0.scalar_type(), "all inputs must share mu0's dtype ", mu0.scalar_type(),
             ", got ", t->scalar_type());
    FA_CHECK(op, t->device() == mu0.device(), "all inputs must be on mu0's device ", mu0.device(), ", got ",
             t->device());
  }
}

// ---------------------------------------------------------------------------------------------------------
// emd: exact optimal transport between point sets, batched.
//   x [B, N, d], y [B, M, d] (float32/float64, same device); a [B, N], b [B, M] float64 weights or undefined.
//   p in {1, 2}: ground cost |x_i - y_j|^p. tol: relative tolerance of the auction certificate. max_iter: bidding
//   rounds per item (auction) or augmentations per item (transport solver).
// Solvers: N = M with a, b undefined -> epsilon-scaling Jacobi auction (auction.h; CUDA kernel or CPU loop,
// same rounds). Otherwise -> successive shortest paths on the transportation network (ssp.h, CPU; CUDA inputs
// are solved on a CPU copy), exact up to float64 rounding.
// Outputs (all on the input's device):
//   cost [B] float64                      sum_ij P_ij c_ij, summed in float64
//   plan_index [B, K, 2] int64, plan_weight [B, K] float64, K = N + M - 1: the plan's non-zeros (a forest, so
//                                          at most N + M - 1); unused slots have weight 0 and index (0, 0)
//   f [B, N], g [B, M] float64            dual potentials, f_i + g_j <= c_ij, equality on the plan's support
//   status [B] int32                      1 converged (certified within tol), 2 stopped at max_iter,
//                                          3 eps reached float64 resolution before the certificate
//   gap [B] float64                       primal - dual (>= 0), in cost units: cost - OPT <= gap
//   iterations [B] int64                  bidding rounds (auction) or augmentations (transport solver)
// ---------------------------------------------------------------------------------------------------------
using EmdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor>;

inline void check_emd_args(const char* op, const at::Tensor& x, const at::Tensor& y,
                           const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b, int64_t p,
                           double tol, int64_t max_iter) {
  FA_CHECK(op, x.dim() == 3, "x must have shape [B, N, d], got ", sizes_str(x));
  FA_CHECK(op, y.dim() == 3, "y must have shape [B, M, d], got ", sizes_str(y));
  FA_CHECK(op, y.size(0) == x.size(0) && y.size(2) == x.size(2), "y must have shape [B, M, d] = [", x.size(0),
           ", M, ", x.size(2), "] to match x ", sizes_str(x), ", got ", sizes_str(y));
  FA_CHECK(op, x.size(1) > 0 && y.size(1) > 0, "x and y must hold at least one point, got x ", sizes_str(x),
           " and y ", sizes_str(y));
  FA_CHECK(op, x.size(2) > 0, "points must have at least one coordinate, got x ", sizes_str(x));
  FA_CHECK(op, x.size(1) < (int64_t(1) << 30) && y.size(1) < (int64_t(1) << 30), "too many points: x ",
           sizes_str(x), ", y ", sizes_str(y));
  FA_CHECK_FLOAT(op, x);
  FA_CHECK_SAME_DTYPE(op, x, y);
  FA_CHECK_SAME_DEVICE(op, x, y);
  FA_CHECK(op, p == 1 || p == 2, "p must be 1 or 2, got ", p);
  FA_CHECK(op, tol >= 0.0, "tol must be >= 0, got ", tol);
  FA_CHECK(op, max_iter > 0, "max_iter must be > 0, got ", max_iter);
  FA_CHECK(op, a.has_value() == b.has_value(), "a and b must be given together");
  if (a.has_value()) {
    FA_CHECK(op, a->dim() == 2 && a->size(0) == x.size(0) && a->size(1) == x.size(1),
             "a must have shape [B, N] = [", x.size(0), ", ", x.size(1), "], got ", sizes_str(*a));
    FA_CHECK(op, b->dim() == 2 && b->size(0) == y.size(0) && b->size(1) == y.size(1),
             "b must have shape [B, M] = [", y.size(0), ", ", y.size(1), "], got ", sizes_str(*b));
    FA_CHECK(op, a->scalar_type() == at::kDouble && b->scalar_type() == at::kDouble,
             "a and b must be float64, got ", a->scalar_type(), " and ", b->scalar_type());
    FA_CHECK(op, a->device() == x.device() && b->device() == x.device(), "a and b must be on x's device ",
             x.device());
  }
}

// [B, n] int64 kd-tree order of the objects y [B, n, d]: runs of `leaf` consecutive objects are compact leaves
// (object_order.cpp; tensor ops on y's device). The assignment solver works on the objects in this order on every
// path (its pruned scans need it; the others follow, so ties between equal values break the same way on all).
at::Tensor kd_leaf_order(const at::Tensor& y, int64_t leaf);
// Map a solve on the reordered objects back: plan_index [B, K, 2] (assignment in the first n rows) in place, and
// g [B, n] (replaced).
void restore_object_order(const at::Tensor& order, at::Tensor& plan_index, at::Tensor& g);

EmdOutputs emd_forward_cpu(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& a,
                           const c10::optional<at::Tensor>& b, int64_t p, double tol, int64_t max_iter);
#ifdef WITH_CUDA
EmdOutputs emd_forward_cuda(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& a,
                            const c10::optional<at::Tensor>& b, int64_t p, double tol, int64_t max_iter);
#endif

at::Tensor gaussian_w2_cpu(const at::Tensor& mu0, const at::Tensor& cov0, const at::Tensor& mu1,
                           const at::Tensor& cov1);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_backward_cpu(
    const at::Tensor& grad, const at::Tensor& mu0, const at::Tensor& cov0, const at::Tensor& mu1,
    const at::Tensor& cov1);
at::Tensor gaussian_w2_sq_cpu(const at::Tensor& mu0, const at::Tensor& scales0, const at::Tensor& quats0,
                              const at::Tensor& mu1, const at::Tensor& scales1, const at::Tensor& quats1);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_sq_backward_cpu(
    const at::Tensor& grad, const at::Tensor& mu0, const at::Tensor& scales0, const at::Tensor& quats0,
    const at::Tensor& mu1, const at::Tensor& scales1, const at::Tensor& quats1);

#ifdef WITH_CUDA
at::Tensor gaussian_w2_cuda(const at::Tensor& mu0, const at::Tensor& cov0, const at::Tensor& mu1,
                            const at::Tensor& cov1);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mu0, const at::Tensor& cov0, const at::Tensor& mu1,
    const at::Tensor& cov1);
at::Tensor gaussian_w2_sq_cuda(const at::Tensor& mu0, const at::Tensor& scales0, const at::Tensor& quats0,
                               const at::Tensor& mu1, const at::Tensor& scales1, const at::Tensor& quats1);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_w2_sq_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mu0, const at::Tensor& scales0, const at::Tensor& quats0,
    const at::Tensor& mu1, const at::Tensor& scales1, const at::Tensor& quats1);
#endif

}  // namespace flashavatar
