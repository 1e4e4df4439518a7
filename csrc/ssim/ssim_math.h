// The math of the fused SSIM op, written once for the CUDA kernels (ssim.cu) and the CPU loops (ssim_cpu.cpp).
//
// SSIM of Wang et al. 2004 with an 11-tap Gaussian window, 'same' padding by reflection (PyTorch's "reflect":
// the edge sample is not repeated), the pure-PyTorch twin being flashavatar.metrics.ssim_map(blur="conv").
//
// The 1-D blur with the padding folded in is a matrix M [n, n]: blurred(q) = sum_p M(q, p) v(p), with nonzero
// entries only for |q - p| <= R (R = 5). blur_weight(q, p) is that entry, so the forward (sum over p) and its
// adjoint in the backward (sum over q) use the very same function, and a tile with a halo of R pixels holds
// everything either pass needs (edge reflections land within R of the output too).
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace flashavatar {
namespace ssim {

constexpr int kRadius = 5;                 // window 11
constexpr int kTaps = 2 * kRadius + 1;
constexpr double kC1 = 0.01 * 0.01;        // (K1 L)^2, L = 1
constexpr double kC2 = 0.03 * 0.03;        // (K2 L)^2

template <typename T>
struct Window {
  T g[kTaps];  // normalised Gaussian taps, g[k] weights offset k - kRadius
};

// The taps for a Gaussian of standard deviation sigma (pixels), computed in double on the host.
template <typename T>
inline Window<T> make_window(double sigma) {
  double g[kTaps], total = 0.0;
  for (int k = 0; k < kTaps; ++k) {
    const double d = k - kRadius;
    g[k] = std::exp(-d * d / (2.0 * sigma * sigma));
    total += g[k];
  }
  Window<T> w;
  for (int k = 0; k < kTaps; ++k) w.g[k] = static_cast<T>(g[k] / total);
  return w;
}

// M(q, p) for a signal of length n > kRadius and |q - p| <= kRadius: the direct tap plus the taps that
// reflection folds onto p (index -p for p > 0, index 2(n-1) - p for p < n-1).
// g: the kTaps taps (a Window's, or a copy in shared memory: the reflected taps are indexed at run time).
template <typename T>
FA_HD T blur_weight(const T* g, int q, int p, int n) {
  T v = g[p - q + kRadius];
  const int k_low = kRadius - q - p;                // tap reading index -p
  if (p > 0 && k_low >= 0) v += g[k_low];            // k_low <= 2R holds: q + p >= 0
  const int k_high = 2 * (n - 1) - p - q + kRadius;  // tap reading index 2(n-1) - p
  if (p < n - 1 && k_high <= 2 * kRadius) v += g[k_high];
  return v;
}

// The five blurred moments of one pixel and channel.
template <typename T>
struct Moments {
  T mu_x, mu_y, xx, yy, xy;  // blur(x), blur(y), blur(x^2), blur(y^2), blur(x y)
};

// The five per-pixel quantities the forward blurs, in Moments order.
template <typename T>
FA_HD void moment_inputs(T x, T y, T (&v)[5]) {
  v[0] = x;
  v[1] = y;
  v[2] = x * x;
  v[3] = y * y;
  v[4] = x * y;
}

template <typename T>
struct Terms {
  T a1, a2, b1, b2;  // SSIM = a1 a2 / (b1 b2)
};

template <typename T>
FA_HD Terms<T> terms(const Moments<T>& m) {
  const T sxx = m.xx - m.mu_x * m.mu_x, syy = m.yy - m.mu_y * m.mu_y, sxy = m.xy - m.mu_x * m.mu_y;
  return {T(2) * m.mu_x * m.mu_y + T(kC1), T(2) * sxy + T(kC2), m.mu_x * m.mu_x + m.mu_y * m.mu_y + T(kC1),
          sxx + syy + T(kC2)};
}

template <typename T>
FA_HD T value(const Moments<T>& m) {
  const Terms<T> t = terms(m);
  return t.a1 * t.a2 / (t.b1 * t.b2);
}

// Partial derivatives of SSIM with respect to the moments (the variances and covariance written out, so
// d/d mu_x includes their dependence on mu_x). No division by a1 or a2: the covariance term can be zero.
template <typename T>
struct Partials {
  T mu_x, mu_y, xx, yy, xy;
};

template <typename T>
FA_HD Partials<T> partials(const Moments<T>& m) {
  const Terms<T> t = terms(m);
  const T inv = T(1) / (t.b1 * t.b2);
  const T s = t.a1 * t.a2 * inv;
  const T d_var = -s / t.b2;                // d s / d blur(x^2) = d s / d blur(y^2)
  const T common = T(2) * (t.a2 - t.a1) * inv;
  const T d_mean_sq = T(2) * (s / t.b2 - s / t.b1);
  return {m.mu_y * common + m.mu_x * d_mean_sq, m.mu_x * common + m.mu_y * d_mean_sq, d_var, d_var,
          T(2) * t.a1 * inv};
}

// The backward's five blurred adjoints (M^T applied to d loss / d moment) -> gradients of one pixel:
// d/dx = adj_mu_x + 2 x adj_xx + y adj_xy, and the same for y with the roles swapped.
template <typename T>
FA_HD void pixel_grads(const T (&adj)[5], T x, T y, T& grad_x, T& grad_y) {
  grad_x = adj[0] + T(2) * x * adj[2] + y * adj[4];
  grad_y = adj[1] + T(2) * y * adj[3] + x * adj[4];
}

// d loss / d moments of one pixel and channel, in Moments order (scale: the upstream gradient / C).
template <typename T>
FA_HD void moment_cotangents(const Moments<T>& m, T scale, T (&out)[5]) {
  const Partials<T> d = partials(m);
  out[0] = scale * d.mu_x;
  out[1] = scale * d.mu_y;
  out[2] = scale * d.xx;
  out[3] = scale * d.yy;
  out[4] = scale * d.xy;
}

}  // namespace ssim
}  // namespace flashavatar
