// Per-Gaussian math of gaussian_assembly, forward beside its vector-Jacobian product, shared by the CUDA kernel
// (assembly.cu) and the CPU loop (assembly_cpu.cpp). Templated on the scalar: float32 for speed, float64 for
// gradcheck. The formulas are those of GaussianAvatar.forward (flashavatar/model/avatar.py) and
// model.camera.{quat_multiply, matrix_to_quat}:
//
//   p        = w0 v0 + w1 v1 + w2 v2                       surface point of the Gaussian's triangle slot
//   mean     = p + offset_scale * raw[0:3]
//   q_delta  = normalise(exp(raw[3]), raw[4], raw[5], raw[6])
//   q_local  = normalise(rotation) ⊗ q_delta                 (the residual rotation, relative to the triangle)
//   parity:  quat = q_local,            scale = exp(log_scale * exp(raw[7:10]))
//   else:    quat = q_frame ⊗ q_local,  scale = exp(log_scale + raw[7:10])
//
// q_frame is the rotation whose columns are (ê1, n̂ × ê1, n̂) with e1 = v1 - v0, n = e1 × (v2 - v0), taken to a
// quaternion by the best-conditioned of the four classic formulas (largest 4·component²), w >= 0.
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "common/math.h"

namespace flashavatar {
namespace assembly {

constexpr int kRawDim = 10;  // MLP outputs per Gaussian: offset (3), rotation delta (4), log-scale delta (3)

// sqrt / exp in the scalar's own precision on the host too (unqualified calls would promote float to double).
template <typename T>
FA_HD T sqrt_t(T x) {
  using std::sqrt;
  return sqrt(x);
}
template <typename T>
FA_HD T exp_t(T x) {
  using std::exp;
  return exp(x);
}

template <typename T>
struct Quat {
  T w, x, y, z;
};

template <typename T>
FA_HD Quat<T> load_quat(const T* q) {
  return {q[0], q[1], q[2], q[3]};
}
template <typename T>
FA_HD void store_quat(Quat<T> q, T* out) {
  out[0] = q.w;
  out[1] = q.x;
  out[2] = q.y;
  out[3] = q.z;
}
template <typename T>
FA_HD Vec3<T> load_vec3(const T* v) {
  return {v[0], v[1], v[2]};
}
template <typename T>
FA_HD Quat<T> conj(Quat<T> q) {
  return {q.w, -q.x, -q.y, -q.z};
}
template <typename T>
FA_HD T qdot(Quat<T> a, Quat<T> b) {
  return a.w * b.w + a.x * b.x + a.y * b.y + a.z * b.z;
}
template <typename T>
FA_HD Quat<T> qscale(T s, Quat<T> q) {
  return {s * q.w, s * q.x, s * q.y, s * q.z};
}
template <typename T>
FA_HD Quat<T> qadd(Quat<T> a, Quat<T> b) {
  return {a.w + b.w, a.x + b.x, a.y + b.y, a.z + b.z};
}

// Hamilton product a ⊗ b (applies b first), = L(a) b of model.camera.quat_multiply.
template <typename T>
FA_HD Quat<T> qmul(Quat<T> a, Quat<T> b) {
  return {a.w * b.w - a.x * b.x - a.y * b.y - a.z * b.z, a.w * b.x + a.x * b.w + a.y * b.z - a.z * b.y,
          a.w * b.y - a.x * b.z + a.y * b.w + a.z * b.x, a.w * b.z + a.x * b.y - a.y * b.x + a.z * b.w};
}
// VJP of r = a ⊗ b: L(a)ᵀ = L(conj a) and R(b)ᵀ = R(conj b), so dL/da = g ⊗ conj(b), dL/db = conj(a) ⊗ g.
template <typename T>
FA_HD void qmul_vjp(Quat<T> a, Quat<T> b, Quat<T> g, Quat<T>& ga, Quat<T>& gb) {
  ga = qmul(g, conj(b));
  gb = qmul(conj(a), g);
}

// y = x / max(|x|, eps) and its VJP (past the clamp the norm is a constant: the gradient is g / eps).
template <typename T>
FA_HD T clamped_norm(T n2, T eps) {
  const T n = sqrt_t(n2);
  return n > eps ? n : eps;
}
template <typename T>
FA_HD Vec3<T> normalise_vjp(Vec3<T> y, T norm, bool clamped, Vec3<T> g) {
  if (clamped) return (T(1) / norm) * g;
  return (T(1) / norm) * (g - dot(y, g) * y);
}
template <typename T>
FA_HD Quat<T> normalise_vjp(Quat<T> y, T norm, bool clamped, Quat<T> g) {
  if (clamped) return qscale(T(1) / norm, g);
  return qscale(T(1) / norm, qadd(g, qscale(-qdot(y, g), y)));
}

// --------------------------------------------------------------------------------- rotation matrix -> quaternion
// 4·(w², x², y², z²) of the rotation m (row-major m[r][c]).
template <typename T>
FA_HD void four_squares(const Mat3<T>& m, T f[4]) {
  f[0] = T(1) + m.m[0][0] + m.m[1][1] + m.m[2][2];
  f[1] = T(1) + m.m[0][0] - m.m[1][1] - m.m[2][2];
  f[2] = T(1) - m.m[0][0] + m.m[1][1] - m.m[2][2];
  f[3] = T(1) - m.m[0][0] - m.m[1][1] + m.m[2][2];
}
// Index of the largest of f (the first one on ties, as torch.argmax).
template <typename T>
FA_HD int best_of_four(const T f[4]) {
  int k = 0;
  for (int i = 1; i < 4; ++i)
    if (f[i] > f[k]) k = i;
  return k;
}
// Candidate k of matrix_to_quat, up to its positive factor 1 / (4|component k|): linear in m.
template <typename T>
FA_HD Quat<T> quat_candidate(const Mat3<T>& m, int k, const T f[4]) {
  const T a = m.m[2][1] - m.m[1][2], b = m.m[0][2] - m.m[2][0], c = m.m[1][0] - m.m[0][1];  // 4w·(x, y, z)
  const T d = m.m[0][1] + m.m[1][0], e = m.m[0][2] + m.m[2][0], h = m.m[1][2] + m.m[2][1];  // 4xy, 4xz, 4yz
  switch (k) {
    case 0: return {f[0], a, b, c};
    case 1: return {a, f[1], d, e};
    case 2: return {b, d, f[2], h};
    default: return {c, e, h, f[3]};
  }
}
// VJP of quat_candidate (f as a function of m included): adds dL/dm to gm.
template <typename T>
FA_HD void quat_candidate_vjp(int k, Quat<T> g, Mat3<T>& gm) {
  T ga = 0, gb = 0, gc = 0, gd = 0, ge = 0, gh = 0, gf = 0;
  const T df[4][3] = {{1, 1, 1}, {1, -1, -1}, {-1, 1, -1}, {-1, -1, 1}};  // d f_k / d (m00, m11, m22)
  switch (k) {
    case 0: gf = g.w; ga = g.x; gb = g.y; gc = g.z; break;
    case 1: ga = g.w; gf = g.x; gd = g.y; ge = g.z; break;
    case 2: gb = g.w; gd = g.x; gf = g.y; gh = g.z; break;
    default: gc = g.w; ge = g.x; gh = g.y; gf = g.z; break;
  }
  gm.m[0][0] += gf * df[k][0];
  gm.m[1][1] += gf * df[k][1];
  gm.m[2][2] += gf * df[k][2];
  gm.m[2][1] += ga + gh;
  gm.m[1][2] += -ga + gh;
  gm.m[0][2] += gb + ge;
  gm.m[2][0] += -gb + ge;
  gm.m[1][0] += gc + gd;
  gm.m[0][1] += -gc + gd;
}

// ------------------------------------------------------------------------------------------ triangle frame
// Everything the frame's backward needs, recomputed from the three corners.
template <typename T>
struct Frame {
  Vec3<T> e1, e2, n;        // edges v1 - v0, v2 - v0 and their cross product (unnormalised)
  Vec3<T> e1h, nh, t;       // unit edge, unit normal, nh × e1h
  T e1_norm, n_norm;        // clamped norms
  bool e1_clamped, n_clamped;
  Mat3<T> m;                // columns (e1h, t, nh)
  int best;                 // chosen candidate
  Quat<T> cand;             // the candidate (unnormalised), cand_norm its norm
  T cand_norm, sign;        // q = sign * cand / cand_norm with w >= 0
  Quat<T> q;
};

template <typename T>
FA_HD Frame<T> triangle_frame(Vec3<T> v0, Vec3<T> v1, Vec3<T> v2) {
  const T eps = T(1e-12);
  Frame<T> fr;
  fr.e1 = v1 - v0;
  fr.e2 = v2 - v0;
  fr.n = cross(fr.e1, fr.e2);
  const T l1 = sqrt_t(dot(fr.e1, fr.e1)), ln = sqrt_t(dot(fr.n, fr.n));
  fr.e1_clamped = !(l1 > eps);
  fr.n_clamped = !(ln > eps);
  fr.e1_norm = fr.e1_clamped ? eps : l1;
  fr.n_norm = fr.n_clamped ? eps : ln;
  fr.e1h = (T(1) / fr.e1_norm) * fr.e1;
  fr.nh = (T(1) / fr.n_norm) * fr.n;
  fr.t = cross(fr.nh, fr.e1h);
  const Vec3<T> cols[3] = {fr.e1h, fr.t, fr.nh};
  for (int c = 0; c < 3; ++c) {
    fr.m.m[0][c] = cols[c].x;
    fr.m.m[1][c] = cols[c].y;
    fr.m.m[2][c] = cols[c].z;
  }
  T f[4];
  four_squares(fr.m, f);
  fr.best = best_of_four(f);
  fr.cand = quat_candidate(fr.m, fr.best, f);
  fr.cand_norm = clamped_norm(qdot(fr.cand, fr.cand), eps);  // >= 1: the chosen f_k is the largest of four summing to 4
  fr.sign = fr.cand.w < T(0) ? T(-1) : T(1);
  fr.q = qscale(fr.sign / fr.cand_norm, fr.cand);
  return fr;
}

// dL/d(v0, v1, v2) of the frame quaternion, added to g0, g1, g2.
template <typename T>
FA_HD void triangle_frame_vjp(const Frame<T>& fr, Quat<T> gq, Vec3<T>& g0, Vec3<T>& g1, Vec3<T>& g2) {
  const Quat<T> unit = qscale(T(1) / fr.cand_norm, fr.cand);
  const Quat<T> g_cand = normalise_vjp(unit, fr.cand_norm, false, qscale(fr.sign, gq));
  Mat3<T> gm = mat3_zero<T>();
  quat_candidate_vjp(fr.best, g_cand, gm);
  const Vec3<T> g_e1h0 = {gm.m[0][0], gm.m[1][0], gm.m[2][0]};
  const Vec3<T> g_t = {gm.m[0][1], gm.m[1][1], gm.m[2][1]};
  const Vec3<T> g_nh0 = {gm.m[0][2], gm.m[1][2], gm.m[2][2]};
  // t = nh × e1h
  const Vec3<T> g_nh = g_nh0 + cross(fr.e1h, g_t);
  const Vec3<T> g_e1h = g_e1h0 + cross(g_t, fr.nh);
  const Vec3<T> g_n = normalise_vjp(fr.nh, fr.n_norm, fr.n_clamped, g_nh);
  Vec3<T> g_e1 = normalise_vjp(fr.e1h, fr.e1_norm, fr.e1_clamped, g_e1h);
  // n = e1 × e2
  g_e1 = g_e1 + cross(fr.e2, g_n);
  const Vec3<T> g_e2 = cross(g_n, fr.e1);
  g1 = g1 + g_e1;
  g2 = g2 + g_e2;
  g0 = g0 - (g_e1 + g_e2);
}

// --------------------------------------------------------------------------------------------- one Gaussian
template <typename T>
struct Inputs {
  Vec3<T> v0, v1, v2;  // the triangle's posed corners
  const T* bary;       // [3]
  const T* rotation;   // [4] base rotation (any norm)
  const T* log_scale;  // [3]
  const T* raw;        // [10] MLP outputs (after tanh)
};

template <typename T>
FA_HD Quat<T> delta_quat_unnormalised(const T* raw) {
  return {exp_t(raw[3]), raw[4], raw[5], raw[6]};
}

template <typename T>
FA_HD void forward(const Inputs<T>& in, T offset_scale, bool parity, T* mean /* [3] */, T* quat /* [4] */,
                   T* scale /* [3] */, T* local /* [4] */) {
  const T eps = T(1e-12);
  const T* w = in.bary;
  mean[0] = w[0] * in.v0.x + w[1] * in.v1.x + w[2] * in.v2.x + offset_scale * in.raw[0];
  mean[1] = w[0] * in.v0.y + w[1] * in.v1.y + w[2] * in.v2.y + offset_scale * in.raw[1];
  mean[2] = w[0] * in.v0.z + w[1] * in.v1.z + w[2] * in.v2.z + offset_scale * in.raw[2];

  const Quat<T> ud = delta_quat_unnormalised(in.raw);
  const Quat<T> qd = qscale(T(1) / sqrt_t(qdot(ud, ud)), ud);  // exp(raw[3]) > 0: never zero
  const Quat<T> rot = load_quat(in.rotation);
  const Quat<T> qb = qscale(T(1) / clamped_norm(qdot(rot, rot), eps), rot);
  const Quat<T> ql = qmul(qb, qd);
  store_quat(ql, local);
  if (parity) {
    store_quat(ql, quat);
    for (int i = 0; i < 3; ++i) scale[i] = exp_t(in.log_scale[i] * exp_t(in.raw[7 + i]));
  } else {
    const Frame<T> fr = triangle_frame(in.v0, in.v1, in.v2);
    store_quat(qmul(fr.q, ql), quat);
    for (int i = 0; i < 3; ++i) scale[i] = exp_t(in.log_scale[i] + in.raw[7 + i]);
  }
}

// Gradients of one Gaussian: corners (written, not accumulated), base rotation, log-scale and raw (written).
// g_local is the cotangent of q_local (the residual rotation output); g_quat that of the final rotation.
template <typename T>
FA_HD void backward(const Inputs<T>& in, T offset_scale, bool parity, const T* g_mean /* [3] */,
                    const T* g_quat /* [4] */, const T* g_scale /* [3] */, const T* g_local /* [4] */,
                    Vec3<T>& g_v0, Vec3<T>& g_v1, Vec3<T>& g_v2, T* g_rotation /* [4] */,
                    T* g_log_scale /* [3] */, T* g_raw /* [10] */) {
  const T eps = T(1e-12);
  const T* w = in.bary;
  const Vec3<T> gm = load_vec3(g_mean);
  g_v0 = w[0] * gm;
  g_v1 = w[1] * gm;
  g_v2 = w[2] * gm;
  for (int i = 0; i < 3; ++i) g_raw[i] = offset_scale * g_mean[i];

  const Quat<T> ud = delta_quat_unnormalised(in.raw);
  const T ud_norm = sqrt_t(qdot(ud, ud));
  const Quat<T> qd = qscale(T(1) / ud_norm, ud);
  const Quat<T> rot = load_quat(in.rotation);
  const T rot_n = sqrt_t(qdot(rot, rot));
  const bool rot_clamped = !(rot_n > eps);
  const T rot_norm = rot_clamped ? eps : rot_n;
  const Quat<T> qb = qscale(T(1) / rot_norm, rot);
  const Quat<T> ql = qmul(qb, qd);

  Quat<T> g_ql = load_quat(g_local);
  const Quat<T> gq = load_quat(g_quat);
  if (parity) {
    g_ql = qadd(g_ql, gq);
    for (int i = 0; i < 3; ++i) {
      const T e = exp_t(in.raw[7 + i]);
      const T s = exp_t(in.log_scale[i] * e);
      g_log_scale[i] = g_scale[i] * s * e;
      g_raw[7 + i] = g_scale[i] * s * in.log_scale[i] * e;
    }
  } else {
    const Frame<T> fr = triangle_frame(in.v0, in.v1, in.v2);
    Quat<T> g_frame, g_ql_from_quat;
    qmul_vjp(fr.q, ql, gq, g_frame, g_ql_from_quat);
    g_ql = qadd(g_ql, g_ql_from_quat);
    triangle_frame_vjp(fr, g_frame, g_v0, g_v1, g_v2);
    for (int i = 0; i < 3; ++i) {
      const T s = exp_t(in.log_scale[i] + in.raw[7 + i]);
      g_log_scale[i] = g_scale[i] * s;
      g_raw[7 + i] = g_scale[i] * s;
    }
  }
  Quat<T> g_qb, g_qd;
  qmul_vjp(qb, qd, g_ql, g_qb, g_qd);
  store_quat(normalise_vjp(qb, rot_norm, rot_clamped, g_qb), g_rotation);
  const Quat<T> g_ud = normalise_vjp(qd, ud_norm, false, g_qd);
  g_raw[3] = g_ud.w * ud.w;  // d exp(r) / dr = exp(r)
  g_raw[4] = g_ud.x;
  g_raw[5] = g_ud.y;
  g_raw[6] = g_ud.z;
}

}  // namespace assembly
}  // namespace flashavatar
