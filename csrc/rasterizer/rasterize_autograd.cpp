// Autograd kernel of flashavatar::rasterize_fwd, in C++ (as torchvision does for roi_align).
//
// The Python torch.library.register_autograd glue cost ~1 ms of host time per forward+backward at avatar sizes
// (argument normalisation, a Python backward, a Python redispatch), more than the GPU work itself. Here the
// forward redispatches below autograd to the CPU/CUDA kernel and saves what the backward op needs; the backward
// calls flashavatar::rasterize_bwd through the dispatcher. The fake (meta) kernels stay in Python
// (flashavatar/ops/rasterize.py, register_fake), so torch.compile and torch.library.opcheck still see the op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

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
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            const c10::optional<at::Tensor>&);

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

// Saved tensors, in this order.
enum Saved {
  kMeans, kQuats, kScales, kOpac, kColors, kViewmats, kKs, kBackgrounds,
  kAlpha, kRadii, kMeans2d, kConics, kColorsEval, kDepths, kLastIds, kTrans, kSortedIds, kIsectIds, kRanges,
  kOffsets, kNumSaved
};

class RasterizeFunction : public torch::autograd::Function<RasterizeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& means, const at::Tensor& quats,
                               const at::Tensor& scales, const at::Tensor& opacities, const at::Tensor& colors,
                               const at::Tensor& viewmats, const at::Tensor& Ks,
                               const c10::optional<at::Tensor>& backgrounds, int64_t width, int64_t height,
                               int64_t sh_degree, double near_plane, double far_plane, double eps2d,
                               int64_t capacity) {
    RasterFwdOut out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = fwd_op().call(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height,
                          sh_degree, near_plane, far_plane, eps2d, capacity);
    }
    auto& [render, alpha, depth, radii, means2d, conics, colors_eval, depths, last_ids, trans, sorted_ids,
           isect_ids, ranges, offsets] = out;
    const at::Tensor bg = backgrounds.has_value() ? *backgrounds : at::Tensor();
    ctx->save_for_backward({means, quats, scales, opacities, colors, viewmats, Ks, bg, alpha, radii, means2d,
                            conics, colors_eval, depths, last_ids, trans, sorted_ids, isect_ids, ranges, offsets});
    ctx->saved_data["width"] = width;
    ctx->saved_data["height"] = height;
    ctx->saved_data["sh_degree"] = sh_degree;
    ctx->saved_data["near_plane"] = near_plane;
    ctx->saved_data["far_plane"] = far_plane;
    ctx->saved_data["eps2d"] = eps2d;
    ctx->saved_data["has_bg"] = bg.defined();
    // Unused outputs arrive as undefined gradients: no zero-filled gradient images.
    ctx->set_materialize_grads(false);
    // Only render, alpha and depth carry gradients (means2d has none; integer outputs are never differentiable).
    ctx->mark_non_differentiable({means2d, conics, colors_eval, depths, trans});
    return {render, alpha, depth, radii, means2d, conics, colors_eval, depths, last_ids, trans, sorted_ids,
            isect_ids, ranges, offsets};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    TORCH_INTERNAL_ASSERT(s.size() == kNumSaved);
    const int64_t width = ctx->saved_data["width"].toInt(), height = ctx->saved_data["height"].toInt();
    const int64_t sh_degree = ctx->saved_data["sh_degree"].toInt();
    const bool has_bg = ctx->saved_data["has_bg"].toBool();
    const c10::optional<at::Tensor> bg = has_bg ? c10::optional<at::Tensor>(s[kBackgrounds]) : c10::nullopt;
    const at::Tensor& alpha = s[kAlpha];
    const int64_t D = s[kColors].size(3);
    // render [B, C, H, W, D]; a missing cotangent is zero (the kernels read missing alpha/depth ones as zero).
    at::Tensor g_render = grads[0].defined()
                              ? grads[0].contiguous()
                              : at::zeros({alpha.size(0), alpha.size(1), height, width, D}, alpha.options());
    auto optional_grad = [](const at::Tensor& g) {
      return g.defined() ? c10::optional<at::Tensor>(g.contiguous()) : c10::nullopt;
    };
    auto [d_means, d_quats, d_scales, d_opac, d_colors] = bwd_op().call(
        s[kMeans], s[kQuats], s[kScales], s[kOpac], s[kColors], s[kViewmats], s[kKs], bg, width, height, sh_degree,
        ctx->saved_data["near_plane"].toDouble(), ctx->saved_data["far_plane"].toDouble(),
        ctx->saved_data["eps2d"].toDouble(), alpha, s[kRadii], s[kMeans2d], s[kConics], s[kColorsEval], s[kDepths],
        s[kLastIds], s[kTrans], s[kSortedIds], s[kIsectIds], s[kRanges], s[kOffsets], g_render,
        optional_grad(grads[1]), optional_grad(grads[2]));
    at::Tensor d_bg;
    // render = ... + T_final * background: [B, C, H, W, D] * [B, C, H, W, 1] summed over pixels -> [B, C, D].
    if (has_bg && ctx->needs_input_grad(kBackgrounds) && grads[0].defined())
      d_bg = (grads[0] * (1 - alpha)).sum({2, 3});
    // One entry per forward argument (undefined for the non-tensor ones).
    return {d_means, d_quats, d_scales, d_opac, d_colors, at::Tensor(), at::Tensor(), d_bg, at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

RasterFwdOut rasterize_fwd_autograd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                    const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                                    const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds,
                                    int64_t width, int64_t height, int64_t sh_degree, double near_plane,
                                    double far_plane, double eps2d, int64_t capacity) {
  const variable_list o = RasterizeFunction::apply(means, quats, scales, opacities, colors, viewmats, Ks,
                                                   backgrounds, width, height, sh_degree, near_plane, far_plane,
                                                   eps2d, capacity);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11], o[12], o[13]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashavatar, Autograd, m) {
  m.impl("rasterize_fwd", TORCH_FN(rasterize_fwd_autograd));
}

}  // namespace flashavatar
