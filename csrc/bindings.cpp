// The one place flashavatar's ops are registered with the PyTorch dispatcher.
// Schemas live in TORCH_LIBRARY; CPU kernels in TORCH_LIBRARY_IMPL(CPU); CUDA kernels in
// TORCH_LIBRARY_IMPL(CUDA) when the extension was compiled with nvcc (WITH_CUDA). Autograd and fake
// (meta) kernels are attached in Python (flashavatar/ops/*.py) with torch.library.register_autograd /
// register_fake, so torch.compile and CUDA-graph capture see ordinary dispatcher ops.
#include <torch/extension.h>

// ---- op headers ----

TORCH_LIBRARY(flashavatar, m) {
  // ---- rasterizer schemas ----
  // ---- emd schemas ----
}

TORCH_LIBRARY_IMPL(flashavatar, CPU, m) {
  // ---- rasterizer CPU ----
  // ---- emd CPU ----
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(flashavatar, CUDA, m) {
  // ---- rasterizer CUDA ----
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
