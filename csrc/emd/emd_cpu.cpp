// CPU kernels of emd: the auction rounds of emd.cu run serially (same rounds, same tie-breaking, shared code in
// auction.h), batch items in parallel; the transportation solver (ssp.h) for general weights / N != M.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "emd/auction.h"
#include "emd/emd.h"
#include "emd/ssp.h"

namespace flashavatar {
namespace {

struct AuctionOut {
  double primal = 0.0, gap = 0.0;
  int status = ot::kRunning;
  long long rounds = 0;
};

// The pruned scan of person xi (float inputs, d <= 3), serially: the block with the smallest bound first, then the
// others in index order, each skipped when its bound reaches the filter threshold (auction.h). kMinOnly: only
// the minimum is wanted (certificates; returned as w1), so the threshold follows it. Same results as a scan of
// every object. (The CUDA kernel's warp_pruned_scan visits best first, the smallest bound left next, which
// leaves fewer blocks to visit; the order changes no result.) lb: [nblocks] scratch for the blocks' bounds.
template <int DIM, bool kMinOnly>
ot::BestTwo pruned_scan_cpu(const float* xi, const ot::ObjectRecord* rec, const double* price,
                            const ot::BlockBox* box, const float* price_lo, int n, int p, float* lb) {
  using namespace ot;
  const int nblocks = (n + kBlockObjects - 1) / kBlockObjects;
  BestTwo bt = best_two_init();
  double m = kInf;
  float thr = filter_threshold(HUGE_VALF);
  int first = 0;
  float first_lb = HUGE_VALF;
  for (int b = 0; b < nblocks; ++b) {
    lb[b] = block_lower_bound<DIM>(xi, box[b], price_lo[b], p);
    if (lb[b] < first_lb) first_lb = lb[b], first = b;
  }
  auto visit = [&](int b) {
    const int end = std::min(n, (b + 1) * kBlockObjects);
    for (int j = b * kBlockObjects; j < end; ++j) {
      if constexpr (kMinOnly) filtered_min<DIM>(m, thr, xi, rec[j], price, j, p);
      else filtered_push<DIM>(bt, thr, xi, rec[j], price, j, p);
    }
  };
  visit(first);
  for (int b = 0; b < nblocks; ++b)
    if (b != first && !block_skippable(lb[b], thr)) visit(b);
  if constexpr (kMinOnly) bt.w1 = m;
  return bt;
}

// One assignment problem, n persons (x) and n objects (y). sigma [n] out (person -> object), price [n] out,
// row_min [n] out (f_i = min_j c_ij + p_j).
template <int DIM, typename scalar_t>
AuctionOut auction_solve_cpu(const scalar_t* x, const scalar_t* y, int n, int d, int p, double tol,
                             long long max_iter, int* sigma, double* price, double* row_min) {
  using namespace ot;
  auto cost = [&](int i, int j) -> double {
    return static_cast<double>(ground_cost<DIM, scalar_t>(x + static_cast<long>(i) * d, y + static_cast<long>(j) * d, d, p));
  };
  // float inputs with d <= 3 scan through the float32 pre-filter (auction.h), as the CUDA kernel does; the
  // results are those of the plain scan.
  constexpr bool kFiltered = std::is_same_v<scalar_t, float> && (DIM == 2 || DIM == 3);
  std::vector<ObjectRecord> rec(kFiltered ? n : 0);
  for (int j = 0; j < static_cast<int>(rec.size()); ++j) rec[j] = make_record<DIM>(y + static_cast<long>(j) * d, 0.0);
  auto set_price = [&](int j, double v) {
    price[j] = v;
    if constexpr (kFiltered) rec[j].price = static_cast<float>(v);
  };
  // pruned scans: the objects come in kd order (emd_forward_cpu), so blocks of kBlockObjects are compact
  const int nblocks = kFiltered ? (n + kBlockObjects - 1) / kBlockObjects : 0;
  std::vector<BlockBox> box(nblocks);
  std::vector<float> price_lo(nblocks, 0.f);  // lower bounds of the blocks' prices (prices start at 0)
  std::vector<float> bound(nblocks);          // one scan's block bounds (pruned_scan_cpu's scratch)
  for (int b = 0; b < nblocks; ++b)
    box[b] = block_box(rec.data() + b * kBlockObjects, std::min(kBlockObjects, n - b * kBlockObjects));
  auto refresh_price_bounds = [&] {
    for (int b = 0; b < nblocks; ++b) {
      double lo = kInf;
      for (int j = b * kBlockObjects; j < std::min(n, (b + 1) * kBlockObjects); ++j) lo = std::min(lo, price[j]);
      price_lo[b] = float_down(lo);
    }
  };
  AuctionOut out;
  std::vector<int> owner(n, -1), cur, nxt, bid_obj(n), winner(n, kNoIndex);
  std::vector<double> bid_val(n), best_bid(n, -1.0), slack(n);
  for (int i = 0; i < n; ++i) sigma[i] = -1, price[i] = 0.0;
  // cost bound from the distances to o = x_0
  double rx = 0.0, ry = 0.0;
  for (int i = 0; i < n; ++i) {
    rx = std::max(rx, std::sqrt(static_cast<double>(ground_cost<DIM, scalar_t>(x + static_cast<long>(i) * d, x, d, 2))));
    ry = std::max(ry, std::sqrt(static_cast<double>(ground_cost<DIM, scalar_t>(y + static_cast<long>(i) * d, x, d, 2))));
  }
  const double cmax = cost_bound(rx, ry, p);
  double eps = initial_eps(cmax, initial_eps_fraction());
  cur.resize(n);
  for (int i = 0; i < n; ++i) cur[i] = i;
  for (int phase = 0;; ++phase) {
    // ---- rounds of the phase, until everyone holds an object ----
    while (!cur.empty() && out.rounds < max_iter) {
      ++out.rounds;
      const int count = static_cast<int>(cur.size());
      if (kFiltered && out.rounds % kRefreshRounds == 0) refresh_price_bounds();
      for (int k = 0; k < count; ++k) {  // bids (against the prices at the start of the round: Jacobi)
        const int i = cur[k];
        BestTwo bt = best_two_init();
        if constexpr (kFiltered) {
          bt = pruned_scan_cpu<DIM, false>(x + static_cast<long>(i) * d, rec.data(), price, box.data(),
                                           price_lo.data(), n, p, bound.data());
        } else {
          for (int j = 0; j < n; ++j) best_two_push(bt, cost(i, j) + price[j], j);
        }
        bid_obj[k] = bid_target(bt);
        bid_val[k] = bid_price(bt, price[bid_obj[k]], eps);
      }
      for (int k = 0; k < count; ++k) {  // highest bid per object, ties to the smaller person index
        const int j = bid_obj[k], i = cur[k];
        if (bid_val[k] > best_bid[j] || (bid_val[k] == best_bid[j] && i < winner[j])) best_bid[j] = bid_val[k], winner[j] = i;
      }
      nxt.clear();
      for (int k = 0; k < count; ++k) {
        const int j = bid_obj[k], i = cur[k];
        if (winner[j] == i) {
          const int old = owner[j];
          if (old >= 0) sigma[old] = -1, nxt.push_back(old);
          owner[j] = i;
          sigma[i] = j;
          set_price(j, bid_val[k]);
        } else {
          nxt.push_back(i);
        }
      }
      for (int k = 0; k < count; ++k) best_bid[bid_obj[k]] = -1.0, winner[bid_obj[k]] = kNoIndex;
      cur.swap(nxt);
    }
    if (!cur.empty()) {  // out of rounds: complete the assignment with the free objects, report it
      int j = 0;
      for (int i : cur) {
        while (owner[j] >= 0) ++j;
        owner[j] = i, sigma[i] = j;
      }
      cur.clear();
      out.status = kMaxIter;
    }
    // ---- certificate ----
    double primal = 0.0, gap = 0.0;
    if constexpr (kFiltered) refresh_price_bounds();
    for (int i = 0; i < n; ++i) {
      double m = kInf;
      if constexpr (kFiltered) {
        m = pruned_scan_cpu<DIM, true>(x + static_cast<long>(i) * d, rec.data(), price, box.data(), price_lo.data(),
                                       n, p, bound.data()).w1;
      } else {
        for (int j = 0; j < n; ++j) m = std::min(m, cost(i, j) + price[j]);
      }
      const double ci = cost(i, sigma[i]);
      row_min[i] = m;
      slack[i] = std::max(0.0, ci + price[sigma[i]] - m);
      primal += ci;
      gap += slack[i];
    }
    out.primal = primal, out.gap = gap;
    if (certified(primal, gap, tol)) {
      out.status = kConverged;  // a certificate beats a max_iter stop
      break;
    }
    if (out.status == kMaxIter) break;
    const double eps_new = next_eps(eps, primal, tol, n);
    if (!(eps_new >= eps_floor(cmax)) || phase + 1 >= kMaxPhases) {
      out.status = kEpsUnderflow;
      break;
    }
    eps = eps_new;
    for (int i = 0; i < n; ++i)
      if (slack[i] > eps) owner[sigma[i]] = -1, sigma[i] = -1, cur.push_back(i);
  }
  return out;
}

template <typename scalar_t>
AuctionOut auction_dispatch_cpu(const scalar_t* x, const scalar_t* y, int n, int d, int p, double tol,
                                long long max_iter, int* sigma, double* price, double* row_min) {
  switch (d) {
    case 2: return auction_solve_cpu<2, scalar_t>(x, y, n, d, p, tol, max_iter, sigma, price, row_min);
    case 3: return auction_solve_cpu<3, scalar_t>(x, y, n, d, p, tol, max_iter, sigma, price, row_min);
    default: return auction_solve_cpu<0, scalar_t>(x, y, n, d, p, tol, max_iter, sigma, price, row_min);
  }
}

}  // namespace

EmdOutputs emd_forward_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const c10::optional<at::Tensor>& a_in,
                           const c10::optional<at::Tensor>& b_in, int64_t p, double tol, int64_t max_iter) {
  const char* op = "flashavatar::emd_forward";
  check_emd_args(op, x_in, y_in, a_in, b_in, p, tol, max_iter);
  const at::Tensor x = x_in.contiguous();
  const int64_t nb = x.size(0), n = x.size(1), m = y_in.size(1), d = x.size(2), k = n + m - 1;
  const bool assignment = !a_in.has_value() && n == m;
  // the assignment solver works on the objects in kd order (emd.h; restored below)
  const bool reorder = assignment;
  const at::Tensor order = reorder ? kd_leaf_order(y_in, ot::kBlockObjects) : at::Tensor();
  const at::Tensor y = reorder ? y_in.gather(1, order.unsqueeze(-1).expand({nb, n, d})).contiguous() : y_in.contiguous();
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor cost = at::zeros({nb}, f64), plan_index = at::zeros({nb, k, 2}, x.options().dtype(at::kLong)),
             plan_weight = at::zeros({nb, k}, f64), f = at::zeros({nb, n}, f64), g = at::zeros({nb, m}, f64),
             status = at::zeros({nb}, x.options().dtype(at::kInt)), gap = at::zeros({nb}, f64),
             iterations = at::zeros({nb}, x.options().dtype(at::kLong));
  at::Tensor a, b;
  if (!assignment) {
    a = a_in.has_value() ? a_in->contiguous() : at::full({nb, n}, 1.0 / static_cast<double>(n), f64);
    b = b_in.has_value() ? b_in->contiguous() : at::full({nb, m}, 1.0 / static_cast<double>(m), f64);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emd_forward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    double *cost_p = cost.data_ptr<double>(), *w_p = plan_weight.data_ptr<double>(), *f_p = f.data_ptr<double>(),
           *g_p = g.data_ptr<double>(), *gap_p = gap.data_ptr<double>();
    int64_t *idx_p = plan_index.data_ptr<int64_t>(), *it_p = iterations.data_ptr<int64_t>();
    int* st_p = status.data_ptr<int>();
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const scalar_t* xb = xp + bi * n * d;
        const scalar_t* yb = yp + bi * m * d;
        int64_t* idx = idx_p + bi * k * 2;
        double* w = w_p + bi * k;
        if (assignment) {
          std::vector<int> sigma(n);
          std::vector<double> price(n);
          const AuctionOut r = auction_dispatch_cpu<scalar_t>(xb, yb, static_cast<int>(n), static_cast<int>(d),
                                                             static_cast<int>(p), tol, max_iter, sigma.data(),
                                                             price.data(), f_p + bi * n);
          for (int64_t i = 0; i < n; ++i) {
            idx[2 * i] = i, idx[2 * i + 1] = sigma[i], w[i] = 1.0 / static_cast<double>(n);
            g_p[bi * m + i] = -price[i];
          }
          cost_p[bi] = r.primal / static_cast<double>(n);
          gap_p[bi] = r.gap / static_cast<double>(n);
          st_p[bi] = r.status;
          it_p[bi] = r.rounds;
        } else {
          ot::SspSolver<scalar_t> solver(xb, yb, static_cast<int>(n), static_cast<int>(m), static_cast<int>(d),
                                         static_cast<int>(p));
          std::vector<double> flow;
          const ot::SspResult r = solver.solve(a.data_ptr<double>() + bi * n, b.data_ptr<double>() + bi * m,
                                               max_iter, flow, f_p + bi * n, g_p + bi * m);
          int64_t nz = 0;
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < m; ++j) {
              const double fl = flow[static_cast<size_t>(i * m + j)];
              if (fl > 0.0 && nz < k) idx[2 * nz] = i, idx[2 * nz + 1] = j, w[nz] = fl, ++nz;
            }
          cost_p[bi] = r.cost;
          gap_p[bi] = r.gap;
          st_p[bi] = r.status;
          it_p[bi] = r.iterations;
        }
      }
    });
  });
  if (reorder) restore_object_order(order, plan_index, g);
  return {cost, plan_index, plan_weight, f, g, status, gap, iterations};
}

}  // namespace flashavatar
