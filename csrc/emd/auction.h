// Shared host/device pieces of the epsilon-scaling Jacobi auction (Bertsekas) for the assignment problem
// (N = M, uniform weights). The CUDA kernel (emd.cu, one block per batch item) and the CPU loop (emd_cpu.cpp)
// run the same rounds on the same data with the same tie-breaking; only the drivers differ (parallel / serial).
//
// Minimisation form. Person i (a point of x) holding object j (a point of y) pays c_ij + p_j. A round: every
// unassigned person i finds its best object j1 = argmin_j (c_ij + p_j) (value w1; ties to the smaller j) and
// the second-best value w2, and bids p_j1 + (w2 - w1) + eps on j1; each object takes its highest bid (ties to
// the smaller person index) and evicts its previous holder. Every held object then satisfies eps-complementary
// slackness. Phases divide eps by kEpsFactor and keep the prices; between phases only the persons that violate
// the new eps are unassigned.
//
// Certificate (this is what "exact up to tol" means): with m_i = min_j (c_ij + p_j), the potentials
// f_i = m_i, g_j = -p_j are dual feasible (f_i + g_j <= c_ij), so D = sum f + sum g <= OPT <= P = sum_i c_i,s(i),
// and  gap = P - D = sum_i (c_i,s(i) + p_s(i) - m_i)  is a sum of non-negative per-row slacks (each <= eps).
// The solver stops when gap <= tol * P, so the returned cost is within a relative tol of the optimum:
// (cost - OPT) <= tol * cost. Costs are evaluated in the input precision and summed in double.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/host_device.h"

namespace flashavatar {
namespace ot {

// eps reduction per phase (Bertsekas suggests 4-10). 7 instead of 5, with the pruned scans, on the H200: N = 4096
// 2 % / 15 % faster (B = 1 / 16) but N = 2048 13 % / 11 % slower (benchmarks/results/emd_h200.md), so 5 stays.
constexpr double kEpsFactor = 5.0;
// initial eps as a fraction of the cost bound: measured on an H100 (N=4096 B=1, N=2048 B=16, d=3), 0.002 took
// 20-30 % less time than 0.25 or 0.01: the early, coarse phases only reshuffle what later phases redo
constexpr double kInitDiv = 0.002;
constexpr double kInf = 1e300;
constexpr int kNoIndex = 0x7fffffff;

// |x - y|^p for p in {1, 2}; x, y of dimension d (DIM > 0 fixes it at compile time).
template <int DIM, typename scalar_t>
FA_HD scalar_t ground_cost(const scalar_t* x, const scalar_t* y, int d, int p) {
  const int dd = DIM > 0 ? DIM : d;
  scalar_t s = scalar_t(0);
  for (int k = 0; k < dd; ++k) {
    const scalar_t t = x[k] - y[k];
    s += t * t;
  }
  return p == 1 ? sqrt(s) : s;
}

// Smallest value (with its index, ties to the smaller index) and second smallest value of a stream.
struct BestTwo {
  double w1, w2;
  int j1;
};

FA_HD BestTwo best_two_init() { return BestTwo{kInf, kInf, kNoIndex}; }

FA_HD void best_two_push(BestTwo& b, double v, int j) {
  if (v < b.w1 || (v == b.w1 && j < b.j1)) {
    b.w2 = b.w1;
    b.w1 = v;
    b.j1 = j;
  } else if (v < b.w2) {
    b.w2 = v;
  }
}

// Merge of two partial results; exact, commutative and associative, so reductions are deterministic.
FA_HD void best_two_merge(BestTwo& b, const BestTwo& o) {
  best_two_push(b, o.w1, o.j1);
  best_two_push(b, o.w2, kNoIndex);
}

// The bid of a person whose scan gave bt: the price of j1 that makes j1 exactly eps better than the runner-up.
FA_HD double bid_price(const BestTwo& bt, double price_j1, double eps) {
  const double margin = bt.w2 < kInf ? bt.w2 - bt.w1 : 0.0;  // w2 = inf only when N = 1
  return price_j1 + margin + eps;
}

// Upper bound on every cost: |x_i - y_j| <= |x_i - o| + |y_j - o| with o = x_0.
FA_HD double cost_bound(double max_dist_x, double max_dist_y, int p) {
  const double r = max_dist_x + max_dist_y;
  return p == 1 ? r : r * r;
}

// The fraction of the cost bound the first phase starts at: kInitDiv, or FLASHAVATAR_EMD_INIT_EPS in (0, 1]
// (a tuning knob for benchmarks, read once; any eps > 0 gives the same certified result, only the rounds differ).
inline double initial_eps_fraction() {
  static const double frac = [] {
    const char* v = std::getenv("FLASHAVATAR_EMD_INIT_EPS");
    const double f = v != nullptr ? std::atof(v) : 0.0;
    return f > 0.0 && f <= 1.0 ? f : kInitDiv;
  }();
  return frac;
}

// Initial eps: a fraction of the cost bound (prices start at 0). Never 0: with all costs 0 (every point equal)
// a zero increment would let bidders evict each other forever.
FA_HD double initial_eps(double cmax, double frac) { return cmax > 0.0 ? frac * cmax : 1.0; }

// Phases are few (about log_5 of cost bound / (tol * mean cost)); the cap only stops non-finite inputs given
// with validate=False from looping.
constexpr int kMaxPhases = 200;

// The object a scan picked; 0 when every value was NaN (non-finite input), so indices stay in range.
FA_HD int bid_target(const BestTwo& bt) { return bt.j1 == kNoIndex ? 0 : bt.j1; }

// Smallest useful eps: below it, price + eps rounds back to the price in double.
FA_HD double eps_floor(double cmax) { return 1e-13 * cmax; }

// True when the certificate meets the tolerance (P = 0 is optimal: costs are non-negative).
FA_HD bool certified(double primal, double gap, double tol) { return primal <= 0.0 || gap <= tol * primal; }

// eps of the next phase: eps / kEpsFactor, but no smaller than needed for n * eps <= tol * P / 2 (which
// guarantees the certificate) unless eps is already there.
FA_HD double next_eps(double eps, double primal, double tol, int n) {
  const double target = 0.5 * tol * primal / static_cast<double>(n);
  const double scaled = eps / kEpsFactor;
  if (target < eps && scaled < target) return target;
  return scaled;
}

// ---- float32 pre-filter of the scans (float inputs, d <= 3) ----
// The scans compare c_ij + p_j in float64 (eps reaches ~1e-5 of the mean cost, below float32 resolution of the
// prices), but almost every object loses by a wide margin. Each object keeps a record {y_j, p_j rounded to
// float}; the scan first forms vf = fl32(c_ij + fl32(p_j)) and only takes the exact float64 path
// (double(c_ij) + p_j, the same value the unfiltered scan uses) when vf cannot prove the object irrelevant.
// The filter never changes a result: rounds, prices and certificates are those of the exact scan.
struct alignas(16) ObjectRecord {  // 16 bytes: one vector load on the GPU
  float y[3];                      // y_j (unused trailing coordinates are 0)
  float price;                     // float(p_j)
};

// The smallest float >= w (w >= 0; +inf above the float range): float keys that bound float64 values from above.
FA_HD float float_up(double w) {
  float f = static_cast<float>(w);
  if (static_cast<double>(f) < w) f = nextafterf(f, HUGE_VALF);
  return f;
}

// The float threshold t that proves "c + p > w" from vf >= t, for any w <= w_up (w_up = float_up(w), or a
// larger key). With c, p >= 0 (prices only rise from 0) and u = 2^-24, |vf - (c + p)| <= (2u + u^2)(c + p), so
// vf >= w_up (1 + 32u) (1 - u) + 1e-37 implies c + p > w_up (the absolute term covers subnormal rounding, the
// margin the roundings of t and of the float64 sum). NaN (compares false: always take the exact path) when
// w_up is above 1e37, infinite or NaN. The proof is strict, so skipping never changes a tie-break.
FA_HD float filter_threshold(float w_up) {
  if (!(w_up <= 1e37f)) {
    const unsigned int nan_bits = 0x7fc00000u;
    float nan;
    memcpy(&nan, &nan_bits, sizeof(nan));
    return nan;
  }
  return (w_up + w_up * 0x1p-19f) + 1e-37f;
}

// The float value the filter compares: fl32(c + float(p)).
FA_HD float filter_value(float c, const ObjectRecord& r) { return c + r.price; }

// Object j (record r, exact prices `price`) into the running best two of person xi, serially (the CPU twin;
// the CUDA kernel shares the threshold across a warp). thr: the filter threshold of bt.w2, updated when bt
// changes. An object with c + p > w2 never changes bt.
template <int DIM>
FA_HD void filtered_push(BestTwo& bt, float& thr, const float* xi, const ObjectRecord& r, const double* price,
                         int j, int p) {
  const float c = ground_cost<DIM, float>(xi, r.y, DIM, p);
  if (!(filter_value(c, r) >= thr)) {
    best_two_push(bt, static_cast<double>(c) + price[j], j);
    thr = filter_threshold(float_up(bt.w2));
  }
}

// The same for the certificate's row minimum m (thr: the threshold of m).
template <int DIM>
FA_HD void filtered_min(double& m, float& thr, const float* xi, const ObjectRecord& r, const double* price, int j,
                        int p) {
  const float c = ground_cost<DIM, float>(xi, r.y, DIM, p);
  if (!(filter_value(c, r) >= thr)) {
    m = fmin(m, static_cast<double>(c) + price[j]);
    thr = filter_threshold(float_up(m));
  }
}

// ---- pruned scans (float inputs, d <= 3): blocks of objects with a lower bound on their values ----
// The objects are put in kd-tree order (kd_leaf_order, object_order.cpp), so each run of kBlockObjects
// consecutive objects is a compact leaf. A block keeps the bounding box of its records' coordinates and a lower
// bound of its prices (prices only rise, so a bound taken earlier stays valid). For person x_i the box distance
// plus that price bound bounds every value c_ij + p_j in the block from below; a block whose bound reaches the
// scan's filter threshold cannot hold the best or second best value and is skipped whole. On two uniform clouds
// of 4,096 points about 5 of the 128 blocks survive the final threshold, so a bid reads ~300 records, not 4,096.
// The skip is a proof, like the float filter's: the results are those of the plain scan.
constexpr int kBlockObjects = 32;  // one object per lane of a warp

struct BlockBox {  // bounding box of a block's float coordinates (unused trailing coordinates 0)
  float lo[3], hi[3];
};

// The largest float <= w (w >= 0).
FA_HD float float_down(double w) {
  float f = static_cast<float>(w);
  if (static_cast<double>(f) > w) f = nextafterf(f, -HUGE_VALF);
  return f;
}

// A float <= c_ij + p_j (as the scan evaluates it: float cost, float64 sum) for every object j of the block, given
// price_lo <= p_j. The box distance and the sum round by a few float ulps and the scan's float cost can be a few
// ulps below the exact distance; the factor (1 - 2^-18) covers them with room, the absolute term subnormals.
template <int DIM>
FA_HD float block_lower_bound(const float* xi, const BlockBox& box, float price_lo, int p) {
  float s = 0.f;
  for (int k = 0; k < DIM; ++k) {  // comparisons, not fmaxf: a libm call on the host (NaN: never skips)
    const float below = box.lo[k] - xi[k], above = xi[k] - box.hi[k];
    const float gap = below > above ? below : above;
    s += gap > 0.f ? gap * gap : 0.f;
  }
  const float c = p == 1 ? sqrtf(s) : s;
  const float lb = (c + price_lo) * (1.f - 0x1p-18f) - 1e-36f;
  return lb > 0.f ? lb : 0.f;
}

// True when a block (bound lb) cannot change a scan whose filter threshold is thr: every value in it is above
// the value thr was made from (filter_threshold: thr > w_up >= w). A NaN threshold never skips.
FA_HD bool block_skippable(float lb, float thr) { return lb >= thr; }

// Bounding box of the records rec[0..count) (one block).
FA_HD BlockBox block_box(const ObjectRecord* rec, int count) {
  BlockBox box{{HUGE_VALF, HUGE_VALF, HUGE_VALF}, {-HUGE_VALF, -HUGE_VALF, -HUGE_VALF}};
  for (int j = 0; j < count; ++j)
    for (int k = 0; k < 3; ++k) box.lo[k] = fminf(box.lo[k], rec[j].y[k]), box.hi[k] = fmaxf(box.hi[k], rec[j].y[k]);
  return box;
}

// Every kRefreshRounds rounds (and before each certificate) the blocks' price bounds are taken again: prices only
// rise, so in between they are valid, only looser.
constexpr int kRefreshRounds = 8;

// Record of object j from its coordinates (d <= 3) and price.
template <int DIM, typename scalar_t>
FA_HD ObjectRecord make_record(const scalar_t* yj, double price_j) {
  ObjectRecord r{{0.f, 0.f, 0.f}, static_cast<float>(price_j)};
  for (int k = 0; k < DIM; ++k) r.y[k] = static_cast<float>(yj[k]);
  return r;
}

// Status codes written per batch item.
enum AuctionStatus : int { kRunning = 0, kConverged = 1, kMaxIter = 2, kEpsUnderflow = 3 };

}  // namespace ot
}  // namespace flashavatar
