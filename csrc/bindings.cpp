// The one place flashavatar's ops are registered with the PyTorch dispatcher.
// Schemas live in TORCH_LIBRARY; CPU kernels in TORCH_LIBRARY_IMPL(CPU); CUDA kernels in
// TORCH_LIBRARY_IMPL(CUDA) when the extension was compiled with nvcc (WITH_CUDA). Autograd and fake
// (meta) kernels are attached in Python (flashavatar/ops/*.py) with torch.library.register_autograd /
// register_fake, so torch.compile and CUDA-graph capture see ordinary dispatcher ops.
#include <torch/extension.h>

// ---- op headers ----
#include "rasterizer/rasterizer.h"  // rasterizer

TORCH_LIBRARY(flashavatar, m) {
  // ---- rasterizer schemas ----
  // Shapes and outputs: csrc/rasterizer/rasterizer.h. capacity sizes the tile-intersection buffer (CUDA).
  m.def(
      "rasterize_fwd(Tensor means, Tensor quats, Tensor scales, Tensor opacities, Tensor colors, "
      "Tensor viewmats, Tensor Ks, Tensor? backgrounds, int width, int height, int sh_degree, float near_plane, "
      "float far_plane, float eps2d, int capacity) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rasterize_bwd(Tensor means, Tensor quats, Tensor scales, Tensor opacities, Tensor colors, "
      "Tensor viewmats, Tensor Ks, Tensor? backgrounds, int width, int height, int sh_degree, float near_plane, "
      "float far_plane, float eps2d, Tensor alpha, Tensor radii, Tensor means2d, Tensor conics, "
      "Tensor colors_eval, Tensor depths, Tensor last_ids, Tensor transmittance, Tensor sorted_ids, "
      "Tensor isect_ids, "
      "Tensor tile_ranges, Tensor offsets, Tensor grad_render, Tensor? grad_alpha, Tensor? grad_depth) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- emd schemas ----
}

TORCH_LIBRARY_IMPL(flashavatar, CPU, m) {
  // ---- rasterizer CPU ----
  m.impl("rasterize_fwd", &flashavatar::rasterize_fwd_cpu);
  m.impl("rasterize_bwd", &flashavatar::rasterize_bwd_cpu);
  // ---- emd CPU ----
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(flashavatar, CUDA, m) {
  // ---- rasterizer CUDA ----
  m.impl("rasterize_fwd", &flashavatar::rasterize_fwd_cuda);
  m.impl("rasterize_bwd", &flashavatar::rasterize_bwd_cuda);
  // ---- emd CUDA ----
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
