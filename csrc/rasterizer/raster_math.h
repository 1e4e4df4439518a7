// The rasteriser's math, written once for the CUDA kernels, the CPU loops and (through the tests) the
// pure-PyTorch reference: projection with the EWA Jacobian and a low-pass filter, 3D covariance from
// quaternion + scale, the conic, opacity-aware screen bounds, spherical harmonics (gsplat's convention) and
// the per-pixel alpha. Each forward helper sits beside its vector-Jacobian product (suffix _vjp).
//
// Named raster_math.h (not math.h) so that no include path can ever shadow the C library's <math.h>.
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "common/math.h"

namespace flashavatar {
namespace raster {

// Cut-offs shared by every path (SPEC §5): a Gaussian whose alpha at a pixel is below 1/255 is skipped
// there, alpha is clamped at 0.99, and a pixel stops before the Gaussian that would bring its
// transmittance to 1e-4 or below.
template <typename T>
FA_HD T alpha_threshold() {
  return T(1) / T(255);
}
template <typename T>
FA_HD T max_alpha() {
  return T(0.99);
}
template <typename T>
FA_HD T min_transmittance() {
  return T(1e-4);
}

constexpr int kTileSize = 16;  // pixels per tile side (CUDA path)
constexpr int kMaxShBases = 16;  // SH degree 3

// Symmetric 2x2 matrix [[a, b], [b, c]].
template <typename T>
struct Sym2 {
  T a, b, c;
};

// Camera intrinsics and image size, everything the projection needs from a camera.
template <typename T>
struct Intrinsics {
  T fx, fy, cx, cy;
  int width, height;
};

// ----------------------------------------------------------------------------------------------------
// World -> camera. viewmat is row-major 4x4 [R t; 0 1] (OpenCV: x right, y down, z forward).
template <typename T>
FA_HD Mat3<T> viewmat_rotation(const T* viewmat /* [16] */) {
  Mat3<T> r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) r.m[i][j] = viewmat[i * 4 + j];
  return r;
}
template <typename T>
FA_HD Vec3<T> world_to_camera(const T* viewmat, Vec3<T> p) {
  return {viewmat[0] * p.x + viewmat[1] * p.y + viewmat[2] * p.z + viewmat[3],
          viewmat[4] * p.x + viewmat[5] * p.y + viewmat[6] * p.z + viewmat[7],
          viewmat[8] * p.x + viewmat[9] * p.y + viewmat[10] * p.z + viewmat[11]};
}
// d(world point) from d(camera point): R^T g.
template <typename T>
FA_HD Vec3<T> world_to_camera_vjp(const T* viewmat, Vec3<T> g) {
  return {viewmat[0] * g.x + viewmat[4] * g.y + viewmat[8] * g.z, viewmat[1] * g.x + viewmat[5] * g.y + viewmat[9] * g.z,
          viewmat[2] * g.x + viewmat[6] * g.y + viewmat[10] * g.z};
}
// Camera centre in world coordinates: -R^T t.
template <typename T>
FA_HD Vec3<T> camera_center(const T* viewmat) {
  return T(-1) * world_to_camera_vjp(viewmat, Vec3<T>{viewmat[3], viewmat[7], viewmat[11]});
}

// ----------------------------------------------------------------------------------------------------
// 3D covariance Sigma = M M^T with M = R(q) diag(s). q is (w, x, y, z), normalised inside.
template <typename T>
FA_HD Mat3<T> covariance_3d(const T* quat /* [4] */, const T* scale /* [3] */) {
  Mat3<T> m = quat_to_rotmat(quat[0], quat[1], quat[2], quat[3]);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) m.m[i][j] *= scale[j];
  return matmul(m, transpose(m));
}
// VJP: g is dL/dSigma (treated as a full matrix; symmetrised here). Adds to dquat[4] and dscale[3].
template <typename T>
FA_HD void covariance_3d_vjp(const T* quat, const T* scale, const Mat3<T>& g, T* dquat, T* dscale) {
  const Mat3<T> r = quat_to_rotmat(quat[0], quat[1], quat[2], quat[3]);
  Mat3<T> m = r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) m.m[i][j] *= scale[j];
  // Sigma = M M^T  =>  dM = (G + G^T) M.
  const Mat3<T> gs = g + transpose(g);
  const Mat3<T> dm = matmul(gs, m);
  Mat3<T> dr;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) dr.m[i][j] = dm.m[i][j] * scale[j];
  for (int j = 0; j < 3; ++j) dscale[j] += dm.m[0][j] * r.m[0][j] + dm.m[1][j] * r.m[1][j] + dm.m[2][j] * r.m[2][j];
  T dq[4];
  quat_to_rotmat_vjp(quat[0], quat[1], quat[2], quat[3], dr, dq);
  for (int k = 0; k < 4; ++k) dquat[k] += dq[k];
}

// ----------------------------------------------------------------------------------------------------
// EWA projection of a camera-space Gaussian (mean pc, covariance cov_c) to the image plane.
// J is the Jacobian of the pinhole projection at pc, with x/z and y/z clamped to 1.3x the field of view
// (gsplat's convention) so Gaussians far outside the frustum do not get absurdly stretched footprints.
template <typename T>
struct EwaState {
  T lim_x_neg, lim_x_pos, lim_y_neg, lim_y_pos;
  bool x_clipped, y_clipped;
  T tx, ty;  // clipped x and y (camera space)
  T j00, j02, j11, j12;
};
template <typename T>
FA_HD EwaState<T> ewa_jacobian(Vec3<T> pc, const Intrinsics<T>& k) {
  EwaState<T> s;
  const T tan_fovx = T(0.5) * T(k.width) / k.fx, tan_fovy = T(0.5) * T(k.height) / k.fy;
  s.lim_x_pos = (T(k.width) - k.cx) / k.fx + T(0.3) * tan_fovx;
  s.lim_x_neg = k.cx / k.fx + T(0.3) * tan_fovx;
  s.lim_y_pos = (T(k.height) - k.cy) / k.fy + T(0.3) * tan_fovy;
  s.lim_y_neg = k.cy / k.fy + T(0.3) * tan_fovy;
  const T rz = T(1) / pc.z;
  const T xz = pc.x * rz, yz = pc.y * rz;
  // torch.clamp passes the gradient at the bounds; so do we (clipped = strictly outside).
  s.x_clipped = xz < -s.lim_x_neg || xz > s.lim_x_pos;
  s.y_clipped = yz < -s.lim_y_neg || yz > s.lim_y_pos;
  s.tx = s.x_clipped ? pc.z * (xz < -s.lim_x_neg ? -s.lim_x_neg : s.lim_x_pos) : pc.x;
  s.ty = s.y_clipped ? pc.z * (yz < -s.lim_y_neg ? -s.lim_y_neg : s.lim_y_pos) : pc.y;
  s.j00 = k.fx * rz;
  s.j02 = -k.fx * s.tx * rz * rz;
  s.j11 = k.fy * rz;
  s.j12 = -k.fy * s.ty * rz * rz;
  return s;
}
// cov2d = J cov_c J^T with J = [[j00, 0, j02], [0, j11, j12]].
template <typename T>
FA_HD Sym2<T> ewa_covariance(const EwaState<T>& s, const Mat3<T>& cv) {
  // rows of J * cov_c
  const T r0x = s.j00 * cv.m[0][0] + s.j02 * cv.m[2][0], r0y = s.j00 * cv.m[0][1] + s.j02 * cv.m[2][1],
          r0z = s.j00 * cv.m[0][2] + s.j02 * cv.m[2][2];
  const T r1x = s.j11 * cv.m[1][0] + s.j12 * cv.m[2][0], r1y = s.j11 * cv.m[1][1] + s.j12 * cv.m[2][1],
          r1z = s.j11 * cv.m[1][2] + s.j12 * cv.m[2][2];
  (void)r0y;
  (void)r1x;
  return {r0x * s.j00 + r0z * s.j02, r0y * s.j11 + r0z * s.j12, r1y * s.j11 + r1z * s.j12};
}
// VJP of (mean2d, cov2d) w.r.t. (pc, cov_c). g_cov is dL/d(a, b, c) of the symmetric cov2d where b is one
// parameter appearing at both off-diagonal places. Adds to dpc and dcov_c (full matrix).
template <typename T>
FA_HD void ewa_project_vjp(Vec3<T> pc, const Intrinsics<T>& k, const EwaState<T>& s, const Mat3<T>& cv, T g_mx,
                           T g_my, Sym2<T> g_cov, Vec3<T>& dpc, Mat3<T>& dcov) {
  const T rz = T(1) / pc.z, rz2 = rz * rz, rz3 = rz2 * rz;
  // mean2d = (fx x/z + cx, fy y/z + cy)
  dpc.x += k.fx * rz * g_mx;
  dpc.y += k.fy * rz * g_my;
  dpc.z += -k.fx * pc.x * rz2 * g_mx - k.fy * pc.y * rz2 * g_my;
  // Full symmetric gradient matrix G of the 2x2 covariance.
  const T g00 = g_cov.a, g01 = T(0.5) * g_cov.b, g11 = g_cov.c;
  // J as a 2x3 matrix.
  const T J[2][3] = {{s.j00, T(0), s.j02}, {T(0), s.j11, s.j12}};
  const T G[2][2] = {{g00, g01}, {g01, g11}};
  // dcov_c = J^T G J
  T GJ[2][3];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) GJ[i][j] = G[i][0] * J[0][j] + G[i][1] * J[1][j];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) dcov.m[i][j] += J[0][i] * GJ[0][j] + J[1][i] * GJ[1][j];
  // dJ = 2 G J cov_c (G and cov_c symmetric)
  T dJ[2][3];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      dJ[i][j] = T(2) * (GJ[i][0] * cv.m[0][j] + GJ[i][1] * cv.m[1][j] + GJ[i][2] * cv.m[2][j]);
  // J entries as functions of pc (with the clamp).
  dpc.z += -k.fx * rz2 * dJ[0][0] - k.fy * rz2 * dJ[1][1];
  if (s.x_clipped) {
    dpc.z += k.fx * s.tx * rz3 * dJ[0][2];  // j02 = -fx L / z
  } else {
    dpc.x += -k.fx * rz2 * dJ[0][2];
    dpc.z += T(2) * k.fx * pc.x * rz3 * dJ[0][2];
  }
  if (s.y_clipped) {
    dpc.z += k.fy * s.ty * rz3 * dJ[1][2];
  } else {
    dpc.y += -k.fy * rz2 * dJ[1][2];
    dpc.z += T(2) * k.fy * pc.y * rz3 * dJ[1][2];
  }
}

// ----------------------------------------------------------------------------------------------------
// Low-pass filter (eps2d on the diagonal, 0.3 px by default) and inversion: conic = (cov2d + eps I)^-1.
// Returns the determinant of the blurred covariance (<= 0: degenerate, the Gaussian is culled).
template <typename T>
FA_HD T blur_and_invert(Sym2<T> cov, T eps2d, Sym2<T>& conic) {
  const T a = cov.a + eps2d, c = cov.c + eps2d, b = cov.b;
  const T det = a * c - b * b;
  if (det > T(0)) {
    const T inv = T(1) / det;
    conic = {c * inv, -b * inv, a * inv};
  } else {
    conic = {T(0), T(0), T(0)};
  }
  return det;
}
// d(cov2d) = -M G M with M the conic, G the symmetric gradient of the conic (b counted once).
template <typename T>
FA_HD Sym2<T> blur_and_invert_vjp(Sym2<T> conic, Sym2<T> g) {
  const T M[2][2] = {{conic.a, conic.b}, {conic.b, conic.c}};
  const T G[2][2] = {{g.a, T(0.5) * g.b}, {T(0.5) * g.b, g.c}};
  T MG[2][2], R[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) MG[i][j] = M[i][0] * G[0][j] + M[i][1] * G[1][j];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) R[i][j] = -(MG[i][0] * M[0][j] + MG[i][1] * M[1][j]);
  return {R[0][0], R[0][1] + R[1][0], R[1][1]};
}

// ----------------------------------------------------------------------------------------------------
// Opacity-aware screen bounds. alpha = o exp(-q/2) with q = d^T conic d reaches 1/255 only inside the
// ellipse q <= 2 ln(255 o); its axis-aligned half-extents are sqrt(2 ln(255 o) * cov_blur_xx) (resp. yy).
// A small relative margin keeps rounding from ever dropping a pixel the dense evaluation would keep: extra
// pixels are harmless (they fail the per-pixel 1/255 test), missing ones would make the image depend on
// the tiling. Returns false when no pixel centre can receive alpha >= 1/255.
struct PixelRect {
  int x0, y0, x1, y1;  // inclusive pixel range
};
template <typename T>
FA_HD bool screen_bounds(T mx, T my, Sym2<T> cov_blur, T opacity, int width, int height, T& ext_x, T& ext_y,
                         PixelRect& rect) {
  if (!(opacity >= alpha_threshold<T>())) return false;
  const T t = T(2) * log(opacity * T(255));
  const T margin = T(1.0001);
  ext_x = sqrt(t * cov_blur.a) * margin + T(1e-3);
  ext_y = sqrt(t * cov_blur.c) * margin + T(1e-3);
  // pixel px has centre px + 0.5; it is inside when |px + 0.5 - mx| <= ext_x.
  const T fx0 = ceil(mx - ext_x - T(0.5)), fx1 = floor(mx + ext_x - T(0.5));
  const T fy0 = ceil(my - ext_y - T(0.5)), fy1 = floor(my + ext_y - T(0.5));
  if (!(fx1 >= T(0) && fy1 >= T(0) && fx0 <= T(width - 1) && fy0 <= T(height - 1))) return false;
  rect.x0 = fx0 < T(0) ? 0 : int(fx0);
  rect.y0 = fy0 < T(0) ? 0 : int(fy0);
  rect.x1 = fx1 > T(width - 1) ? width - 1 : int(fx1);
  rect.y1 = fy1 > T(height - 1) ? height - 1 : int(fy1);
  return rect.x0 <= rect.x1 && rect.y0 <= rect.y1;
}

// ----------------------------------------------------------------------------------------------------
// Spherical harmonics, gsplat's convention: basis of the normalised view direction (mean - camera centre),
// colour = sum_k basis_k coeff_k + 0.5, clamped at 0 by the caller.
template <typename T>
FA_HD void sh_basis(int degree, Vec3<T> d, T* basis /* [16] */) {
  basis[0] = T(0.2820947917738781);
  if (degree < 1) return;
  const T x = d.x, y = d.y, z = d.z;
  basis[1] = T(-0.48860251190292) * y;
  basis[2] = T(0.48860251190292) * z;
  basis[3] = T(-0.48860251190292) * x;
  if (degree < 2) return;
  const T z2 = z * z, fC1 = x * x - y * y, fS1 = T(2) * x * y;
  basis[4] = T(0.5462742152960395) * fS1;
  basis[5] = T(-1.092548430592079) * z * y;
  basis[6] = T(0.9461746957575601) * z2 - T(0.3153915652525201);
  basis[7] = T(-1.092548430592079) * z * x;
  basis[8] = T(0.5462742152960395) * fC1;
  if (degree < 3) return;
  const T fTmpC = T(-2.285228997322329) * z2 + T(0.4570457994644658);
  const T fTmpB = T(1.445305721320277) * z;
  const T fC2 = x * fC1 - y * fS1, fS2 = x * fS1 + y * fC1;
  basis[9] = T(-0.5900435899266435) * fS2;
  basis[10] = fTmpB * fS1;
  basis[11] = fTmpC * y;
  basis[12] = z * (T(1.865881662950577) * z2 - T(1.119528997770346));
  basis[13] = fTmpC * x;
  basis[14] = fTmpB * fC1;
  basis[15] = T(-0.5900435899266435) * fC2;
}
// Given g[k] = dL/dbasis_k, returns dL/d(x, y, z) of the (normalised) direction.
template <typename T>
FA_HD Vec3<T> sh_basis_vjp(int degree, Vec3<T> d, const T* g) {
  Vec3<T> r{T(0), T(0), T(0)};
  if (degree < 1) return r;
  const T x = d.x, y = d.y, z = d.z;
  const T c1 = T(0.48860251190292);
  r.y += -c1 * g[1];
  r.z += c1 * g[2];
  r.x += -c1 * g[3];
  if (degree < 2) return r;
  const T a2 = T(0.5462742152960395), b2 = T(-1.092548430592079), c2 = T(0.9461746957575601);
  r.x += a2 * T(2) * y * g[4];
  r.y += a2 * T(2) * x * g[4];
  r.y += b2 * z * g[5];
  r.z += b2 * y * g[5];
  r.z += T(2) * c2 * z * g[6];
  r.x += b2 * z * g[7];
  r.z += b2 * x * g[7];
  r.x += a2 * T(2) * x * g[8];
  r.y += -a2 * T(2) * y * g[8];
  if (degree < 3) return r;
  const T a3 = T(-0.5900435899266435), b3 = T(1.445305721320277), c3 = T(-2.285228997322329),
          c3b = T(0.4570457994644658), e3 = T(1.865881662950577), e3b = T(1.119528997770346);
  const T z2 = z * z, fTmpC = c3 * z2 + c3b;
  r.x += a3 * T(6) * x * y * g[9];
  r.y += a3 * (T(3) * x * x - T(3) * y * y) * g[9];
  r.x += b3 * z * T(2) * y * g[10];
  r.y += b3 * z * T(2) * x * g[10];
  r.z += b3 * T(2) * x * y * g[10];
  r.y += fTmpC * g[11];
  r.z += T(2) * c3 * z * y * g[11];
  r.z += (T(3) * e3 * z2 - e3b) * g[12];
  r.x += fTmpC * g[13];
  r.z += T(2) * c3 * z * x * g[13];
  r.x += b3 * z * T(2) * x * g[14];
  r.y += -b3 * z * T(2) * y * g[14];
  r.z += b3 * (x * x - y * y) * g[14];
  r.x += a3 * (T(3) * x * x - T(3) * y * y) * g[15];
  r.y += -a3 * T(6) * x * y * g[15];
  return r;
}
// F.normalize(v, eps=1e-12) and its VJP.
template <typename T>
FA_HD Vec3<T> normalize_dir(Vec3<T> v) {
  T n = sqrt(dot(v, v));
  n = n > T(1e-12) ? n : T(1e-12);
  return (T(1) / n) * v;
}
template <typename T>
FA_HD Vec3<T> normalize_dir_vjp(Vec3<T> v, Vec3<T> g) {
  const T n = sqrt(dot(v, v));
  if (!(n > T(1e-12))) return T(1e12) * g;
  const Vec3<T> u = (T(1) / n) * v;
  return (T(1) / n) * (g - dot(u, g) * u);
}

// Evaluate colour channel-by-channel: coeffs [K, D] (row k = basis k), out [D].
template <typename T>
FA_HD void sh_colors(int degree, Vec3<T> dir_unnorm, const T* coeffs, int D, T* out) {
  T basis[kMaxShBases];
  sh_basis(degree, normalize_dir(dir_unnorm), basis);
  const int nb = (degree + 1) * (degree + 1);
  for (int c = 0; c < D; ++c) {
    T s = T(0.5);
    for (int k = 0; k < nb; ++k) s += basis[k] * coeffs[k * D + c];
    out[c] = s > T(0) ? s : T(0);
  }
}
// VJP of sh_colors. g_color [D] is dL/d(clamped colour). Adds basis_k * g into dcoeffs via Acc::add
// (plain += on the CPU, atomicAdd on the GPU) and returns dL/d(dir_unnorm).
template <typename T, typename Acc>
FA_HD Vec3<T> sh_colors_vjp(int degree, Vec3<T> dir_unnorm, const T* coeffs, int D, const T* g_color, T* dcoeffs) {
  T basis[kMaxShBases], gb[kMaxShBases];
  const Vec3<T> dir = normalize_dir(dir_unnorm);
  sh_basis(degree, dir, basis);
  const int nb = (degree + 1) * (degree + 1);
  for (int k = 0; k < kMaxShBases; ++k) gb[k] = T(0);
  for (int c = 0; c < D; ++c) {
    T s = T(0.5);
    for (int k = 0; k < nb; ++k) s += basis[k] * coeffs[k * D + c];
    if (!(s >= T(0))) continue;  // clamp_min(., 0): no gradient where clamped
    const T g = g_color[c];
    if (g == T(0)) continue;
    for (int k = 0; k < nb; ++k) {
      Acc::add(dcoeffs + k * D + c, basis[k] * g);
      gb[k] += coeffs[k * D + c] * g;
    }
  }
  if (degree < 1) return Vec3<T>{T(0), T(0), T(0)};
  return normalize_dir_vjp(dir_unnorm, sh_basis_vjp(degree, dir, gb));
}

// ----------------------------------------------------------------------------------------------------
// exp for the per-pixel Gaussian: the GPU's fast intrinsic in float32 kernels (relative error ~1e-6, far
// below what the 1/255 and 1e-4 cut-offs resolve), the exact function elsewhere.
FA_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}
FA_HD double fast_exp(double x) { return exp(x); }

// Exact ellipse-rectangle test used to bin Gaussians into tiles (CUDA): does the ellipse
// q(d) = d^T conic d <= t (the region where alpha can reach 1/255, t = 2 ln(255 o)) contain a point of the
// rectangle [x0, x1] x [y0, y1] (coordinates relative to the mean)? q is convex, so if the mean is outside the
// rectangle its minimum over it lies on an edge, where q is a 1D convex quadratic: clamp its minimiser.
template <typename T>
FA_HD T conic_min_over_rect(Sym2<T> q, T x0, T x1, T y0, T y1) {
  if (x0 <= T(0) && T(0) <= x1 && y0 <= T(0) && T(0) <= y1) return T(0);
  T best = T(1e30);
  const T xs[2] = {x0, x1}, ys[2] = {y0, y1};
  for (int i = 0; i < 2; ++i) {
    const T x = xs[i];
    T y = -q.b * x / q.c;
    y = y < y0 ? y0 : (y > y1 ? y1 : y);
    const T v = q.a * x * x + T(2) * q.b * x * y + q.c * y * y;
    best = v < best ? v : best;
  }
  for (int i = 0; i < 2; ++i) {
    const T y = ys[i];
    T x = -q.b * y / q.a;
    x = x < x0 ? x0 : (x > x1 ? x1 : x);
    const T v = q.a * x * x + T(2) * q.b * x * y + q.c * y * y;
    best = v < best ? v : best;
  }
  return best;
}
// Does a Gaussian (mean2d, conic, opacity) reach alpha >= 1/255 at some pixel centre of tile (tx, ty)?
// Conservative by a relative 1e-3 so rounding can never drop a pixel the dense evaluation keeps.
// hit_threshold: the bound on the conic's quadratic form, once per Gaussian (the tile loops reuse it).
template <typename T>
FA_HD T hit_threshold(T opacity) {
  return T(2) * log(opacity * T(255)) * T(1.001) + T(1e-3);
}
template <typename T>
FA_HD bool gaussian_hits_tile_t(T mx, T my, Sym2<T> conic, T threshold, int tx, int ty, int tile, int width,
                                int height) {
  const int px1 = (tx + 1) * tile - 1 < width - 1 ? (tx + 1) * tile - 1 : width - 1;
  const int py1 = (ty + 1) * tile - 1 < height - 1 ? (ty + 1) * tile - 1 : height - 1;
  const T x0 = T(tx * tile) + T(0.5) - mx, x1 = T(px1) + T(0.5) - mx;
  const T y0 = T(ty * tile) + T(0.5) - my, y1 = T(py1) + T(0.5) - my;
  return conic_min_over_rect(conic, x0, x1, y0, y1) <= threshold;
}
template <typename T>
FA_HD bool gaussian_hits_tile(T mx, T my, Sym2<T> conic, T opacity, int tx, int ty, int tile, int width,
                              int height) {
  return gaussian_hits_tile_t(mx, my, conic, hit_threshold(opacity), tx, ty, tile, width, height);
}

// ----------------------------------------------------------------------------------------------------
// Per-pixel alpha: alpha = min(0.99, o exp(-sigma)), sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with
// d = pixel centre - mean2d.
template <typename T>
FA_HD T gaussian_alpha(Sym2<T> conic, T opacity, T dx, T dy, T& vis) {
  const T sigma = T(0.5) * (conic.a * dx * dx + conic.c * dy * dy) + conic.b * dx * dy;
  vis = fast_exp(-sigma);
  const T a = opacity * vis;
  return a < max_alpha<T>() ? a : max_alpha<T>();
}
// One front-to-back step at a pixel whose transmittance is `trans`, given the Gaussian's alpha there: skip it
// (alpha < 1/255), stop before it (it would bring the transmittance to 1e-4 or below; it does not contribute),
// or blend it with weight alpha * trans, the transmittance becoming `next`.
enum class BlendStep { kSkip, kStop, kBlend };
template <typename T>
FA_HD BlendStep blend_step(T alpha, T trans, T& next) {
  if (alpha < alpha_threshold<T>()) return BlendStep::kSkip;
  next = trans * (T(1) - alpha);
  return next <= min_transmittance<T>() ? BlendStep::kStop : BlendStep::kBlend;
}

// A pixel's list composited in parts (CUDA forward): a part blended on its own from transmittance 1 (local
// transmittance t_part, local sum s_part of weight x colour or depth) continues a front state (t_front, s_front)
// as transmittance t_front * t_part and sum s_front + t_front * s_part.
template <typename T>
FA_HD T sum_behind(T s_front, T t_front, T s_part) {
  return s_front + t_front * s_part;
}
// Whether the walk over the whole list may stop (blend_step's kStop) before reaching the state t_front * t_part:
// the transmittance only decreases along the list, so when the product stays above the cut-off no entry in
// between can stop it. The product is formed in another order than the whole-list walk's (a running product
// of at most ~2400 factors 1 - alpha <= 254/255 above 1e-4, so the two differ by a relative 3e-4 at most);
// the 1e-3 relative margin makes "cannot stop" always agree with that walk.
template <typename T>
FA_HD bool may_stop_before(T t_front, T t_part) {
  return t_front * t_part <= min_transmittance<T>() * T(1.001);
}

// VJP of gaussian_alpha given dL/dalpha. Where the 0.99 clamp is active alpha does not depend on the
// inputs, so nothing flows (the peers leak a gradient there).
template <typename T>
FA_HD void gaussian_alpha_vjp(Sym2<T> conic, T opacity, T dx, T dy, T vis, T g_alpha, Sym2<T>& g_conic, T& g_mx,
                              T& g_my, T& g_opacity) {
  const T raw = opacity * vis;
  if (!(raw < max_alpha<T>())) {
    g_conic = {T(0), T(0), T(0)};
    g_mx = g_my = g_opacity = T(0);
    return;
  }
  g_opacity = vis * g_alpha;
  const T g_sigma = -raw * g_alpha;  // d alpha / d sigma = -alpha
  g_conic = {T(0.5) * dx * dx * g_sigma, dx * dy * g_sigma, T(0.5) * dy * dy * g_sigma};
  // d sigma / d mean = -d sigma / d dx
  g_mx = -(conic.a * dx + conic.b * dy) * g_sigma;
  g_my = -(conic.b * dx + conic.c * dy) * g_sigma;
}

// ----------------------------------------------------------------------------------------------------
// Whole projection of one Gaussian into one camera.
template <typename T>
struct Projected {
  T mx, my;       // mean2d (pixels)
  Sym2<T> conic;  // inverse of the blurred 2D covariance
  T depth;        // camera-space z
  int radius;     // max(ceil(ext_x), ceil(ext_y)); 0 = culled
  PixelRect rect; // pixels it can reach with alpha >= 1/255
};
template <typename T>
FA_HD bool project_gaussian(const T* mean, const T* quat, const T* scale, T opacity, const T* viewmat,
                            const Intrinsics<T>& k, T near_plane, T far_plane, T eps2d, Projected<T>& out) {
  out.radius = 0;
  const Vec3<T> pc = world_to_camera(viewmat, Vec3<T>{mean[0], mean[1], mean[2]});
  out.depth = pc.z;
  if (!(pc.z >= near_plane && pc.z <= far_plane)) return false;
  const Mat3<T> rv = viewmat_rotation(viewmat);
  const Mat3<T> cov_c = matmul(matmul(rv, covariance_3d(quat, scale)), transpose(rv));
  const EwaState<T> s = ewa_jacobian(pc, k);
  const Sym2<T> cov2d = ewa_covariance(s, cov_c);
  const T det = blur_and_invert(cov2d, eps2d, out.conic);
  if (!(det > T(0))) return false;
  out.mx = k.fx * pc.x / pc.z + k.cx;
  out.my = k.fy * pc.y / pc.z + k.cy;
  T ext_x, ext_y;
  const Sym2<T> cov_blur{cov2d.a + eps2d, cov2d.b, cov2d.c + eps2d};
  if (!screen_bounds(out.mx, out.my, cov_blur, opacity, k.width, k.height, ext_x, ext_y, out.rect)) return false;
  const T e = ext_x > ext_y ? ext_x : ext_y;
  out.radius = int(ceil(e));
  return true;
}
// VJP of project_gaussian for a kept Gaussian: gradients of mean2d, conic and depth -> mean, quat, scale.
template <typename T>
FA_HD void project_gaussian_vjp(const T* mean, const T* quat, const T* scale, const T* viewmat,
                                const Intrinsics<T>& k, T eps2d, T g_mx, T g_my, Sym2<T> g_conic, T g_depth,
                                T* dmean /* [3] */, T* dquat /* [4] */, T* dscale /* [3] */) {
  const Vec3<T> pc = world_to_camera(viewmat, Vec3<T>{mean[0], mean[1], mean[2]});
  const Mat3<T> rv = viewmat_rotation(viewmat);
  const Mat3<T> cov3 = covariance_3d(quat, scale);
  const Mat3<T> cov_c = matmul(matmul(rv, cov3), transpose(rv));
  const EwaState<T> s = ewa_jacobian(pc, k);
  const Sym2<T> cov2d = ewa_covariance(s, cov_c);
  Sym2<T> conic;
  blur_and_invert(cov2d, eps2d, conic);
  const Sym2<T> g_cov2d = blur_and_invert_vjp(conic, g_conic);
  Vec3<T> dpc{T(0), T(0), g_depth};
  Mat3<T> dcov_c = mat3_zero<T>();
  ewa_project_vjp(pc, k, s, cov_c, g_mx, g_my, g_cov2d, dpc, dcov_c);
  // cov_c = R cov3 R^T  =>  dcov3 = R^T dcov_c R
  const Mat3<T> dcov3 = matmul(matmul(transpose(rv), dcov_c), rv);
  covariance_3d_vjp(quat, scale, dcov3, dquat, dscale);
  const Vec3<T> dm = world_to_camera_vjp(viewmat, dpc);
  dmean[0] += dm.x;
  dmean[1] += dm.y;
  dmean[2] += dm.z;
}

}  // namespace raster
}  // namespace flashavatar
