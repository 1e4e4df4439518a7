// The kd-tree order of the objects that the pruned auction scans rely on (auction.h, "pruned scans"): tensor ops
// only, so it runs on the objects' device without a host round trip, the same on the CPU and on a GPU.
#include <torch/types.h>

#include <limits>

#include "emd/emd.h"

namespace flashavatar {

at::Tensor kd_leaf_order(const at::Tensor& y, int64_t leaf) {
  // y [B, n, d] -> order [B, n] int64, a permutation of 0..n-1 per item. Level by level, each contiguous run of
  // positions (a segment: sizes differ by at most one) is sorted along its longest extent, so its two halves are
  // the children of a median split; it stops when segments hold at most `leaf` objects.
  const int64_t nb = y.size(0), n = y.size(1), d = y.size(2);
  const auto i64 = y.options().dtype(at::kLong);
  const at::Tensor yd = y.to(at::kDouble);
  const auto f64 = yd.options();
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor pos = at::arange(n, i64);                                 // [n]
  const at::Tensor item = at::arange(nb, i64).unsqueeze(1);                  // [B, 1]
  at::Tensor order = pos.unsqueeze(0).expand({nb, n}).contiguous();          // [B, n]
  for (int64_t segments = 1; (n + segments - 1) / segments > leaf; segments *= 2) {
    const at::Tensor seg = at::div(pos * segments, n, "floor");            // [n] segment of each position
    const at::Tensor flat = (item * segments + seg.unsqueeze(0)).reshape({nb * n});  // [B n] segment over items
    const at::Tensor pts = yd.gather(1, order.unsqueeze(-1).expand({nb, n, d})).reshape({nb * n, d});
    const at::Tensor flat_d = flat.unsqueeze(1).expand({nb * n, d});
    const at::Tensor lo = at::full({nb * segments, d}, inf, f64).scatter_reduce(0, flat_d, pts, "amin", true);
    const at::Tensor hi = at::full({nb * segments, d}, -inf, f64).scatter_reduce(0, flat_d, pts, "amax", true);
    const at::Tensor extent = hi - lo;                                       // [B S, d]
    const at::Tensor axis = extent.argmax(1, /*keepdim=*/true);              // [B S, 1] longest extent
    const at::Tensor axis_lo = lo.gather(1, axis).squeeze(1).index_select(0, flat);          // [B n]
    const at::Tensor axis_len = extent.gather(1, axis).squeeze(1).index_select(0, flat);     // [B n]
    const at::Tensor key = pts.gather(1, axis.index_select(0, flat)).squeeze(1);            // [B n]
    // inside segment s the sort key lies in [s, s + 0.5]: one stable sort orders every segment at once
    const at::Tensor unit = ((key - axis_lo) / axis_len.clamp_min(1e-300)).nan_to_num(0.0).clamp(0.0, 1.0);
    const at::Tensor sort_key = (0.5 * unit).reshape({nb, n}) + seg.to(at::kDouble).unsqueeze(0);
    const at::Tensor within = std::get<1>(at::sort(sort_key, /*stable=*/true, /*dim=*/1));
    order = order.gather(1, within);
  }
  return order;
}

void restore_object_order(const at::Tensor& order, at::Tensor& plan_index, at::Tensor& g) {
  // The solver saw objects at their positions in `order` [B, n]; its plan_index [B, K, 2] (the first n rows
  // hold the assignment) and potentials g [B, n] go back to the caller's object indices.
  const int64_t n = order.size(1);
  at::Tensor objects = plan_index.narrow(1, 0, n).select(2, 1);  // [B, n] view
  objects.copy_(order.gather(1, objects));
  g = at::empty_like(g).scatter_(1, order, g);
}

}  // namespace flashavatar
