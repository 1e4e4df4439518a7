// Small fixed-size linear algebra shared by every op (rasteriser, EMD, Gaussian W2), on the host and the
// device. Templated on the scalar so float32 runs fast on the GPU and float64 drives gradcheck on the CPU.
// Forward helpers sit beside their vector-Jacobian products (suffix _vjp).
#pragma once
#include <cmath>

#include "host_device.h"

namespace flashavatar {

template <typename T>
struct Vec3 {
  T x, y, z;
};

// Row-major 3x3 matrix: m[r][c].
template <typename T>
struct Mat3 {
  T m[3][3];
};

template <typename T>
FA_HD Vec3<T> make_vec3(T x, T y, T z) {
  return Vec3<T>{x, y, z};
}
template <typename T>
FA_HD Vec3<T> operator+(Vec3<T> a, Vec3<T> b) {
  return {a.x + b.x, a.y + b.y, a.z + b.z};
}
template <typename T>
FA_HD Vec3<T> operator-(Vec3<T> a, Vec3<T> b) {
  return {a.x - b.x, a.y - b.y, a.z - b.z};
}
template <typename T>
FA_HD Vec3<T> operator*(T s, Vec3<T> a) {
  return {s * a.x, s * a.y, s * a.z};
}
template <typename T>
FA_HD T dot(Vec3<T> a, Vec3<T> b) {
  return a.x * b.x + a.y * b.y + a.z * b.z;
}
template <typename T>
FA_HD Vec3<T> cross(Vec3<T> a, Vec3<T> b) {
  return {a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x};
}

template <typename T>
FA_HD Mat3<T> mat3_zero() {
  Mat3<T> r;
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) r.m[i][j] = T(0);
  return r;
}
template <typename T>
FA_HD Mat3<T> mat3_identity() {
  Mat3<T> r = mat3_zero<T>();
  r.m[0][0] = r.m[1][1] = r.m[2][2] = T(1);
  return r;
}
template <typename T>
FA_HD Mat3<T> matmul(const Mat3<T>& a, const Mat3<T>& b) {
  Mat3<T> r;
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[i][0] * b.m[0][j] + a.m[i][1] * b.m[1][j] + a.m[i][2] * b.m[2][j];
  return r;
}
template <typename T>
FA_HD Mat3<T> transpose(const Mat3<T>& a) {
  Mat3<T> r;
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[j][i];
  return r;
}
template <typename T>
FA_HD Mat3<T> operator+(const Mat3<T>& a, const Mat3<T>& b) {
  Mat3<T> r;
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[i][j] + b.m[i][j];
  return r;
}
template <typename T>
FA_HD Mat3<T> operator*(T s, const Mat3<T>& a) {
  Mat3<T> r;
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) r.m[i][j] = s * a.m[i][j];
  return r;
}
template <typename T>
FA_HD Vec3<T> matvec(const Mat3<T>& a, Vec3<T> v) {
  return {a.m[0][0] * v.x + a.m[0][1] * v.y + a.m[0][2] * v.z, a.m[1][0] * v.x + a.m[1][1] * v.y + a.m[1][2] * v.z,
          a.m[2][0] * v.x + a.m[2][1] * v.y + a.m[2][2] * v.z};
}
template <typename T>
FA_HD T trace(const Mat3<T>& a) {
  return a.m[0][0] + a.m[1][1] + a.m[2][2];
}
template <typename T>
FA_HD T det(const Mat3<T>& a) {
  return a.m[0][0] * (a.m[1][1] * a.m[2][2] - a.m[1][2] * a.m[2][1]) -
         a.m[0][1] * (a.m[1][0] * a.m[2][2] - a.m[1][2] * a.m[2][0]) +
         a.m[0][2] * (a.m[1][0] * a.m[2][1] - a.m[1][1] * a.m[2][0]);
}

// Unit quaternion (w, x, y, z) -> rotation matrix. The input need not be normalised: q is divided by |q|
// here, and quat_to_rotmat_vjp returns the gradient with respect to the unnormalised q.
template <typename T>
FA_HD Mat3<T> quat_to_rotmat(T w, T x, T y, T z) {
  const T inv = T(1) / sqrt(w * w + x * x + y * y + z * z);
  w *= inv;
  x *= inv;
  y *= inv;
  z *= inv;
  Mat3<T> r;
  r.m[0][0] = T(1) - T(2) * (y * y + z * z);
  r.m[0][1] = T(2) * (x * y - w * z);
  r.m[0][2] = T(2) * (x * z + w * y);
  r.m[1][0] = T(2) * (x * y + w * z);
  r.m[1][1] = T(1) - T(2) * (x * x + z * z);
  r.m[1][2] = T(2) * (y * z - w * x);
  r.m[2][0] = T(2) * (x * z - w * y);
  r.m[2][1] = T(2) * (y * z + w * x);
  r.m[2][2] = T(1) - T(2) * (x * x + y * y);
  return r;
}

// VJP of quat_to_rotmat: given dL/dR, writes dL/d(w, x, y, z) for the unnormalised input quaternion.
template <typename T>
FA_HD void quat_to_rotmat_vjp(T w, T x, T y, T z, const Mat3<T>& g, T* dq /* [4] */) {
  const T n2 = w * w + x * x + y * y + z * z;
  const T inv = T(1) / sqrt(n2);
  const T nw = w * inv, nx = x * inv, ny = y * inv, nz = z * inv;
  // Gradient with respect to the normalised quaternion.
  const T gw = T(2) * (nx * (g.m[2][1] - g.m[1][2]) + ny * (g.m[0][2] - g.m[2][0]) + nz * (g.m[1][0] - g.m[0][1]));
  const T gx = T(2) * (-T(2) * nx * (g.m[1][1] + g.m[2][2]) + ny * (g.m[0][1] + g.m[1][0]) +
                       nz * (g.m[0][2] + g.m[2][0]) + nw * (g.m[2][1] - g.m[1][2]));
  const T gy = T(2) * (nx * (g.m[0][1] + g.m[1][0]) - T(2) * ny * (g.m[0][0] + g.m[2][2]) +
                       nz * (g.m[1][2] + g.m[2][1]) + nw * (g.m[0][2] - g.m[2][0]));
  const T gz = T(2) * (nx * (g.m[0][2] + g.m[2][0]) + ny * (g.m[1][2] + g.m[2][1]) -
                       T(2) * nz * (g.m[0][0] + g.m[1][1]) + nw * (g.m[1][0] - g.m[0][1]));
  // Through the normalisation q/|q|: (I - n n^T) g / |q|.
  const T proj = gw * nw + gx * nx + gy * ny + gz * nz;
  dq[0] = (gw - proj * nw) * inv;
  dq[1] = (gx - proj * nx) * inv;
  dq[2] = (gy - proj * ny) * inv;
  dq[3] = (gz - proj * nz) * inv;
}

}  // namespace flashavatar
