// CPU rasteriser: the simplest correct version of the CUDA pipeline's math (same helpers from raster_math.h).
// Per image: project every Gaussian, sort the kept ones by depth (stable, so ties keep index order as the
// GPU's stable radix sort does), then per pixel blend front to back over the Gaussians whose screen bounds
// cover it. float32 and float64, so float64 gradcheck runs on this path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "rasterizer/raster_math.h"
#include "rasterizer/rasterizer.h"

namespace flashavatar {

using raster::Intrinsics;
using raster::Projected;
using raster::Sym2;

int64_t rasterize_check_inputs(const char* op, const at::Tensor& means, const at::Tensor& quats,
                               const at::Tensor& scales, const at::Tensor& opacities, const at::Tensor& colors,
                               const at::Tensor& viewmats, const at::Tensor& Ks,
                               const c10::optional<at::Tensor>& backgrounds, int64_t width, int64_t height,
                               int64_t sh_degree, bool colors_may_be_shared) {
  FA_CHECK(op, means.dim() == 3 && means.size(2) == 3, "means must have shape [B, N, 3], got ",
           sizes_str(means));
  const int64_t B = means.size(0), N = means.size(1);
  FA_CHECK(op, quats.dim() == 3 && quats.size(0) == B && quats.size(1) == N && quats.size(2) == 4,
           "quats must have shape [", B, ", ", N, ", 4], got ", sizes_str(quats));
  FA_CHECK(op, scales.dim() == 3 && scales.size(0) == B && scales.size(1) == N && scales.size(2) == 3,
           "scales must have shape [", B, ", ", N, ", 3], got ", sizes_str(scales));
  FA_CHECK(op, opacities.dim() == 2 && opacities.size(0) == B && opacities.size(1) == N,
           "opacities must have shape [", B, ", ", N, "], got ", sizes_str(opacities));
  FA_CHECK(op, colors.dim() == 4 && colors.size(0) == B && colors.size(1) == N && colors.size(2) >= 1,
           "colors must have shape [", B, ", ", N, ", K, D], got ", sizes_str(colors));
  FA_CHECK(op, viewmats.dim() == 4 && viewmats.size(0) == B && viewmats.size(2) == 4 && viewmats.size(3) == 4,
           "viewmats must have shape [", B, ", C, 4, 4], got ", sizes_str(viewmats));
  const int64_t C = viewmats.size(1);
  FA_CHECK(op, Ks.dim() == 4 && Ks.size(0) == B && Ks.size(1) == C && Ks.size(2) == 3 && Ks.size(3) == 3,
           "Ks must have shape [", B, ", ", C, ", 3, 3], got ", sizes_str(Ks));
  const int64_t D = colors.size(3);
  FA_CHECK(op, D >= 1, "colors must have at least one channel, got ", sizes_str(colors));
  FA_CHECK(op, sh_degree >= -1 && sh_degree <= 3, "sh_degree must be in [0, 3] (or -1 for plain colours), got ",
           sh_degree);
  if (sh_degree < 0) {
    FA_CHECK(op, colors.size(2) == 1, "plain colors must have K = 1, got ", sizes_str(colors));
  } else {
    FA_CHECK(op, colors.size(2) >= (sh_degree + 1) * (sh_degree + 1), "SH degree ", sh_degree, " needs at least ",
             (sh_degree + 1) * (sh_degree + 1), " coefficients, colors has shape ", sizes_str(colors));
  }
  FA_CHECK(op, width > 0 && height > 0, "width and height must be positive, got ", width, "x", height);
  const at::Tensor* all[] = {&means, &quats, &scales, &opacities, &colors, &viewmats, &Ks};
  const char* names[] = {"means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"};
  for (int i = 0; i < 7; ++i) {
    FA_CHECK(op, all[i]->scalar_type() == at::kFloat || all[i]->scalar_type() == at::kDouble, names[i],
             " must be float32 or float64, got ", all[i]->scalar_type());
    FA_CHECK(op, all[i]->scalar_type() == means.scalar_type(), names[i], " (", all[i]->scalar_type(),
             ") must have the dtype of means (", means.scalar_type(), ")");
    FA_CHECK(op, all[i]->device() == means.device(), names[i], " (", all[i]->device(),
             ") must be on the device of means (", means.device(), ")");
    // colors may also be one set expanded over the batch (stride 0) where the caller reads it so (CUDA)
    const bool shared =
        colors_may_be_shared && i == 4 && B > 1 && colors.stride(0) == 0 && colors[0].is_contiguous();
    FA_CHECK(op, all[i]->is_contiguous() || shared, names[i], " must be contiguous");
  }
  if (backgrounds.has_value() && backgrounds->defined()) {
    const at::Tensor& bg = *backgrounds;
    FA_CHECK(op, bg.dim() == 3 && bg.size(0) == B && bg.size(1) == C && bg.size(2) == D,
             "backgrounds must have shape [", B, ", ", C, ", ", D, "], got ", sizes_str(bg));
    FA_CHECK(op, bg.scalar_type() == means.scalar_type(), "backgrounds (", bg.scalar_type(),
             ") must have the dtype of means (", means.scalar_type(), ")");
    FA_CHECK(op, bg.device() == means.device(), "backgrounds (", bg.device(), ") must be on the device of means (",
             means.device(), ")");
    FA_CHECK(op, bg.is_contiguous(), "backgrounds must be contiguous");
  }
  return D;
}

namespace {

struct PlainAdd {
  template <typename T>
  static void add(T* p, T v) {
    *p += v;
  }
};

template <typename T>
Intrinsics<T> intrinsics_of(const T* K, int64_t width, int64_t height) {
  return Intrinsics<T>{K[0], K[4], K[2], K[5], int(width), int(height)};
}

// Projection of every Gaussian of one image plus its colour. Returns the kept ids sorted by depth.
template <typename T>
std::vector<int64_t> project_image(int64_t N, int64_t K, int64_t D, int sh_degree, const T* means, const T* quats,
                                   const T* scales, const T* opac, const T* colors, const T* viewmat,
                                   const Intrinsics<T>& k, T near_plane, T far_plane, T eps2d,
                                   std::vector<Projected<T>>& proj, std::vector<T>& col) {
  proj.assign(N, Projected<T>{});
  col.assign(N * D, T(0));
  std::vector<int64_t> kept;
  const Vec3<T> campos = raster::camera_center(viewmat);
  for (int64_t n = 0; n < N; ++n) {
    if (!raster::project_gaussian(means + 3 * n, quats + 4 * n, scales + 3 * n, opac[n], viewmat, k, near_plane,
                                  far_plane, eps2d, proj[n])) {
      proj[n].radius = 0;
      continue;
    }
    kept.push_back(n);
    if (sh_degree >= 0) {
      const Vec3<T> dir{means[3 * n] - campos.x, means[3 * n + 1] - campos.y, means[3 * n + 2] - campos.z};
      raster::sh_colors(sh_degree, dir, colors + n * K * D, int(D), col.data() + n * D);
    } else {
      std::copy(colors + n * D, colors + (n + 1) * D, col.begin() + n * D);
    }
  }
  std::stable_sort(kept.begin(), kept.end(),
                   [&](int64_t a, int64_t b) { return proj[a].depth < proj[b].depth; });
  return kept;
}

// Depth-ordered Gaussian lists per 16x16 pixel block, so a pixel only walks the Gaussians whose bounds can
// reach its block (the per-pixel bounds test below still decides exactly, so this changes no result).
template <typename T>
std::vector<std::vector<int64_t>> bin_by_block(const std::vector<int64_t>& order, const std::vector<Projected<T>>& proj,
                                               int64_t W, int64_t H) {
  const int64_t bs = raster::kTileSize, bx = (W + bs - 1) / bs, by = (H + bs - 1) / bs;
  std::vector<std::vector<int64_t>> lists(bx * by);
  for (int64_t id : order) {
    const raster::PixelRect& r = proj[id].rect;
    for (int64_t ty = r.y0 / bs; ty <= r.y1 / bs; ++ty)
      for (int64_t tx = r.x0 / bs; tx <= r.x1 / bs; ++tx) lists[ty * bx + tx].push_back(id);
  }
  return lists;
}
inline int64_t block_of(int64_t x, int64_t y, int64_t W) {
  const int64_t bs = raster::kTileSize;
  return (y / bs) * ((W + bs - 1) / bs) + x / bs;
}

inline bool covers(const raster::PixelRect& r, int64_t x, int64_t y) {
  return x >= r.x0 && x <= r.x1 && y >= r.y0 && y <= r.y1;
}

// One contributor of one pixel, as the forward pass saw it.
template <typename T>
struct Hit {
  int64_t id;
  T alpha, vis, T_before, dx, dy;
};

// Front-to-back blending of one pixel; calls hit(...) for every contributing Gaussian. Returns final T.
template <typename T, typename F>
T blend_pixel(const std::vector<int64_t>& order, const std::vector<Projected<T>>& proj, int64_t x, int64_t y,
              const T* opac, F&& hit) {
  const T px = T(x) + T(0.5), py = T(y) + T(0.5);
  T trans = T(1);
  for (int64_t id : order) {
    const Projected<T>& p = proj[id];
    if (!covers(p.rect, x, y)) continue;
    const T dx = px - p.mx, dy = py - p.my;
    T vis;
    const T alpha = raster::gaussian_alpha(p.conic, opac[id], dx, dy, vis);
    T next;
    const raster::BlendStep step = raster::blend_step(alpha, trans, next);
    if (step == raster::BlendStep::kSkip) continue;
    if (step == raster::BlendStep::kStop) break;
    hit(Hit<T>{id, alpha, vis, trans, dx, dy});
    trans = next;
  }
  return trans;
}

template <typename T>
void forward_cpu_impl(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                      const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                      const at::Tensor& Ks, const T* bg, int64_t W, int64_t H, int sh_degree, T near_plane,
                      T far_plane, T eps2d, at::Tensor& render, at::Tensor& alpha, at::Tensor& depth,
                      at::Tensor& radii, at::Tensor& means2d, at::Tensor& conics, at::Tensor& colors_eval,
                      at::Tensor& depths) {
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1), K = colors.size(2),
                D = colors.size(3);
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<Projected<T>> proj;
    std::vector<T> col;
    for (int64_t img = begin; img < end; ++img) {
      const int64_t b = img / C;
      const T* viewmat = viewmats.data_ptr<T>() + img * 16;
      const Intrinsics<T> k = intrinsics_of(Ks.data_ptr<T>() + img * 9, W, H);
      const T* opac = opacities.data_ptr<T>() + b * N;
      std::vector<int64_t> order = project_image<T>(
          N, K, D, sh_degree, means.data_ptr<T>() + b * N * 3, quats.data_ptr<T>() + b * N * 4,
          scales.data_ptr<T>() + b * N * 3, opac, colors.data_ptr<T>() + b * N * K * D, viewmat, k, near_plane,
          far_plane, eps2d, proj, col);
      int32_t* rad = radii.data_ptr<int32_t>() + img * N;
      T* m2 = means2d.data_ptr<T>() + img * N * 2;
      T* con = conics.data_ptr<T>() + img * N * 3;
      T* ce = colors_eval.data_ptr<T>() + img * N * D;
      T* dep = depths.data_ptr<T>() + img * N;
      for (int64_t n = 0; n < N; ++n) {
        rad[n] = proj[n].radius;
        if (proj[n].radius == 0) continue;
        m2[2 * n] = proj[n].mx;
        m2[2 * n + 1] = proj[n].my;
        con[3 * n] = proj[n].conic.a;
        con[3 * n + 1] = proj[n].conic.b;
        con[3 * n + 2] = proj[n].conic.c;
        dep[n] = proj[n].depth;
        for (int64_t c = 0; c < D; ++c) ce[n * D + c] = col[n * D + c];
      }
      const auto lists = bin_by_block(order, proj, W, H);
      T* out = render.data_ptr<T>() + img * H * W * D;
      T* out_a = alpha.data_ptr<T>() + img * H * W;
      T* out_d = depth.data_ptr<T>() + img * H * W;
      const T* bgi = bg ? bg + img * D : nullptr;
      std::vector<T> acc(D);
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          std::fill(acc.begin(), acc.end(), T(0));
          T accz = T(0);
          const T trans = blend_pixel(lists[block_of(x, y, W)], proj, x, y, opac, [&](const Hit<T>& h) {
            const T w = h.alpha * h.T_before;
            for (int64_t c = 0; c < D; ++c) acc[c] += w * col[h.id * D + c];
            accz += w * proj[h.id].depth;
          });
          const int64_t pix = y * W + x;
          for (int64_t c = 0; c < D; ++c) out[pix * D + c] = acc[c] + (bgi ? trans * bgi[c] : T(0));
          out_a[pix] = T(1) - trans;
          out_d[pix] = accz;
        }
    }
  });
}

template <typename T>
void backward_cpu_impl(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                       const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                       const at::Tensor& Ks, const T* bg, int64_t W, int64_t H, int sh_degree, T near_plane,
                       T far_plane, T eps2d, const at::Tensor& g_render, const at::Tensor& g_alpha,
                       const at::Tensor& g_depth, at::Tensor& d_means, at::Tensor& d_quats, at::Tensor& d_scales,
                       at::Tensor& d_opac, at::Tensor& d_colors) {
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1), K = colors.size(2),
                D = colors.size(3);
  // Parallel over the Gaussian sets: every camera of set b accumulates into the same gradient rows.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<Projected<T>> proj;
    std::vector<T> col;
    std::vector<Hit<T>> hits;
    std::vector<T> acc(D);
    for (int64_t b = begin; b < end; ++b) {
      const T* mb = means.data_ptr<T>() + b * N * 3;
      const T* qb = quats.data_ptr<T>() + b * N * 4;
      const T* sb = scales.data_ptr<T>() + b * N * 3;
      const T* ob = opacities.data_ptr<T>() + b * N;
      const T* cb = colors.data_ptr<T>() + b * N * K * D;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t img = b * C + c;
        const T* viewmat = viewmats.data_ptr<T>() + img * 16;
        const Intrinsics<T> k = intrinsics_of(Ks.data_ptr<T>() + img * 9, W, H);
        std::vector<int64_t> order = project_image<T>(N, K, D, sh_degree, mb, qb, sb, ob, cb, viewmat, k,
                                                      near_plane, far_plane, eps2d, proj, col);
        // Per-Gaussian gradients of this image's 2D quantities.
        std::vector<T> g_m2(N * 2, T(0)), g_con(N * 3, T(0)), g_op(N, T(0)), g_col(N * D, T(0)), g_z(N, T(0));
        const T* gr = g_render.data_ptr<T>() + img * H * W * D;
        const T* ga = g_alpha.data_ptr<T>() + img * H * W;
        const T* gd = g_depth.data_ptr<T>() + img * H * W;
        const T* bgi = bg ? bg + img * D : nullptr;
        const auto lists = bin_by_block(order, proj, W, H);
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            hits.clear();
            const T t_final =
                blend_pixel(lists[block_of(x, y, W)], proj, x, y, ob, [&](const Hit<T>& h) { hits.push_back(h); });
            const int64_t pix = y * W + x;
            const T* gc = gr + pix * D;
            // Running sums over the Gaussians behind the current one (background included).
            for (int64_t ch = 0; ch < D; ++ch) acc[ch] = bgi ? t_final * bgi[ch] : T(0);
            T acc_z = T(0);
            for (auto it = hits.rbegin(); it != hits.rend(); ++it) {
              const Hit<T>& h = *it;
              const T one_minus = T(1) - h.alpha;
              const T w = h.alpha * h.T_before;
              const T z = proj[h.id].depth;
              T g_a = ga[pix] * t_final / one_minus + gd[pix] * (z * h.T_before - acc_z / one_minus);
              for (int64_t ch = 0; ch < D; ++ch) {
                const T cv = col[h.id * D + ch];
                g_a += gc[ch] * (cv * h.T_before - acc[ch] / one_minus);
                g_col[h.id * D + ch] += gc[ch] * w;
                acc[ch] += cv * w;
              }
              g_z[h.id] += gd[pix] * w;
              acc_z += z * w;
              Sym2<T> gcon;
              T gmx, gmy, gop;
              raster::gaussian_alpha_vjp(proj[h.id].conic, ob[h.id], h.dx, h.dy, h.vis, g_a, gcon, gmx, gmy, gop);
              g_m2[2 * h.id] += gmx;
              g_m2[2 * h.id + 1] += gmy;
              g_con[3 * h.id] += gcon.a;
              g_con[3 * h.id + 1] += gcon.b;
              g_con[3 * h.id + 2] += gcon.c;
              g_op[h.id] += gop;
            }
          }
        // Chain through the projection and the colour evaluation.
        const Vec3<T> campos = raster::camera_center(viewmat);
        T* dm = d_means.data_ptr<T>() + b * N * 3;
        T* dq = d_quats.data_ptr<T>() + b * N * 4;
        T* ds = d_scales.data_ptr<T>() + b * N * 3;
        T* dop = d_opac.data_ptr<T>() + b * N;
        T* dc = d_colors.data_ptr<T>() + b * N * K * D;
        for (int64_t n : order) {
          dop[n] += g_op[n];
          if (sh_degree >= 0) {
            const Vec3<T> dir{mb[3 * n] - campos.x, mb[3 * n + 1] - campos.y, mb[3 * n + 2] - campos.z};
            const Vec3<T> gdir = raster::sh_colors_vjp<T, PlainAdd>(sh_degree, dir, cb + n * K * D, int(D),
                                                                           g_col.data() + n * D, dc + n * K * D);
            dm[3 * n] += gdir.x;
            dm[3 * n + 1] += gdir.y;
            dm[3 * n + 2] += gdir.z;
          } else {
            for (int64_t ch = 0; ch < D; ++ch) dc[n * D + ch] += g_col[n * D + ch];
          }
          raster::project_gaussian_vjp(mb + 3 * n, qb + 4 * n, sb + 3 * n, viewmat, k, eps2d, g_m2[2 * n],
                                       g_m2[2 * n + 1], Sym2<T>{g_con[3 * n], g_con[3 * n + 1], g_con[3 * n + 2]},
                                       g_z[n], dm + 3 * n, dq + 4 * n, ds + 3 * n);
        }
      }
    }
  });
}

}  // namespace

RasterFwdOut rasterize_fwd_cpu(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                               const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                               const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                               int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                               double eps2d, int64_t capacity) {
  const char* op = "flashavatar::rasterize_fwd";
  const int64_t D = rasterize_check_inputs(op, means, quats, scales, opacities, colors, viewmats, Ks, backgrounds,
                                           width, height, sh_degree);
  (void)capacity;  // the CPU path needs no intersection list
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1), H = height, W = width;
  const auto opts = means.options();
  at::Tensor render = at::zeros({B, C, H, W, D}, opts);
  at::Tensor alpha = at::zeros({B, C, H, W, 1}, opts);
  at::Tensor depth = at::zeros({B, C, H, W, 1}, opts);
  at::Tensor radii = at::zeros({B, C, N}, opts.dtype(at::kInt));
  at::Tensor means2d = at::zeros({B, C, N, 2}, opts);
  at::Tensor conics = at::zeros({B, C, N, 3}, opts);
  at::Tensor colors_eval = at::zeros({B, C, N, D}, opts);
  at::Tensor depths = at::zeros({B, C, N}, opts);
  const auto iopts = opts.dtype(at::kInt);
  at::Tensor last_ids = at::zeros({B, C, H, W}, iopts);
  at::Tensor empty = at::zeros({0}, iopts);
  at::Tensor empty_ranges = at::zeros({0, 2}, iopts);
  const bool has_bg = backgrounds.has_value() && backgrounds->defined();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "rasterize_fwd_cpu", [&] {
    forward_cpu_impl<scalar_t>(means, quats, scales, opacities, colors, viewmats, Ks,
                               has_bg ? backgrounds->data_ptr<scalar_t>() : nullptr, W, H, int(sh_degree),
                               scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), render, alpha, depth,
                               radii, means2d, conics, colors_eval, depths);
  });
  at::Tensor transmittance = (1 - alpha).reshape({B, C, H, W});
  return {render, alpha, depth, radii, means2d, conics, colors_eval, depths, last_ids, transmittance,
          empty, empty.clone(), empty_ranges, empty.clone(), at::empty({0}, opts)};
}

RasterBwdOut rasterize_bwd_cpu(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                               const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                               const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                               int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                               double eps2d, const at::Tensor& alpha, const at::Tensor& radii,
                               const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors_eval,
                               const at::Tensor& depths, const at::Tensor& last_ids, const at::Tensor& transmittance,
                               const at::Tensor& sorted_ids, const at::Tensor& isect_ids,
                               const at::Tensor& tile_ranges, const at::Tensor& offsets,
                               const at::Tensor& chunk_state, const at::Tensor& grad_render, const c10::optional<at::Tensor>& grad_alpha,
                               const c10::optional<at::Tensor>& grad_depth) {
  const char* op = "flashavatar::rasterize_bwd";
  const int64_t D = rasterize_check_inputs(op, means, quats, scales, opacities, colors, viewmats, Ks, backgrounds,
                                           width, height, sh_degree);
  const int64_t B = means.size(0), C = viewmats.size(1), H = height, W = width;
  FA_CHECK(op, grad_render.sizes() == at::IntArrayRef({B, C, H, W, D}), "grad_render must have shape [", B, ", ",
           C, ", ", H, ", ", W, ", ", D, "], got ", sizes_str(grad_render));
  // Missing alpha/depth gradients (outputs not used) are zeros.
  auto grad_or_zeros = [&](const c10::optional<at::Tensor>& g, const char* name) {
    if (!g.has_value() || !g->defined()) return at::zeros({B, C, H, W, 1}, means.options());
    FA_CHECK(op, g->sizes() == at::IntArrayRef({B, C, H, W, 1}), name, " must have shape [", B, ", ", C, ", ", H,
             ", ", W, ", 1], got ", sizes_str(*g));
    return *g;
  };
  const at::Tensor grad_alpha_t = grad_or_zeros(grad_alpha, "grad_alpha");
  const at::Tensor grad_depth_t = grad_or_zeros(grad_depth, "grad_depth");
  // The CPU path recomputes projection and per-pixel lists; the saved forward state is not needed.
  (void)alpha, (void)radii, (void)means2d, (void)conics, (void)colors_eval, (void)depths, (void)last_ids, (void)transmittance;
  (void)sorted_ids, (void)isect_ids, (void)tile_ranges, (void)offsets, (void)chunk_state;
  const at::Tensor gr = grad_render.to(means.scalar_type()).contiguous();
  const at::Tensor ga = grad_alpha_t.to(means.scalar_type()).contiguous();
  const at::Tensor gd = grad_depth_t.to(means.scalar_type()).contiguous();
  at::Tensor d_means = at::zeros_like(means), d_quats = at::zeros_like(quats), d_scales = at::zeros_like(scales),
             d_opac = at::zeros_like(opacities), d_colors = at::zeros_like(colors);
  const bool has_bg = backgrounds.has_value() && backgrounds->defined();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "rasterize_bwd_cpu", [&] {
    backward_cpu_impl<scalar_t>(means, quats, scales, opacities, colors, viewmats, Ks,
                                has_bg ? backgrounds->data_ptr<scalar_t>() : nullptr, W, H, int(sh_degree),
                                scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), gr, ga, gd, d_means,
                                d_quats, d_scales, d_opac, d_colors);
  });
  return {d_means, d_quats, d_scales, d_opac, d_colors};
}

}  // namespace flashavatar
