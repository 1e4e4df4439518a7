// The one place flashavatar's ops are registered with the PyTorch dispatcher.
// Schemas live in TORCH_LIBRARY; CPU kernels in TORCH_LIBRARY_IMPL(CPU); CUDA kernels in
// TORCH_LIBRARY_IMPL(CUDA) when the extension was compiled with nvcc (WITH_CUDA). Autograd and fake
// (meta) kernels are attached in Python (flashavatar/ops/*.py) with torch.library.register_autograd /
// register_fake, so torch.compile and CUDA-graph capture see ordinary dispatcher ops. Exception: the
// differentiable rasteriser op (flashavatar::rasterize) is defined, with its C++ autograd kernel, in
// csrc/rasterizer/rasterize_autograd.cpp (TORCH_LIBRARY_FRAGMENT): host time per call.
#include <torch/extension.h>

// ---- op headers ----
#include "rasterizer/rasterizer.h"  // rasterizer
// ---- emd headers ----
#include "emd/emd.h"
// ---- end emd headers ----
// ---- assembly headers ----
#include "assembly/assembly.h"
#include "flame/flame_lbs.h"
// ---- end assembly headers ----
#include "ssim/ssim.h"
#include "mlp/fused_mlp.h"
#include "mlp/mlp_layers.h"

TORCH_LIBRARY(flashavatar, m) {
  // ---- rasterizer schemas ----
  // Shapes and outputs: csrc/rasterizer/rasterizer.h. capacity sizes the tile-intersection buffer (CUDA).
  m.def(
      "rasterize_fwd(Tensor means, Tensor quats, Tensor scales, Tensor opacities, Tensor colors, "
      "Tensor viewmats, Tensor Ks, Tensor? backgrounds, int width, int height, int sh_degree, float near_plane, "
      "float far_plane, float eps2d, int capacity) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rasterize_bwd(Tensor means, Tensor quats, Tensor scales, Tensor opacities, Tensor colors, "
      "Tensor viewmats, Tensor Ks, Tensor? backgrounds, int width, int height, int sh_degree, float near_plane, "
      "float far_plane, float eps2d, Tensor alpha, Tensor radii, Tensor means2d, Tensor conics, "
      "Tensor colors_eval, Tensor depths, Tensor last_ids, Tensor transmittance, Tensor sorted_ids, "
      "Tensor isect_ids, "
      "Tensor tile_ranges, Tensor offsets, Tensor chunk_state, Tensor grad_render, Tensor? grad_alpha, "
      "Tensor? grad_depth) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- emd schemas ----
  m.def("gaussian_w2(Tensor mu0, Tensor cov0, Tensor mu1, Tensor cov1) -> Tensor");
  m.def("gaussian_w2_backward(Tensor grad, Tensor mu0, Tensor cov0, Tensor mu1, Tensor cov1) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gaussian_w2_sq(Tensor mu0, Tensor scales0, Tensor quats0, Tensor mu1, Tensor scales1, Tensor quats1) "
        "-> Tensor");
  m.def("gaussian_w2_sq_backward(Tensor grad, Tensor mu0, Tensor scales0, Tensor quats0, Tensor mu1, "
        "Tensor scales1, Tensor quats1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("emd_forward(Tensor x, Tensor y, Tensor? a, Tensor? b, int p, float tol, int max_iter) "
        "-> (Tensor cost, Tensor plan_index, Tensor plan_weight, Tensor f, Tensor g, Tensor status, Tensor gap, "
        "Tensor iterations)");
  // ---- end emd schemas ----
  // ---- assembly schemas ----
  // Shapes: csrc/assembly/assembly.h. Outputs: means, quats, scales, local_quats.
  m.def("gaussian_assembly(Tensor verts, Tensor faces, Tensor barycentrics, Tensor rotation, Tensor log_scale, "
        "Tensor raw, float offset_scale, bool parity) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gaussian_assembly_backward(Tensor grad_means, Tensor grad_quats, Tensor grad_scales, "
        "Tensor grad_local_quats, Tensor verts, Tensor faces, Tensor barycentrics, Tensor rotation, "
        "Tensor log_scale, Tensor raw, float offset_scale, bool parity, bool need_verts_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Shapes: csrc/flame/flame_lbs.h. Output: posed vertices [B, U, 3].
  m.def("flame_lbs(Tensor shape, Tensor expr, Tensor jaw, Tensor eyes, Tensor eyelids, Tensor dirs, Tensor base, "
        "Tensor lbs_weights, Tensor eyelid_dirs, bool use_eyelids) -> Tensor");
  // ---- end assembly schemas ----
  // Shapes: csrc/ssim/ssim.h. ssim_fwd -> (ssim_map [N, H, W], moments [5, N, H, W, C] or [0]).
  m.def("ssim_fwd(Tensor pred, Tensor gt, float sigma, bool keep_moments) -> (Tensor, Tensor)");
  // Shapes: csrc/mlp/fused_mlp.h. Inference only (no backward).
  m.def("fused_mlp(Tensor h_pe, Tensor cond, Tensor w_hidden, Tensor b_hidden, Tensor w_out, Tensor b_out) -> Tensor");
  // Shapes: csrc/mlp/mlp_layers.h. The Animator's first and last MLP layers; inference only (no backward).
  m.def("mlp_input(Tensor h_pe, Tensor cond) -> Tensor");
  m.def("mlp_head(Tensor h, Tensor w, Tensor b, bool apply_tanh) -> Tensor");
  m.def("ssim_bwd(Tensor grad_map, Tensor pred, Tensor gt, Tensor moments, float sigma, bool need_pred, "
        "bool need_gt) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashavatar, CPU, m) {
  // ---- rasterizer CPU ----
  m.impl("rasterize_fwd", &flashavatar::rasterize_fwd_cpu);
  m.impl("rasterize_bwd", &flashavatar::rasterize_bwd_cpu);
  // ---- emd CPU ----
  m.impl("gaussian_w2", &flashavatar::gaussian_w2_cpu);
  m.impl("gaussian_w2_backward", &flashavatar::gaussian_w2_backward_cpu);
  m.impl("gaussian_w2_sq", &flashavatar::gaussian_w2_sq_cpu);
  m.impl("gaussian_w2_sq_backward", &flashavatar::gaussian_w2_sq_backward_cpu);
  m.impl("emd_forward", &flashavatar::emd_forward_cpu);
  // ---- end emd CPU ----
  // ---- assembly CPU ----
  m.impl("gaussian_assembly", &flashavatar::gaussian_assembly_cpu);
  m.impl("gaussian_assembly_backward", &flashavatar::gaussian_assembly_backward_cpu);
  m.impl("flame_lbs", &flashavatar::flame_lbs_cpu);
  // ---- end assembly CPU ----
  m.impl("ssim_fwd", &flashavatar::ssim_fwd_cpu);
  m.impl("fused_mlp", &flashavatar::fused_mlp_cpu);
  m.impl("mlp_input", &flashavatar::mlp_input_cpu);
  m.impl("mlp_head", &flashavatar::mlp_head_cpu);
  m.impl("ssim_bwd", &flashavatar::ssim_bwd_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(flashavatar, CUDA, m) {
  // ---- rasterizer CUDA ----
  m.impl("rasterize_fwd", &flashavatar::rasterize_fwd_cuda);
  m.impl("rasterize_bwd", &flashavatar::rasterize_bwd_cuda);
  // ---- emd CUDA ----
  m.impl("gaussian_w2", &flashavatar::gaussian_w2_cuda);
  m.impl("gaussian_w2_backward", &flashavatar::gaussian_w2_backward_cuda);
  m.impl("gaussian_w2_sq", &flashavatar::gaussian_w2_sq_cuda);
  m.impl("gaussian_w2_sq_backward", &flashavatar::gaussian_w2_sq_backward_cuda);
  m.impl("emd_forward", &flashavatar::emd_forward_cuda);
  // ---- end emd CUDA ----
  // ---- assembly CUDA ----
  m.impl("gaussian_assembly", &flashavatar::gaussian_assembly_cuda);
  m.impl("gaussian_assembly_backward", &flashavatar::gaussian_assembly_backward_cuda);
  m.impl("flame_lbs", &flashavatar::flame_lbs_cuda);
  // ---- end assembly CUDA ----
  m.impl("ssim_fwd", &flashavatar::ssim_fwd_cuda);
  m.impl("fused_mlp", &flashavatar::fused_mlp_cuda);
  m.impl("mlp_input", &flashavatar::mlp_input_cuda);
  m.impl("mlp_head", &flashavatar::mlp_head_cuda);
  m.impl("ssim_bwd", &flashavatar::ssim_bwd_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashavatar compiled ops; the ops themselves are under torch.ops.flashavatar";
  m.def("cuda_compiled", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
