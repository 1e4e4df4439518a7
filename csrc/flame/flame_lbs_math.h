// Per-element math of flame_lbs (FLAME on a vertex subset, the Animator's per-frame FLAME), shared by the CUDA
// kernels (flame_lbs.cu) and the CPU loops (flame_lbs_cpu.cpp); float32 and float64. Same formulas as
// Animator._vertices_core (flashavatar/animate.py) and model.camera.rot6d_to_matrix.
//
// FLAME's kinematic chain here is the "flat" one of the tracker: joints 0 (global) and 1 (neck) are the
// identity, joints 2..4 (jaw, eyes) hang off them, so every joint's world transform is (R_j, J_j - R_j J_j)
// with J the rest-pose joints: no loop over the chain.
#pragma once
#include <cstdint>

#include "common/host_device.h"
#include "common/math.h"

namespace flashavatar {
namespace flame_lbs {

constexpr int kJoints = 5;          // global, neck, jaw, left eye, right eye
constexpr int kPosed = 3;           // jaw and the eyes carry a rotation code (6D each)
constexpr int kPoseFeatures = 36;   // (R_j - I) of joints 1..4, row-major (the neck's 9 are zero)

template <typename T>
FA_HD T sqrt_t(T x) {
  using std::sqrt;
  return sqrt(x);
}

// 6D rotation (first two rows, Gram-Schmidt; F.normalize's eps) -> row-major R [9].
template <typename T>
FA_HD void rot6d_to_matrix(const T* d6 /* [6] */, T* R /* [9] */) {
  const T eps = T(1e-12);
  Vec3<T> a1{d6[0], d6[1], d6[2]}, a2{d6[3], d6[4], d6[5]};
  T n1 = sqrt_t(dot(a1, a1));
  const Vec3<T> b1 = (T(1) / (n1 > eps ? n1 : eps)) * a1;
  const Vec3<T> u = a2 - dot(b1, a2) * b1;
  T n2 = sqrt_t(dot(u, u));
  const Vec3<T> b2 = (T(1) / (n2 > eps ? n2 : eps)) * u;
  const Vec3<T> b3 = cross(b1, b2);
  const Vec3<T> rows[3] = {b1, b2, b3};
  for (int r = 0; r < 3; ++r) {
    R[3 * r] = rows[r].x;
    R[3 * r + 1] = rows[r].y;
    R[3 * r + 2] = rows[r].z;
  }
}

// Element k of frame b's blendshape coefficients [shape (S), expr (E), pose features (36)]; for a pose feature
// also the rotation entry it came from (rot_entry, else untouched). pose6d: the frame's jaw (6) then eyes (12).
template <typename T>
FA_HD T feature(int64_t k, int64_t S, int64_t E, const T* shape_b, const T* expr_b, const T* jaw_b,
                const T* eyes_b, T* rot_entry, bool* is_rot) {
  *is_rot = false;
  if (k < S) return shape_b[k];
  k -= S;
  if (k < E) return expr_b[k];
  k -= E;
  if (k < 9) return T(0);  // the neck: identity
  const int64_t p = k - 9, joint = p / 9, e = p % 9;
  T R[9];
  rot6d_to_matrix(joint == 0 ? jaw_b : eyes_b + 6 * (joint - 1), R);
  *rot_entry = R[e];
  *is_rot = true;
  return R[e] - ((e % 4 == 0) ? T(1) : T(0));  // (R - I), row-major: the diagonal is e = 0, 4, 8
}

// Posed vertex u of one frame: linear blend of the joint transforms applied to the blend-shaped vertex, then
// the eyelid blendshapes.
//   lin_b [U*4 + 15]: homogeneous blend-shaped vertices (U x 4) then the rest-pose joints (5 x 3)
//   rot_b [3, 9]: world rotations of jaw, left eye, right eye; weights_u [5]; eyelid_dirs [2, U*3]
template <typename T>
FA_HD void skin_vertex(int64_t u, int64_t U, const T* lin_b, const T* rot_b, const T* weights_u,
                       const T* eyelid_dirs, const T* eyelids_b, bool use_eyelids, T* out /* [3] */) {
  const T* J = lin_b + 4 * U;  // [5, 3]
  const T* v = lin_b + 4 * u;  // [4]
  // blended [R | t]: joints 0 and 1 are the identity (t = 0)
  T M[12];
  const T w_id = weights_u[0] + weights_u[1];
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 4; ++c) M[4 * r + c] = (c == r) ? w_id : T(0);
  for (int j = 0; j < kPosed; ++j) {
    const T* R = rot_b + 9 * j;
    const T* Jj = J + 3 * (j + 2);
    const T w = weights_u[j + 2];
    for (int r = 0; r < 3; ++r) {
      const T t = Jj[r] - (R[3 * r] * Jj[0] + R[3 * r + 1] * Jj[1] + R[3 * r + 2] * Jj[2]);
      M[4 * r] += w * R[3 * r];
      M[4 * r + 1] += w * R[3 * r + 1];
      M[4 * r + 2] += w * R[3 * r + 2];
      M[4 * r + 3] += w * t;
    }
  }
  for (int r = 0; r < 3; ++r) {
    T x = M[4 * r] * v[0] + M[4 * r + 1] * v[1] + M[4 * r + 2] * v[2] + M[4 * r + 3] * v[3];
    if (use_eyelids) x += eyelids_b[0] * eyelid_dirs[3 * u + r] + eyelids_b[1] * eyelid_dirs[3 * U + 3 * u + r];
    out[r] = x;
  }
}

}  // namespace flame_lbs
}  // namespace flashavatar
