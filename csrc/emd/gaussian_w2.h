// Squared 2-Wasserstein distance between 3D Gaussians, closed form, forward beside backward.
//
//   W2^2 = |mu0 - mu1|^2 + tr S0 + tr S1 - 2 tr (S0^1/2 S1 S0^1/2)^1/2
//
// The Bures term needs e1 = sum_k sqrt(lambda_k) over the eigenvalues lambda of S0 S1 (they equal those of the
// symmetric PSD matrix S0^1/2 S1 S0^1/2). No eigen decomposition is done: with s_k = sqrt(lambda_k) and the
// elementary symmetric polynomials e1 = sum s, e2 = sum s_k s_l, e3 = s1 s2 s3 of the s, and the invariants
//   c2 = tr(S0 S1) = <S0, S1>_F,   c1 = E2(S0 S1) = <adj S0, adj S1>_F,   c0 = det S0 det S1,
// one has c2 = e1^2 - 2 e2, c1 = e2^2 - 2 e1 e3, e3 = sqrt(c0). Eliminating e2 gives the quartic
//   F(e1) = (e1^2 - c2)^2 - 4 c1 - 8 e3 e1 = 0,
// convex and increasing on [sqrt(c2), inf) where its one root >= sqrt(c2) is e1; Newton from the upper bound
// sqrt(3 c2) (Cauchy-Schwarz) descends onto it monotonically. The gradient follows by implicit differentiation
// of F (no eigenvectors, so it is finite at repeated eigenvalues, e.g. isotropic Gaussians):
//   de1 = -(F_c2 dc2 + F_c1 dc1 + F_e3 de3) / F_e1,   F_e1 = 8 (e1 e2 - e3) = 8 (s1+s2)(s1+s3)(s2+s3) > 0
// unless the product has rank <= 1.
//
// Scale: the invariants are formed from S/t with t = (tr S0 + tr S1)/2, so mm-sized Gaussians in metres
// (S ~ 1e-6, det ~ 1e-18) neither underflow nor hit absolute floors; e1 is homogeneous of degree one in
// (S0, S1), so its gradient is the same at S/t and at S. All arithmetic is in double whatever the input dtype:
// the W2 of two nearly equal Gaussians is a difference of nearly equal traces.
//
// Inputs are symmetrised, S <- (S + S^T)/2, so the gradient of a full 3x3 input is symmetric.
#pragma once
#include "common/host_device.h"
#include "common/math.h"

namespace flashavatar {
namespace w2 {

using M3 = Mat3<double>;

FA_HD M3 symmetrise(const M3& a) {
  M3 r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) r.m[i][j] = 0.5 * (a.m[i][j] + a.m[j][i]);
  return r;
}

FA_HD double frob(const M3& a, const M3& b) {
  double s = 0.0;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) s += a.m[i][j] * b.m[i][j];
  return s;
}

// Adjugate (transposed cofactor matrix); for a symmetric PSD matrix it is symmetric PSD.
FA_HD M3 adjugate(const M3& a) {
  M3 r;
  r.m[0][0] = a.m[1][1] * a.m[2][2] - a.m[1][2] * a.m[2][1];
  r.m[0][1] = a.m[0][2] * a.m[2][1] - a.m[0][1] * a.m[2][2];
  r.m[0][2] = a.m[0][1] * a.m[1][2] - a.m[0][2] * a.m[1][1];
  r.m[1][0] = a.m[1][2] * a.m[2][0] - a.m[1][0] * a.m[2][2];
  r.m[1][1] = a.m[0][0] * a.m[2][2] - a.m[0][2] * a.m[2][0];
  r.m[1][2] = a.m[0][2] * a.m[1][0] - a.m[0][0] * a.m[1][2];
  r.m[2][0] = a.m[1][0] * a.m[2][1] - a.m[1][1] * a.m[2][0];
  r.m[2][1] = a.m[0][1] * a.m[2][0] - a.m[0][0] * a.m[2][1];
  r.m[2][2] = a.m[0][0] * a.m[1][1] - a.m[0][1] * a.m[1][0];
  return r;
}

// Gradient of <adj A, G>_F with respect to A, for symmetric A and G. From Cayley-Hamilton,
// adj A = A^2 - tr(A) A + E2(A) I with E2(A) = ((tr A)^2 - tr(A^2)) / 2.
FA_HD M3 adjugate_frob_grad(const M3& a, const M3& g) {
  const double tra = trace(a), trg = trace(g), trga = frob(g, a);
  M3 ag = matmul(a, g), ga = matmul(g, a), r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const double id = (i == j) ? 1.0 : 0.0;
      r.m[i][j] = ag.m[i][j] + ga.m[i][j] - trga * id - tra * g.m[i][j] + trg * (tra * id - a.m[i][j]);
    }
  return r;
}

FA_HD double sqrt_pos(double v) { return v > 0.0 ? sqrt(v) : 0.0; }

// Everything the forward computes that the backward reuses.
struct BuresState {
  M3 a, b;                   // S0 / t, S1 / t (symmetrised)
  M3 adj_a, adj_b;           // adjugates
  double t;                  // (tr S0 + tr S1) / 2
  double c2, c1, e3, e1;     // invariants of (A B) and the root e1 = tr sqrt(A B)
  double sdet_a, sdet_b;     // sqrt(det A), sqrt(det B)
};

// Root of F(e) = (e^2 - c2)^2 - 4 c1 - 8 e3 e on [sqrt(c2), sqrt(3 c2)], by monotone Newton from above.
FA_HD double bures_root(double c2, double c1, double e3) {
  if (!(c2 > 0.0)) return 0.0;
  double e = sqrt(3.0 * c2);
  for (int it = 0; it < 100; ++it) {
    const double q = e * e - c2;
    const double f = q * q - 4.0 * c1 - 8.0 * e3 * e;
    const double fp = 4.0 * e * q - 8.0 * e3;
    if (!(f > 0.0) || !(fp > 0.0)) break;
    const double step = f / fp;
    const double next = e - step;
    if (!(next < e)) break;  // no more progress: converged to rounding
    e = next;
    if (step <= 1e-17 * e) break;
  }
  const double lo = sqrt(c2);
  return e < lo ? lo : e;
}

// Fills the state for covariances s0, s1 (any 3x3, symmetrised here). Returns tr sqrt(S0^1/2 S1 S0^1/2).
FA_HD double bures_forward(const M3& s0_in, const M3& s1_in, BuresState& st) {
  const M3 s0 = symmetrise(s0_in), s1 = symmetrise(s1_in);
  st.t = 0.5 * (trace(s0) + trace(s1));
  if (!(st.t > 0.0)) {  // both zero (or invalid): zero Bures term
    st.t = 0.0;
    st.a = st.b = st.adj_a = st.adj_b = mat3_zero<double>();
    st.c2 = st.c1 = st.e3 = st.e1 = st.sdet_a = st.sdet_b = 0.0;
    return 0.0;
  }
  const double inv_t = 1.0 / st.t;
  st.a = inv_t * s0;
  st.b = inv_t * s1;
  st.adj_a = adjugate(st.a);
  st.adj_b = adjugate(st.b);
  st.c2 = frob(st.a, st.b);
  st.c1 = frob(st.adj_a, st.adj_b);
  if (st.c2 < 0.0) st.c2 = 0.0;  // only by rounding on non-PSD input
  if (st.c1 < 0.0) st.c1 = 0.0;
  st.sdet_a = sqrt_pos(det(st.a));
  st.sdet_b = sqrt_pos(det(st.b));
  st.e3 = st.sdet_a * st.sdet_b;
  st.e1 = bures_root(st.c2, st.c1, st.e3);
  return st.t * st.e1;
}

// Gradients of e1 = tr sqrt(...) with respect to S0 and S1 (equal to those w.r.t. A, B: degree-0 homogeneous).
FA_HD void bures_backward(const BuresState& st, M3& g0, M3& g1) {
  g0 = g1 = mat3_zero<double>();
  if (!(st.t > 0.0)) return;
  const double e1 = st.e1, q = e1 * e1 - st.c2;
  double fe = 4.0 * e1 * q - 8.0 * st.e3;  // dF/de1 = 8 (s1+s2)(s1+s3)(s2+s3)
  // Rank <= 1 product (two degenerate Gaussians): e1 is not differentiable there; the floors keep the
  // gradient finite (<~1e31, representable in float32) instead of inf/NaN.
  const double floor = 1e-30;
  if (!(fe > floor)) fe = floor;
  const double k_c2 = 2.0 * q / fe;      // de1/dc2 = -F_c2 / F_e1
  const double k_c1 = 4.0 / fe;          // de1/dc1
  const double k_e3 = 8.0 * e1 / fe;     // de1/de3
  // dc2/dA = B; dc1/dA = grad <adj A, adj B>; de3/dA = sqrt(det B) / (2 sqrt(det A)) adj A.
  // Large for nearly flat Gaussians (the true derivative of sqrt(lambda_min) is), finite thanks to the floor.
  const double w_a = k_e3 * 0.5 * st.sdet_b / (st.sdet_a > floor ? st.sdet_a : floor);
  const double w_b = k_e3 * 0.5 * st.sdet_a / (st.sdet_b > floor ? st.sdet_b : floor);
  const M3 dc1_a = adjugate_frob_grad(st.a, st.adj_b);
  const M3 dc1_b = adjugate_frob_grad(st.b, st.adj_a);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      g0.m[i][j] = k_c2 * st.b.m[i][j] + k_c1 * dc1_a.m[i][j] + w_a * st.adj_a.m[i][j];
      g1.m[i][j] = k_c2 * st.a.m[i][j] + k_c1 * dc1_b.m[i][j] + w_b * st.adj_b.m[i][j];
    }
}

// ---- W2^2 from means and covariances ----
template <typename scalar_t>
FA_HD M3 load_mat3(const scalar_t* p /* [9] row-major */) {
  M3 r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) r.m[i][j] = static_cast<double>(p[3 * i + j]);
  return r;
}

template <typename scalar_t>
FA_HD double mean_sq_dist(const scalar_t* mu0, const scalar_t* mu1) {
  double s = 0.0;
  for (int k = 0; k < 3; ++k) {
    const double d = static_cast<double>(mu0[k]) - static_cast<double>(mu1[k]);
    s += d * d;
  }
  return s;
}

// mu [3], cov [9] (row-major 3x3). Returns W2^2 (clamped at 0: rounding can make it -1e-17 * tr).
template <typename scalar_t>
FA_HD double w2_cov_forward(const scalar_t* mu0, const scalar_t* cov0, const scalar_t* mu1, const scalar_t* cov1) {
  BuresState st;
  const M3 s0 = load_mat3(cov0), s1 = load_mat3(cov1);
  const double e1 = bures_forward(s0, s1, st);
  const double bures = trace(s0) + trace(s1) - 2.0 * e1;
  return mean_sq_dist(mu0, mu1) + (bures > 0.0 ? bures : 0.0);
}

// VJP: grad (scalar cotangent) -> d_mu0 [3], d_cov0 [9], d_mu1 [3], d_cov1 [9].
template <typename scalar_t>
FA_HD void w2_cov_backward(double grad, const scalar_t* mu0, const scalar_t* cov0, const scalar_t* mu1,
                           const scalar_t* cov1, scalar_t* d_mu0, scalar_t* d_cov0, scalar_t* d_mu1,
                           scalar_t* d_cov1) {
  BuresState st;
  const M3 s0 = load_mat3(cov0), s1 = load_mat3(cov1);
  bures_forward(s0, s1, st);
  M3 g0, g1;
  bures_backward(st, g0, g1);
  for (int k = 0; k < 3; ++k) {
    const double d = static_cast<double>(mu0[k]) - static_cast<double>(mu1[k]);
    d_mu0[k] = static_cast<scalar_t>(2.0 * grad * d);
    d_mu1[k] = static_cast<scalar_t>(-2.0 * grad * d);
  }
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const double id = (i == j) ? 1.0 : 0.0;
      d_cov0[3 * i + j] = static_cast<scalar_t>(grad * (id - 2.0 * g0.m[i][j]));
      d_cov1[3 * i + j] = static_cast<scalar_t>(grad * (id - 2.0 * g1.m[i][j]));
    }
}

// ---- W2^2 from means, scales (std-devs) and quaternions (w, x, y, z; need not be normalised) ----
// S = R diag(s^2) R^T.
template <typename scalar_t>
FA_HD M3 cov_from_scale_quat(const scalar_t* s, const scalar_t* q, M3& rot) {
  rot = quat_to_rotmat<double>(q[0], q[1], q[2], q[3]);
  const double v[3] = {double(s[0]) * double(s[0]), double(s[1]) * double(s[1]), double(s[2]) * double(s[2])};
  M3 r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      r.m[i][j] = rot.m[i][0] * v[0] * rot.m[j][0] + rot.m[i][1] * v[1] * rot.m[j][1] + rot.m[i][2] * v[2] * rot.m[j][2];
  return r;
}

// VJP of cov_from_scale_quat: g = dL/dS (symmetric) -> dL/ds [3], dL/dq [4].
template <typename scalar_t>
FA_HD void cov_from_scale_quat_vjp(const scalar_t* s, const scalar_t* q, const M3& rot, const M3& g, scalar_t* ds,
                                   scalar_t* dq) {
  const double v[3] = {double(s[0]) * double(s[0]), double(s[1]) * double(s[1]), double(s[2]) * double(s[2])};
  // dL/dR = (g + g^T) R diag(v) = 2 g R diag(v);  dL/dv_k = (R^T g R)_kk.
  const M3 gr = matmul(g, rot);
  M3 dr;
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) dr.m[i][k] = 2.0 * gr.m[i][k] * v[k];
  for (int k = 0; k < 3; ++k) {
    const double dv = rot.m[0][k] * gr.m[0][k] + rot.m[1][k] * gr.m[1][k] + rot.m[2][k] * gr.m[2][k];
    ds[k] = static_cast<scalar_t>(2.0 * double(s[k]) * dv);
  }
  double dq_d[4];
  quat_to_rotmat_vjp<double>(q[0], q[1], q[2], q[3], dr, dq_d);
  for (int k = 0; k < 4; ++k) dq[k] = static_cast<scalar_t>(dq_d[k]);
}

template <typename scalar_t>
FA_HD double w2_sq_forward(const scalar_t* mu0, const scalar_t* s0, const scalar_t* q0, const scalar_t* mu1,
                           const scalar_t* s1, const scalar_t* q1) {
  M3 r0, r1;
  const M3 c0 = cov_from_scale_quat(s0, q0, r0), c1 = cov_from_scale_quat(s1, q1, r1);
  BuresState st;
  const double e1 = bures_forward(c0, c1, st);
  const double bures = trace(c0) + trace(c1) - 2.0 * e1;
  return mean_sq_dist(mu0, mu1) + (bures > 0.0 ? bures : 0.0);
}

template <typename scalar_t>
FA_HD void w2_sq_backward(double grad, const scalar_t* mu0, const scalar_t* s0, const scalar_t* q0,
                          const scalar_t* mu1, const scalar_t* s1, const scalar_t* q1, scalar_t* d_mu0,
                          scalar_t* d_s0, scalar_t* d_q0, scalar_t* d_mu1, scalar_t* d_s1, scalar_t* d_q1) {
  M3 r0, r1;
  const M3 c0 = cov_from_scale_quat(s0, q0, r0), c1 = cov_from_scale_quat(s1, q1, r1);
  BuresState st;
  bures_forward(c0, c1, st);
  M3 g0, g1;
  bures_backward(st, g0, g1);
  for (int k = 0; k < 3; ++k) {
    const double d = static_cast<double>(mu0[k]) - static_cast<double>(mu1[k]);
    d_mu0[k] = static_cast<scalar_t>(2.0 * grad * d);
    d_mu1[k] = static_cast<scalar_t>(-2.0 * grad * d);
  }
  // dL/dS = grad * (I - 2 g)
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const double id = (i == j) ? 1.0 : 0.0;
      g0.m[i][j] = grad * (id - 2.0 * g0.m[i][j]);
      g1.m[i][j] = grad * (id - 2.0 * g1.m[i][j]);
    }
  cov_from_scale_quat_vjp(s0, q0, r0, g0, d_s0, d_q0);
  cov_from_scale_quat_vjp(s1, q1, r1, g1, d_s1, d_q1);
}

}  // namespace w2
}  // namespace flashavatar
