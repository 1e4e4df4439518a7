// Input validation at the C++ boundary. Every message names the op and the argument and prints sizes(),
// so a user sees e.g. "flashavatar::rasterize_fwd: means must have shape [..., N, 3], got [10, 4]".
#pragma once
#include <torch/types.h>

#include <sstream>
#include <string>

namespace flashavatar {

inline std::string sizes_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace flashavatar

// FA_CHECK(op, cond, msg...) : TORCH_CHECK with the op name in front.
#define FA_CHECK(op, cond, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

#define FA_CHECK_DIM(op, t, n) \
  FA_CHECK(op, (t).dim() == (n), #t " must have ", n, " dims, got shape ", ::flashavatar::sizes_str(t))

#define FA_CHECK_SIZE(op, t, d, s)                                                                         \
  FA_CHECK(op, (t).size(d) == (s), #t ".size(" #d ") must be ", s, ", got shape ", ::flashavatar::sizes_str(t))

#define FA_CHECK_FLOAT(op, t)                                                                             \
  FA_CHECK(op, (t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,                      \
           #t " must be float32 or float64, got ", (t).scalar_type())

#define FA_CHECK_SAME_DEVICE(op, a, b)                                                                    \
  FA_CHECK(op, (a).device() == (b).device(), #a " (", (a).device(), ") and " #b " (", (b).device(),      \
           ") must be on the same device")

#define FA_CHECK_SAME_DTYPE(op, a, b)                                                                     \
  FA_CHECK(op, (a).scalar_type() == (b).scalar_type(), #a " (", (a).scalar_type(), ") and " #b " (",     \
           (b).scalar_type(), ") must have the same dtype")

#define FA_CHECK_CONTIGUOUS(op, t) FA_CHECK(op, (t).is_contiguous(), #t " must be contiguous")

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
// After every kernel launch.
#define FA_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif
