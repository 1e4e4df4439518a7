// flashavatar::rasterize: the differentiable forward, with its autograd kernel in C++ (as torchvision does for
// roi_align), taking any leading batch dims.
//
//   rasterize(means [..., N, 3], quats [..., N, 4], scales [..., N, 3], opacities [..., N],
//             colors [..., N, D] (sh_degree = -1) or [..., N, K, D], viewmats [..., C, 4, 4], Ks [..., C, 3, 3],
//             backgrounds [..., C, D]?, width, height, sh_degree, near_plane, far_plane, eps2d, capacity)
//   -> render [..., C, H, W, D], alpha [..., C, H, W, 1], depth [..., C, H, W, 1], radii [..., C, N],
//      means2d [..., C, N, 2], conics [..., C, N, 3], colors_eval [..., C, N, D], depths [..., C, N],
//      then rasterize_fwd's bookkeeping outputs in their [B, ...] form (rasterizer.h).
//
// The reshapes to and from rasterize_fwd's [B, ...] layout happen here in C++, and the backward calls
// rasterize_bwd: with the Python torch.library glue (argument normalisation, a Python backward, view nodes for the
// reshapes) one forward+backward cost ~1 ms of host time on the GPU machine, more than its GPU work.
// rasterize_fwd / rasterize_bwd stay the raw kernels (no autograd); their fake kernels, and this op's, are in
// flashavatar/ops/rasterize.py. Callers validate first (the Python wrapper does): bad shapes end in the C++
// checks of rasterize_fwd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "rasterizer/rasterizer.h"

namespace flashavatar {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = RasterFwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            int64_t, int64_t, int64_t, double, double, double, int64_t);
using BwdSig = RasterBwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            int64_t, int64_t, int64_t, double, double, double, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flashavatar::rasterize_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flashavatar::rasterize_bwd", "").typed<BwdSig>();
  return op;
}

// rasterize_fwd's [B, ...] view of the inputs, and the way back to the caller's batch dims.
struct Batched {
  std::vector<int64_t> batch;  // leading dims of means (empty: one Gaussian set)
  at::Tensor means, quats, scales, opacities, colors, viewmats, Ks;
  c10::optional<at::Tensor> backgrounds;

  // [B, ...] -> batch + [...]: drops the leading B.
  at::Tensor unbatch(const at::Tensor& t) const {
    std::vector<int64_t> shape(batch);
    shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
    return t.view(shape);
  }
};

Batched to_batched(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                   const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                   const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t sh_degree) {
  Batched r;
  const int64_t nd = means.dim();
  TORCH_CHECK(nd >= 2, "flashavatar::rasterize: means must have shape [..., N, 3], got ", means.sizes());
  r.batch.assign(means.sizes().begin(), means.sizes().end() - 2);
  int64_t B = 1;
  for (int64_t d : r.batch) B *= d;
  const int64_t N = means.size(-2);
  const int64_t C = viewmats.dim() >= 3 ? viewmats.size(-3) : 0;
  const int64_t K = sh_degree < 0 ? 1 : (colors.dim() >= 2 ? colors.size(-2) : 0);
  const int64_t D = colors.dim() >= 1 ? colors.size(-1) : 0;
  r.means = means.reshape({B, N, 3});
  r.quats = quats.reshape({B, N, 4});
  r.scales = scales.reshape({B, N, 3});
  r.opacities = opacities.reshape({B, N});
  r.colors = colors.reshape({B, N, K, D});
  r.viewmats = viewmats.reshape({B, C, 4, 4});
  r.Ks = Ks.reshape({B, C, 3, 3});
  if (backgrounds.has_value() && backgrounds->defined()) r.backgrounds = backgrounds->reshape({B, C, D});
  return r;
}

// The forward on any batch dims: rasterize_fwd on the [B, ...] views, user-facing outputs back in batch shape.
variable_list forward_batched(const Batched& in, int64_t width, int64_t height, int64_t sh_degree,
                              double near_plane, double far_plane, double eps2d, int64_t capacity) {
  auto out = fwd_op().call(in.means, in.quats, in.scales, in.opacities, in.colors, in.viewmats, in.Ks,
                           in.backgrounds, width, height, sh_degree, near_plane, far_plane, eps2d, capacity);
  auto& [render, alpha, depth, radii, means2d, conics, colors_eval, depths, last_ids, trans, sorted_ids, isect_ids,
         ranges, offsets, chunk_state] = out;
  return {in.unbatch(render), in.unbatch(alpha), in.unbatch(depth), in.unbatch(radii), in.unbatch(means2d),
          in.unbatch(conics), in.unbatch(colors_eval), in.unbatch(depths), last_ids, trans, sorted_ids,
          isect_ids, ranges, offsets, chunk_state};
}

using RasterOut = RasterFwdOut;

RasterOut to_tuple(const variable_list& o) {
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11], o[12], o[13], o[14]};
}

// Saved tensors, in this order ([B, ...] forms).
enum Saved {
  kMeans, kQuats, kScales, kOpac, kColors, kViewmats, kKs, kBackgrounds,
  kAlpha, kRadii, kMeans2d, kConics, kColorsEval, kDepths, kLastIds, kTrans, kSortedIds, kIsectIds, kRanges,
  kOffsets, kChunkState, kNumSaved
};

class RasterizeFunction : public torch::autograd::Function<RasterizeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& means, const at::Tensor& quats,
                               const at::Tensor& scales, const at::Tensor& opacities, const at::Tensor& colors,
                               const at::Tensor& viewmats, const at::Tensor& Ks,
                               const c10::optional<at::Tensor>& backgrounds, int64_t width, int64_t height,
                               int64_t sh_degree, double near_plane, double far_plane, double eps2d,
                               int64_t capacity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Batched in = to_batched(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, sh_degree);
    variable_list out = forward_batched(in, width, height, sh_degree, near_plane, far_plane, eps2d, capacity);
    // The [B, ...] outputs the backward op reads: views of the returned ones.
    const int64_t B = in.means.size(0);
    auto batched = [&](const at::Tensor& t, size_t user_dims) {
      std::vector<int64_t> shape{B};
      shape.insert(shape.end(), t.sizes().end() - int64_t(user_dims), t.sizes().end());
      return t.view(shape);
    };
    const at::Tensor bg = in.backgrounds.has_value() ? *in.backgrounds : at::Tensor();
    ctx->save_for_backward({in.means, in.quats, in.scales, in.opacities, in.colors, in.viewmats, in.Ks, bg,
                            batched(out[1], 4), batched(out[3], 2), batched(out[4], 3), batched(out[5], 3),
                            batched(out[6], 3), batched(out[7], 2), out[8], out[9], out[10], out[11], out[12],
                            out[13], out[14]});
    ctx->saved_data["width"] = width;
    ctx->saved_data["height"] = height;
    ctx->saved_data["sh_degree"] = sh_degree;
    ctx->saved_data["near_plane"] = near_plane;
    ctx->saved_data["far_plane"] = far_plane;
    ctx->saved_data["eps2d"] = eps2d;
    ctx->saved_data["has_bg"] = bg.defined();
    ctx->saved_data["means_sizes"] = means.sizes();
    ctx->saved_data["quats_sizes"] = quats.sizes();
    ctx->saved_data["scales_sizes"] = scales.sizes();
    ctx->saved_data["opac_sizes"] = opacities.sizes();
    ctx->saved_data["colors_sizes"] = colors.sizes();
    ctx->saved_data["bg_sizes"] = bg.defined() ? backgrounds->sizes() : at::IntArrayRef{};
    // Unused outputs arrive as undefined gradients: no zero-filled gradient images.
    ctx->set_materialize_grads(false);
    // Only render, alpha and depth carry gradients (means2d has none; integer outputs are never differentiable).
    ctx->mark_non_differentiable({out[4], out[5], out[6], out[7], out[9], out[14]});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    TORCH_INTERNAL_ASSERT(s.size() == kNumSaved);
    const int64_t width = ctx->saved_data["width"].toInt(), height = ctx->saved_data["height"].toInt();
    const int64_t sh_degree = ctx->saved_data["sh_degree"].toInt();
    const bool has_bg = ctx->saved_data["has_bg"].toBool();
    const c10::optional<at::Tensor> bg = has_bg ? c10::optional<at::Tensor>(s[kBackgrounds]) : c10::nullopt;
    const at::Tensor& alpha = s[kAlpha];  // [B, C, H, W, 1]
    const int64_t B = alpha.size(0), C = alpha.size(1), D = s[kColors].size(3);
    // Cotangents in the [B, C, H, W, *] layout; a missing render one is zero (the kernels read missing
    // alpha/depth ones as zero).
    auto image_grad = [&](const at::Tensor& g, int64_t ch) {
      return g.reshape({B, C, height, width, ch}).contiguous();
    };
    const at::Tensor g_render = grads[0].defined() ? image_grad(grads[0], D)
                                                   : at::zeros({B, C, height, width, D}, alpha.options());
    auto optional_grad = [&](const at::Tensor& g) {
      return g.defined() ? c10::optional<at::Tensor>(image_grad(g, 1)) : c10::nullopt;
    };
    auto [d_means, d_quats, d_scales, d_opac, d_colors] = bwd_op().call(
        s[kMeans], s[kQuats], s[kScales], s[kOpac], s[kColors], s[kViewmats], s[kKs], bg, width, height, sh_degree,
        ctx->saved_data["near_plane"].toDouble(), ctx->saved_data["far_plane"].toDouble(),
        ctx->saved_data["eps2d"].toDouble(), alpha, s[kRadii], s[kMeans2d], s[kConics], s[kColorsEval], s[kDepths],
        s[kLastIds], s[kTrans], s[kSortedIds], s[kIsectIds], s[kRanges], s[kOffsets], s[kChunkState], g_render,
        optional_grad(grads[1]), optional_grad(grads[2]));
    at::Tensor d_bg;
    // render = ... + T_final * background: [B, C, H, W, D] * [B, C, H, W, 1] summed over pixels -> [B, C, D].
    if (has_bg && ctx->needs_input_grad(kBackgrounds) && grads[0].defined())
      d_bg = (g_render * (1 - alpha)).sum({2, 3}).view(ctx->saved_data["bg_sizes"].toIntVector());
    const auto colors_sizes = ctx->saved_data["colors_sizes"].toIntVector();
    // One entry per forward argument (undefined for the non-tensor ones), in the caller's shapes.
    return {d_means.view(ctx->saved_data["means_sizes"].toIntVector()),
            d_quats.view(ctx->saved_data["quats_sizes"].toIntVector()),
            d_scales.view(ctx->saved_data["scales_sizes"].toIntVector()),
            d_opac.view(ctx->saved_data["opac_sizes"].toIntVector()), d_colors.view(colors_sizes), at::Tensor(),
            at::Tensor(), d_bg, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

RasterOut rasterize_autograd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                             const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                             const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                             int64_t height, int64_t sh_degree, double near_plane, double far_plane, double eps2d,
                             int64_t capacity) {
  return to_tuple(RasterizeFunction::apply(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds,
                                           width, height, sh_degree, near_plane, far_plane, eps2d, capacity));
}

// Backend kernel (CPU and CUDA, e.g. under inference mode, where autograd is skipped).
RasterOut rasterize_backend(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                            const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                            const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                            int64_t height, int64_t sh_degree, double near_plane, double far_plane, double eps2d,
                            int64_t capacity) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Batched in = to_batched(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, sh_degree);
  return to_tuple(forward_batched(in, width, height, sh_degree, near_plane, far_plane, eps2d, capacity));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashavatar, m) {
  m.def(
      "rasterize(Tensor means, Tensor quats, Tensor scales, Tensor opacities, Tensor colors, "
      "Tensor viewmats, Tensor Ks, Tensor? backgrounds, int width, int height, int sh_degree, float near_plane, "
      "float far_plane, float eps2d, int capacity) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashavatar, CPU, m) { m.impl("rasterize", TORCH_FN(rasterize_backend)); }
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(flashavatar, CUDA, m) { m.impl("rasterize", TORCH_FN(rasterize_backend)); }
#endif
TORCH_LIBRARY_IMPL(flashavatar, Autograd, m) { m.impl("rasterize", TORCH_FN(rasterize_autograd)); }

}  // namespace flashavatar
