// CUDA kernel of emd for the assignment case (N = M, uniform weights): the epsilon-scaling Jacobi auction of
// auction.h, one thread block per batch item running every phase and round in one launch (no host round trips,
// no host-device synchronisation). General weights / N != M are solved by the CPU transportation solver on a
// copy (see emd.h).
//
// A round inside the block: the unassigned persons are split over the 32 warps (two persons per warp when more
// than 32 bid, several warps per person when few are left, so the tail of a phase still uses the whole block);
// each warp scans the objects for (best, second best) and reduces with shuffles. With more than 32 bidders, bids
// go to objects with a 64-bit atomicMax on the bit pattern of the (positive) double bid, ties to the smaller
// person with atomicMin; the winners take the objects and the evicted persons form the next round's list. Most
// rounds have few bidders (the end of each phase), and their latency sets the solve time: 2..32 bids are settled
// by warp 0 in registers (settle_small_round), and a lone bidder takes its object outright; with the pruned
// scans warp 0 then follows the chain of evictions itself, with no block barrier per round. Prices, bids, owners
// and the bidder lists live in shared memory when they fit (carved greedily, most used first).
// float inputs with d <= 3 take the pruned scans of auction.h: the objects come in kd order, blocks of 32 with a
// bounding box and a price bound are skipped whole when the bound proves they lose, and the objects of the
// blocks visited go through the float32 pre-filter, touching float64 only for the few it cannot rule out (same
// results as the plain scan over every object). Other inputs scan every object in float64.
// FLASHAVATAR_EMD_PROFILE=1 prints the kernel's cycles per kind of round (benchmarks/results/emd_h200.md).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "emd/auction.h"
#include "emd/emd.h"

namespace flashavatar {
namespace {

using namespace ot;

constexpr int kBlock = 1024;
constexpr int kWarps = kBlock / 32;
constexpr int kProfSlots = 12;

// Device workspace, each array [B, n] (or [B]) in global memory.
struct AuctionWork {
  ObjectRecord* rec;              // [B, n] {y_j, float(p_j)} (float inputs, d <= 3; else unused)
  BlockBox* box;                  // [B, nblocks] bounding boxes of the object blocks (same inputs; else unused)
  float* price_lo;                // [B, nblocks] lower bounds of the blocks' prices
  double* price;                  // [B, n]
  int* sigma;                     // [B, n] person -> object (-1 free)
  int* owner;                     // [B, n] object -> person (-1 free)
  unsigned long long* best_bits;  // [B, n] highest bid of the round per object (bits of a positive double)
  int* winner;                    // [B, n] smallest person index among the highest bids
  int* list0;                     // [B, n] unassigned persons (double-buffered)
  int* list1;                     // [B, n]
  int* bid_obj;                   // [B, n] per bidder slot
  double* bid_val;                // [B, n]
  double* row_min;                // [B, n] m_i = min_j c_ij + p_j (dual potential f)
  double* slack;                  // [B, n] c_i,s(i) + p_s(i) - m_i
  double* primal;                 // [B] sum_i c_i,s(i)
  double* gap;                    // [B] sum_i slack_i
  int* status;                    // [B]
  long long* rounds;              // [B]
  // [B, kProfSlots] or null: clock cycles (thread 0, after barriers) per kind of round (1 bidder, 2-32, more,
  // certificates), counts, and the scan and bid parts of the first two kinds; filled
  // only when FLASHAVATAR_EMD_PROFILE=1 (a diagnostic: where a solve's time goes)
  long long* profile;
  double init_frac;  // initial eps / cost bound (initial_eps_fraction())
};

__device__ __forceinline__ BestTwo warp_reduce_best_two(BestTwo bt) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    BestTwo o;
    o.w1 = __shfl_xor_sync(0xffffffffu, bt.w1, off);
    o.w2 = __shfl_xor_sync(0xffffffffu, bt.w2, off);
    o.j1 = __shfl_xor_sync(0xffffffffu, bt.j1, off);
    best_two_merge(bt, o);
  }
  return bt;
}

__device__ __forceinline__ double warp_min(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Block-wide sum (is_max = false) or max, returned to every thread. buf: [kWarps] shared.
__device__ double block_reduce(double v, bool is_max, double* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmax(v, o) : v + o;
  }
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? buf[lane] : (is_max ? -kInf : 0.0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const double o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? fmax(v, o) : v + o;
    }
    if (lane == 0) buf[0] = v;
  }
  __syncthreads();
  const double r = buf[0];
  __syncthreads();
  return r;
}

// The coordinates of person i: in registers when the dimension is a compile-time constant.
template <int DIM, typename scalar_t>
struct Person {
  scalar_t c[DIM > 0 ? DIM : 1];
  const scalar_t* ptr;
  __device__ __forceinline__ void load(const scalar_t* x, int i, int d) {
    ptr = x + static_cast<long>(i) * d;
    if constexpr (DIM > 0) {
#pragma unroll
      for (int k = 0; k < DIM; ++k) c[k] = ptr[k];
    }
  }
  __device__ __forceinline__ double cost_to(const scalar_t* y, int j, int d, int p) const {
    if constexpr (DIM > 0) return static_cast<double>(ground_cost<DIM, scalar_t>(c, y + static_cast<long>(j) * DIM, d, p));
    else return static_cast<double>(ground_cost<0, scalar_t>(ptr, y + static_cast<long>(j) * d, d, p));
  }
};

// Filter thresholds of the pruned scans (float inputs, d <= 3) are shared by the warp: a threshold proves that an
// object (or a whole block) loses to the warp's running second best (bid scans) or minimum (certificates), values
// the warp has already seen. A lane-local threshold (the CPU twin's) is far looser early on and would send some
// lane down the float64 path in most steps. Skipped objects are strictly worse than the warp's final second
// best, so the merged result is that of the plain scan.
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ unsigned key_up(double w) { return __float_as_uint(float_up(w)); }

// A float key >= the second smallest value held by the lanes (w1 and w2 of each; non-negative floats order like
// their bit patterns), in two dependent reductions: with one lane at the least w1 key m1, the second smallest is
// the least of that lane's w2 and the other lanes' w1; with several lanes at m1 it is m1 and the result is >= m1
// (looser, still a valid threshold).
__device__ __forceinline__ unsigned warp_second_key(const BestTwo& bt) {
  const unsigned k1 = key_up(bt.w1), m1 = __reduce_min_sync(kFullMask, k1);
  return __reduce_min_sync(kFullMask, k1 == m1 ? key_up(bt.w2) : k1);
}

// Warp-cooperative pruned scan (auction.h, "pruned scans") of person xs, best first: lane l keeps the lower
// bounds of blocks l + 32 t (t < kBoundRegs) in registers, and the warp visits the block of the smallest bound
// left, lane l taking object 32 b + l, until that bound reaches the filter threshold, which then rules out every
// block left. Visiting the nearest blocks first tightens the threshold soonest (about 5 of 128 blocks at 4,096
// uniform points). Blocks past 32 kBoundRegs (n > 8,192) are visited after, in index order, when their bounds do
// not reach the threshold. Returns each lane's partial (the caller reduces).
constexpr int kBoundRegs = 8;
constexpr unsigned kNoBlock = 0xffffffffu;  // above every bound's bits (bounds are >= 0, possibly +inf)

template <int DIM, bool kMinOnly>
__device__ __forceinline__ BestTwo warp_pruned_scan(const float (&xs)[3], const ObjectRecord* rec,
                                                    const double* price, const BlockBox* box,
                                                    const float* price_lo, int n, int p, int lane) {
  const int nblocks = (n + kBlockObjects - 1) / kBlockObjects;
  BestTwo bt = best_two_init();
  float thr = filter_threshold(HUGE_VALF);  // NaN: nothing skipped until the first values are in
  auto visit = [&](int b) {                 // warp-uniform
    const int j = b * kBlockObjects + lane;
    bool pushed = false;
    if (j < n) {
      const ObjectRecord r = rec[j];
      const float c = ground_cost<DIM, float>(xs, r.y, DIM, p);
      if (!(filter_value(c, r) >= thr)) {
        best_two_push(bt, static_cast<double>(c) + price[j], j);
        pushed = true;
      }
    }
    if (__any_sync(kFullMask, pushed))
      thr = filter_threshold(
          __uint_as_float(kMinOnly ? __reduce_min_sync(kFullMask, key_up(bt.w1)) : warp_second_key(bt)));
  };
  unsigned bound_key[kBoundRegs];  // bit patterns of the bounds (>= 0: they order like the floats)
#pragma unroll
  for (int t = 0; t < kBoundRegs; ++t) {
    const int b = lane + 32 * t;
    bound_key[t] = b < nblocks ? __float_as_uint(block_lower_bound<DIM>(xs, box[b], price_lo[b], p)) : kNoBlock;
  }
  while (true) {
    unsigned key = bound_key[0];
    int t_min = 0;
#pragma unroll
    for (int t = 1; t < kBoundRegs; ++t)
      if (bound_key[t] < key) key = bound_key[t], t_min = t;
    const unsigned key_min = __reduce_min_sync(kFullMask, key);
    if (key_min == kNoBlock || block_skippable(__uint_as_float(key_min), thr)) break;
    const int src = __ffs(__ballot_sync(kFullMask, key == key_min)) - 1;
    const int t_src = __shfl_sync(kFullMask, t_min, src);
#pragma unroll
    for (int t = 0; t < kBoundRegs; ++t)
      if (lane == src && t == t_src) bound_key[t] = kNoBlock;
    visit(src + 32 * t_src);
  }
  for (int base = 32 * kBoundRegs; base < nblocks; base += 32) {
    const int b = base + lane;
    const float lb = b < nblocks ? block_lower_bound<DIM>(xs, box[b], price_lo[b], p) : HUGE_VALF;
    for (unsigned live = __ballot_sync(kFullMask, b < nblocks && !block_skippable(lb, thr)); live != 0u;
         live &= live - 1u) {
      const int k = __ffs(live) - 1;
      if (!block_skippable(__shfl_sync(kFullMask, lb, k), thr)) visit(base + k);
    }
  }
  return bt;
}

// Greedy carving of the dynamic shared memory: arrays are taken in order of how often a round touches them and
// fall back to their global-memory copy when the rest no longer fits.
struct SmemCarver {
  unsigned char* next;
  size_t left;
  template <typename T>
  __device__ T* take(int n, T* fallback) {
    const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 15) & ~static_cast<size_t>(15);
    if (bytes > left) return fallback;
    T* ptr = reinterpret_cast<T*>(next);
    next += bytes;
    left -= bytes;
    return ptr;
  }
};

// Shared-memory bytes that hold every carved array (the host asks for this much or the opt-in maximum).
template <bool kFiltered>
size_t carved_bytes(int n) {
  auto round16 = [](size_t b) { return (b + 15) & ~static_cast<size_t>(15); };
  const size_t nn = static_cast<size_t>(n);
  const size_t nblocks = (nn + kBlockObjects - 1) / kBlockObjects;
  size_t total = kFiltered ? round16(nn * sizeof(ObjectRecord)) + round16(nblocks * sizeof(BlockBox)) +
                                 round16(nblocks * sizeof(float))
                           : 0;
  total += 2 * round16(nn * sizeof(double)) + round16(nn * sizeof(unsigned long long));  // price, bid_val, best_bits
  total += 5 * round16(nn * sizeof(int));  // owner, winner, bid_obj, cur, nxt
  return total;
}

template <int DIM, typename scalar_t>
__global__ void __launch_bounds__(kBlock) auction_kernel(const scalar_t* __restrict__ x_all /* [B, n, d] */,
                                                         const scalar_t* __restrict__ y_all /* [B, n, d] */, int n,
                                                         int d, int p, double tol, long long max_iter,
                                                         size_t smem_bytes, AuctionWork w) {
  // float inputs with d <= 3 scan object records {y_j, float(p_j)} through the float32 pre-filter (auction.h).
  constexpr bool kFiltered = std::is_same_v<scalar_t, float> && (DIM == 2 || DIM == 3);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long item = blockIdx.x, off = item * n;
  const scalar_t* x = x_all + off * d;
  const scalar_t* y = y_all + off * d;
  int* sigma = w.sigma + off;
  double* row_min = w.row_min + off;
  double* slack = w.slack + off;
  // State in shared memory, most used first: the scans read records (or y in global memory) and prices for
  // every object each round; a round's bookkeeping is a chain of dependent accesses (list -> bid -> owner ->
  // list), so latency, not bandwidth, sets its time. Whatever does not fit stays in global memory.
  extern __shared__ __align__(16) unsigned char s_dyn[];
  SmemCarver carve{s_dyn, smem_bytes};
  const int nblocks = kFiltered ? (n + kBlockObjects - 1) / kBlockObjects : 0;
  BlockBox* box = kFiltered ? carve.take(nblocks, w.box + item * nblocks) : nullptr;              // [nblocks]
  float* price_lo = kFiltered ? carve.take(nblocks, w.price_lo + item * nblocks) : nullptr;        // [nblocks]
  ObjectRecord* rec = kFiltered ? carve.take(n, w.rec + off) : nullptr;  // [n]
  double* price = carve.take(n, w.price + off);                             // [n]
  int* owner = carve.take(n, w.owner + off);                                // [n] object -> person (-1 free)
  int* cur = carve.take(n, w.list0 + off);  // [n] unassigned persons (double-buffered with nxt): every round
  int* nxt = carve.take(n, w.list1 + off);  // [n]
  // [n] highest bid of the round per object (bits of a positive double), smallest person among those bids
  unsigned long long* best_bits = carve.take(n, w.best_bits + off);
  int* winner = carve.take(n, w.winner + off);
  int* bid_obj_all = carve.take(n, w.bid_obj + off);     // [n] per bidder slot (rounds of > kWarps bidders)
  double* bid_val_all = carve.take(n, w.bid_val + off);  // [n]
  __shared__ BestTwo s_part[kWarps];
  __shared__ double s_red[kWarps];
  // Bids of rounds with 2..kWarps bidders, settled by warp 0 in registers (bid_val_all may be in global memory).
  __shared__ double s_bid_val[kWarps];
  __shared__ int s_bid_obj[kWarps];
  __shared__ int s_count, s_next;
  __shared__ long long s_chain_rounds;
  auto set_price = [&](int j, double v) {
    price[j] = v;
    if constexpr (kFiltered) rec[j].price = static_cast<float>(v);
  };
  // Pruned scans (float, d <= 3): best two (bids) or minimum (certificates, in w1) of person `me` (partial per
  // lane).
  auto pruned_scan = [&](const Person<DIM, scalar_t>& me, auto min_only) {
    const float xs[3] = {static_cast<float>(me.c[0]), static_cast<float>(me.c[1]),
                         DIM > 2 ? static_cast<float>(me.c[DIM - 1]) : 0.f};
    return warp_pruned_scan<DIM, decltype(min_only)::value>(xs, rec, price, box, price_lo, n, p, lane);
  };
  // Plain scans (other inputs): best two of person `me` over j = first + lane, first + lane + step, ...
  auto scan_best_two = [&](const Person<DIM, scalar_t>& me, int first, int step) {
    BestTwo bt = best_two_init();
    for (int j = first + lane; j < n; j += step) best_two_push(bt, me.cost_to(y, j, d, p) + price[j], j);
    return bt;
  };
  // The same for two persons in one pass over the objects (a warp each, first = 0, step = 32).
  auto scan_best_two_pair = [&](const Person<DIM, scalar_t>& pa, const Person<DIM, scalar_t>& pb, BestTwo& bta,
                                BestTwo& btb) {
    bta = best_two_init();
    btb = best_two_init();
    for (int j = lane; j < n; j += 32) {
      const double pj = price[j];
      best_two_push(bta, pa.cost_to(y, j, d, p) + pj, j);
      best_two_push(btb, pb.cost_to(y, j, d, p) + pj, j);
    }
  };
  // Bid of bidder slot k (Jacobi: against the prices at the start of the round). Rounds of more than kWarps
  // bidders settle through atomics on the objects; smaller ones in settle_small_round.
  auto place_bid = [&](int k, const BestTwo& bt, double eps_now, int count_now) {
    const int j = bid_target(bt);
    const double val = bid_price(bt, price[j], eps_now);
    if (count_now <= kWarps) {
      s_bid_obj[k] = j;
      s_bid_val[k] = val;
    } else {
      bid_obj_all[k] = j;
      bid_val_all[k] = val;
      atomicMax(&best_bits[j], static_cast<unsigned long long>(__double_as_longlong(val)));
    }
  };
  // Person i takes object j at price val; returns the person it evicts (-1: the object was free).
  auto take = [&](int i, int j, double val) {
    const int old = owner[j];
    if (old >= 0) sigma[old] = -1;
    owner[j] = i;
    sigma[i] = j;
    set_price(j, val);
    return old;
  };
  // The bid of bidder slot k (person cur[k]); a lone bidder (count == 1) takes its object.
  auto bid_or_take = [&](int k, const BestTwo& bt, double eps_now, int count_now) {
    if (count_now == 1) {
      const int j = bid_target(bt);
      const int old = take(cur[k], j, bid_price(bt, price[j], eps_now));
      if (old >= 0) nxt[0] = old;
      s_count = old >= 0 ? 1 : 0;
    } else {
      place_bid(k, bt, eps_now, count_now);
    }
  };
  // Warp 0 settles a round of 2..kWarps bids in registers (lane k: bid k): bids on one object meet in a
  // __match_any_sync group, the highest wins and ties go to the smallest person, as the atomics of larger rounds
  // decide. Losers and evicted persons make the next list. No per-object state, no block barriers.
  auto settle_small_round = [&](int count_now) {
    const bool active = lane < count_now;
    const int j = active ? s_bid_obj[lane] : -1 - lane;  // idle lanes: groups of their own
    const double v = active ? s_bid_val[lane] : 0.0;
    const int i = active ? cur[lane] : 0;
    const unsigned group = __match_any_sync(kFullMask, j);
    bool wins = active;
    if (active && __popc(group) > 1) {  // the group's lanes run this loop together
      for (unsigned m = group; m != 0u; m &= m - 1u) {
        const int src = __ffs(m) - 1;
        const double vo = __shfl_sync(group, v, src);
        const int io = __shfl_sync(group, i, src);
        if (vo > v || (vo == v && io < i)) wins = false;
      }
    }
    const int old = wins ? take(i, j, v) : -1;
    const unsigned losers = __ballot_sync(kFullMask, active && !wins);
    const unsigned evicted = __ballot_sync(kFullMask, old >= 0);
    const unsigned below = (1u << lane) - 1u;
    if (active && !wins) nxt[__popc(losers & below)] = i;
    if (old >= 0) nxt[__popc(losers) + __popc(evicted & below)] = old;
    if (lane == 0) s_count = __popc(losers) + __popc(evicted);
  };
  // Lower bound of block b's prices taken again by one warp (every lane calls it; prices >= 0).
  auto retake_price_lo = [&](int b) {
    const int j = b * kBlockObjects + lane;
    const unsigned lo = __reduce_min_sync(kFullMask, j < n ? __float_as_uint(float_down(price[j])) : 0x7f800000u);
    if (lane == 0) price_lo[b] = __uint_as_float(lo);
  };
  // Every block's bound, the warps sharing the blocks (pruned scans; between barriers, prices unchanged).
  auto refresh_price_lo = [&] {
    for (int b = warp; b < nblocks; b += kWarps) retake_price_lo(b);
  };
  auto scan_min_pair = [&](const Person<DIM, scalar_t>& pa, const Person<DIM, scalar_t>& pb, double& ma,
                           double& mb) {
    ma = kInf;
    mb = kInf;
    for (int j = lane; j < n; j += 32) {
      const double pj = price[j];
      ma = fmin(ma, pa.cost_to(y, j, d, p) + pj);
      mb = fmin(mb, pb.cost_to(y, j, d, p) + pj);
    }
  };

  for (int j = tid; j < n; j += kBlock) {
    price[j] = 0.0;
    if constexpr (kFiltered) rec[j] = make_record<DIM>(y + static_cast<long>(j) * DIM, 0.0);
    sigma[j] = -1;
    owner[j] = -1;
    best_bits[j] = 0ull;
    winner[j] = kNoIndex;
    cur[j] = j;
  }
  if constexpr (kFiltered) {  // block boxes from the records (a warp per block); price bounds start at 0
    __syncthreads();
    for (int b = warp; b < nblocks; b += kWarps) {
      const int j = b * kBlockObjects + lane;
      BlockBox bb;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        float lo = j < n ? rec[j].y[k] : HUGE_VALF, hi = j < n ? rec[j].y[k] : -HUGE_VALF;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
          lo = fminf(lo, __shfl_xor_sync(kFullMask, lo, o)), hi = fmaxf(hi, __shfl_xor_sync(kFullMask, hi, o));
        bb.lo[k] = lo, bb.hi[k] = hi;
      }
      if (lane == 0) box[b] = bb, price_lo[b] = 0.f;
    }
  }
  double rx = 0.0, ry = 0.0;
  for (int i = tid; i < n; i += kBlock) {
    rx = fmax(rx, sqrt(static_cast<double>(ground_cost<DIM, scalar_t>(x + static_cast<long>(i) * d, x, d, 2))));
    ry = fmax(ry, sqrt(static_cast<double>(ground_cost<DIM, scalar_t>(y + static_cast<long>(i) * d, x, d, 2))));
  }
  rx = block_reduce(rx, true, s_red);
  ry = block_reduce(ry, true, s_red);
  const double cmax = cost_bound(rx, ry, p);
  double eps = initial_eps(cmax, w.init_frac);
  if (tid == 0) s_count = n, s_next = 0;
  __syncthreads();
  long long rounds = 0, refreshed_at = 0;
  long long prof[kProfSlots] = {};  // thread 0's: cycles of 1-, 2..32-, >32-bidder rounds, certificates; counts
  int status = kRunning;
  double primal = 0.0, gap = 0.0;
  for (int phase = 0;; ++phase) {
    int count = s_count;
    // ---- rounds of the phase ----
    while (count > 0 && rounds < max_iter) {
      ++rounds;
      const long long t_round = w.profile != nullptr ? clock64() : 0;
      const int prev_count = count;
      long long round_rounds = 1;  // rounds this pass stands for (an eviction chain: several)
      long long t_scanned = t_round, t_bid = t_round;  // profile: after the scans, after the bids (<= 32 bidders)
      if constexpr (kFiltered) {
        // Pruned scans: a warp per bidder (a scan visits a few blocks: one warp is enough for a lone bidder, and
        // sharing it between warps measured slower, each warp then needing its own threshold).
        if (rounds - refreshed_at >= kRefreshRounds) {
          refresh_price_lo();
          __syncthreads();
          refreshed_at = rounds;
        }
        if (count == 1) {
          // A lone bidder wins outright and the person it evicts is the next round's lone bidder: warp 0 follows
          // the eviction chain to its end (a free object taken) with no block barrier between its rounds. Same
          // bids in the same order as round by round.
          if (warp == 0) {
            int i = cur[0], old = -1;
            long long chain = 0;
            do {
              Person<DIM, scalar_t> me;
              me.load(x, i, d);
              const BestTwo bt = warp_reduce_best_two(pruned_scan(me, std::false_type{}));
              const int j = __shfl_sync(kFullMask, bid_target(bt), 0);  // lane 0's, for the whole warp
              ++chain;
              if (lane == 0) old = take(i, j, bid_price(bt, price[j], eps));
              old = __shfl_sync(kFullMask, old, 0);
              __syncwarp();  // the new price is seen by the lanes: the block's price bound taken again
              retake_price_lo(j / kBlockObjects);
              __syncwarp();
              i = old;
            } while (old >= 0 && rounds - 1 + chain < max_iter);
            if (lane == 0) {
              nxt[0] = old;
              s_count = old >= 0 ? 1 : 0;
              s_chain_rounds = chain;
            }
          }
          __syncthreads();
          round_rounds = s_chain_rounds;
          rounds += round_rounds - 1;
        } else {
          for (int k = warp; k < count; k += kWarps) {
            Person<DIM, scalar_t> me;
            me.load(x, cur[k], d);
            const BestTwo bt = warp_reduce_best_two(pruned_scan(me, std::false_type{}));
            if (lane == 0) place_bid(k, bt, eps, count);
          }
          __syncthreads();
        }
        if (w.profile != nullptr) t_scanned = t_bid = clock64();
      }
      // Many bidders: a warp scans for two persons at once (one record load serves both: the scan is bound by
      // shared-memory bandwidth) and places both bids itself. Few bidders: warps share a bidder (below).
      for (int base = 0; !kFiltered && count > kWarps && base < count; base += 2 * kWarps) {
        const int k0 = base + 2 * warp, k1 = min(k0 + 1, count - 1);  // odd tail: k1 = k0, its result dropped
        if (k0 < count) {
          Person<DIM, scalar_t> pa, pb;
          pa.load(x, cur[k0], d);
          pb.load(x, cur[k1], d);
          BestTwo bta, btb;
          scan_best_two_pair(pa, pb, bta, btb);
          bta = warp_reduce_best_two(bta);
          btb = warp_reduce_best_two(btb);
          if (lane == 0) {
            place_bid(k0, bta, eps, count);
            if (k1 != k0) place_bid(k1, btb, eps, count);
          }
        }
      }
      if (!kFiltered && count > kWarps) __syncthreads();
      if (!kFiltered && count <= kWarps) {
        const int wpb = kWarps / count;  // warps per bidder: the whole block scans for a lone bidder
        const int k_local = warp / wpb, sub = warp - k_local * wpb;
        if (k_local < count) {
          Person<DIM, scalar_t> me;
          me.load(x, cur[k_local], d);
          BestTwo bt = scan_best_two(me, sub * 32, wpb * 32);
          bt = warp_reduce_best_two(bt);
          if (lane == 0) s_part[warp] = bt;
        }
        __syncthreads();
        if (w.profile != nullptr) t_scanned = clock64();
        if (warp < count) {  // warp k merges the partials of bidder k
          BestTwo bt = lane < wpb ? s_part[warp * wpb + lane] : best_two_init();
          if (wpb > 1) bt = warp_reduce_best_two(bt);
          if (lane == 0) bid_or_take(warp, bt, eps, count);
        }
        __syncthreads();
        if (w.profile != nullptr) t_bid = clock64();
      }
      if (count > 1 && count <= kWarps) {
        if (warp == 0) settle_small_round(count);
        __syncthreads();
      } else if (count > kWarps) {
        for (int k = tid; k < count; k += kBlock) {
          const int j = bid_obj_all[k];
          if (static_cast<unsigned long long>(__double_as_longlong(bid_val_all[k])) == best_bits[j])
            atomicMin(&winner[j], cur[k]);
        }
        __syncthreads();
        for (int k = tid; k < count; k += kBlock) {
          const int j = bid_obj_all[k], i = cur[k];
          if (winner[j] == i) {
            const int old = take(i, j, bid_val_all[k]);
            if (old >= 0) nxt[atomicAdd(&s_next, 1)] = old;
          } else {
            nxt[atomicAdd(&s_next, 1)] = i;
          }
        }
        __syncthreads();
        for (int k = tid; k < count; k += kBlock) {
          const int j = bid_obj_all[k];
          best_bits[j] = 0ull;
          winner[j] = kNoIndex;
        }
        if (tid == 0) s_count = s_next, s_next = 0;
        __syncthreads();
      }
      if (w.profile != nullptr && tid == 0) {
        const int kind = prev_count == 1 ? 0 : (prev_count <= kWarps ? 1 : 2);
        prof[kind] += clock64() - t_round;
        prof[4 + kind] += round_rounds;
        if (kind < 2) prof[8 + kind] += t_scanned - t_round, prof[10 + kind] += t_bid - t_scanned;
      }
      count = s_count;
      int* t = cur;
      cur = nxt;
      nxt = t;
    }
    const long long t_cert = w.profile != nullptr ? clock64() : 0;
    if (count > 0) {  // out of rounds: complete the assignment with the free objects
      if (tid == 0) {
        int j = 0;
        for (int k = 0; k < count; ++k) {
          while (owner[j] >= 0) ++j;
          owner[j] = cur[k];
          sigma[cur[k]] = j;
        }
        s_count = 0;
      }
      status = kMaxIter;
      __syncthreads();
    }
    // ---- certificate: a warp per row (pruned scans) or per two rows ----
    double loc_primal = 0.0, loc_gap = 0.0;
    auto add_row = [&](int i, double m, double ci) {  // lane 0
      const int j = sigma[i];
      const double s = fmax(0.0, ci + price[j] - m);
      row_min[i] = m;
      slack[i] = s;
      loc_primal += ci;
      loc_gap += s;
    };
    if constexpr (kFiltered) {
      refresh_price_lo();
      __syncthreads();
      for (int i = warp; i < n; i += kWarps) {
        Person<DIM, scalar_t> me;
        me.load(x, i, d);
        const double m = warp_min(pruned_scan(me, std::true_type{}).w1);
        if (lane == 0) add_row(i, m, me.cost_to(y, sigma[i], d, p));
      }
    }
    for (int i0 = 2 * warp; !kFiltered && i0 < n; i0 += 2 * kWarps) {  // plain scans: a warp per two rows
      const int i1 = min(i0 + 1, n - 1);  // odd n: the last warp repeats its row, counted once
      Person<DIM, scalar_t> pa, pb;
      pa.load(x, i0, d);
      pb.load(x, i1, d);
      double ma, mb;
      scan_min_pair(pa, pb, ma, mb);
      ma = warp_min(ma);
      mb = warp_min(mb);
      if (lane == 0) {
        for (int r = 0; r < (i1 != i0 ? 2 : 1); ++r) {
          const int i = r == 0 ? i0 : i1;
          add_row(i, r == 0 ? ma : mb, (r == 0 ? pa : pb).cost_to(y, sigma[i], d, p));
        }
      }
    }
    primal = block_reduce(loc_primal, false, s_red);
    gap = block_reduce(loc_gap, false, s_red);
    if (w.profile != nullptr) prof[3] += clock64() - t_cert, prof[7] += 1;
    if (certified(primal, gap, tol)) {
      status = kConverged;
      break;
    }
    if (status == kMaxIter) break;
    const double eps_new = next_eps(eps, primal, tol, n);
    if (!(eps_new >= eps_floor(cmax)) || phase + 1 >= kMaxPhases) {
      status = kEpsUnderflow;
      break;
    }
    eps = eps_new;
    for (int i = tid; i < n; i += kBlock) {
      if (slack[i] > eps) {
        owner[sigma[i]] = -1;
        sigma[i] = -1;
        cur[atomicAdd(&s_count, 1)] = i;
      }
    }
    __syncthreads();
  }
  if (price != w.price + off)
    for (int j = tid; j < n; j += kBlock) w.price[off + j] = price[j];
  if (tid == 0 && w.profile != nullptr)
    for (int k = 0; k < kProfSlots; ++k) w.profile[item * kProfSlots + k] = prof[k];
  if (tid == 0) {
    w.primal[item] = primal;
    w.gap[item] = gap;
    w.status[item] = status;
    w.rounds[item] = rounds;
  }
}

template <int DIM, typename scalar_t>
void launch_auction_dim(const scalar_t* xp, const scalar_t* yp, int nb, int n, int d, int p, double tol,
                        long long max_iter, const AuctionWork& w, cudaStream_t stream) {
  int device = 0, max_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  constexpr bool kFiltered = std::is_same_v<scalar_t, float> && (DIM == 2 || DIM == 3);
  const size_t static_bytes = 2048;  // s_part, s_red, small-round bids, counters (upper bound)
  const size_t avail = max_optin > static_cast<int>(static_bytes) ? max_optin - static_bytes : 0;
  const size_t bytes = std::min(avail, carved_bytes<kFiltered>(n));
  auto kernel = auction_kernel<DIM, scalar_t>;
  // Opt in to more than the default 48 KiB of dynamic shared memory (static bytes count against it too).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  kernel<<<nb, kBlock, bytes, stream>>>(xp, yp, n, d, p, tol, max_iter, bytes, w);
  FA_CUDA_CHECK_LAUNCH();
}

template <typename scalar_t>
void launch_auction(const at::Tensor& x, const at::Tensor& y, int p, double tol, long long max_iter,
                    const AuctionWork& w, cudaStream_t stream) {
  const int nb = static_cast<int>(x.size(0)), n = static_cast<int>(x.size(1)), d = static_cast<int>(x.size(2));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  switch (d) {
    case 2: launch_auction_dim<2, scalar_t>(xp, yp, nb, n, d, p, tol, max_iter, w, stream); break;
    case 3: launch_auction_dim<3, scalar_t>(xp, yp, nb, n, d, p, tol, max_iter, w, stream); break;
    default: launch_auction_dim<0, scalar_t>(xp, yp, nb, n, d, p, tol, max_iter, w, stream); break;
  }
}

}  // namespace

EmdOutputs emd_forward_cuda(const at::Tensor& x_in, const at::Tensor& y_in, const c10::optional<at::Tensor>& a_in,
                            const c10::optional<at::Tensor>& b_in, int64_t p, double tol, int64_t max_iter) {
  const char* op = "flashavatar::emd_forward";
  check_emd_args(op, x_in, y_in, a_in, b_in, p, tol, max_iter);
  const int64_t nb = x_in.size(0), n = x_in.size(1), m = y_in.size(1), k = n + m - 1;
  const bool assignment = !a_in.has_value() && n == m;
  if (!assignment) {
    // Transportation solver on the host (documented): copy, solve, copy back.
    c10::optional<at::Tensor> a_cpu, b_cpu;
    if (a_in.has_value()) a_cpu = a_in->cpu(), b_cpu = b_in->cpu();
    EmdOutputs r = emd_forward_cpu(x_in.cpu(), y_in.cpu(), a_cpu, b_cpu, p, tol, max_iter);
    const auto dev = x_in.device();
    return {std::get<0>(r).to(dev), std::get<1>(r).to(dev), std::get<2>(r).to(dev), std::get<3>(r).to(dev),
            std::get<4>(r).to(dev), std::get<5>(r).to(dev), std::get<6>(r).to(dev), std::get<7>(r).to(dev)};
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // the assignment solver works on the objects in kd order (emd.h; restored at the end)
  const at::Tensor order = kd_leaf_order(y_in, kBlockObjects);
  const at::Tensor y = y_in.gather(1, order.unsqueeze(-1).expand({nb, n, x.size(2)})).contiguous();
  const auto f64 = x.options().dtype(at::kDouble), i32 = x.options().dtype(at::kInt);
  at::Tensor price = at::empty({nb, n}, f64), sigma = at::empty({nb, n}, i32), owner = at::empty({nb, n}, i32),
             best_bits = at::empty({nb, n}, x.options().dtype(at::kLong)), winner = at::empty({nb, n}, i32),
             list0 = at::empty({nb, n}, i32), list1 = at::empty({nb, n}, i32), bid_obj = at::empty({nb, n}, i32),
             bid_val = at::empty({nb, n}, f64), row_min = at::empty({nb, n}, f64), slack = at::empty({nb, n}, f64),
             primal = at::empty({nb}, f64), gap = at::empty({nb}, f64), status = at::empty({nb}, i32),
             rounds = at::empty({nb}, x.options().dtype(at::kLong));
  // 16-byte records (float inputs with d <= 3), 16-byte aligned: offsets are multiples of 16 bytes.
  const bool filtered = x.scalar_type() == at::kFloat && (x.size(2) == 2 || x.size(2) == 3);
  const int64_t nblocks = filtered ? (n + kBlockObjects - 1) / kBlockObjects : 0;
  at::Tensor rec = at::empty({filtered ? nb * n * static_cast<int64_t>(sizeof(ObjectRecord)) : 0},
                             x.options().dtype(at::kByte));
  at::Tensor box = at::empty({nb * nblocks * static_cast<int64_t>(sizeof(BlockBox))}, x.options().dtype(at::kByte));
  at::Tensor price_lo = at::empty({nb * nblocks}, x.options().dtype(at::kFloat));
  AuctionWork w;
  w.rec = filtered ? reinterpret_cast<ObjectRecord*>(rec.data_ptr<uint8_t>()) : nullptr;
  w.box = filtered ? reinterpret_cast<BlockBox*>(box.data_ptr<uint8_t>()) : nullptr;
  w.price_lo = filtered ? price_lo.data_ptr<float>() : nullptr;
  w.price = price.data_ptr<double>();
  w.sigma = sigma.data_ptr<int>();
  w.owner = owner.data_ptr<int>();
  w.best_bits = reinterpret_cast<unsigned long long*>(best_bits.data_ptr<int64_t>());
  w.winner = winner.data_ptr<int>();
  w.list0 = list0.data_ptr<int>();
  w.list1 = list1.data_ptr<int>();
  w.bid_obj = bid_obj.data_ptr<int>();
  w.bid_val = bid_val.data_ptr<double>();
  w.row_min = row_min.data_ptr<double>();
  w.slack = slack.data_ptr<double>();
  w.primal = primal.data_ptr<double>();
  w.gap = gap.data_ptr<double>();
  w.status = status.data_ptr<int>();
  w.rounds = reinterpret_cast<long long*>(rounds.data_ptr<int64_t>());
  w.init_frac = initial_eps_fraction();
  // Diagnostic (FLASHAVATAR_EMD_PROFILE=1): per item, where the kernel's cycles went, printed to stderr.
  static const bool profile_on = [] {
    const char* v = std::getenv("FLASHAVATAR_EMD_PROFILE");
    return v != nullptr && std::string(v) == "1";
  }();
  at::Tensor profile = profile_on ? at::zeros({nb, kProfSlots}, x.options().dtype(at::kLong)) : at::Tensor();
  w.profile = profile_on ? reinterpret_cast<long long*>(profile.data_ptr<int64_t>()) : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emd_forward_cuda", [&] {
    launch_auction<scalar_t>(x, y, static_cast<int>(p), tol, static_cast<long long>(max_iter), w, stream);
  });
  if (profile_on) {
    const at::Tensor prof = profile.cpu();  // synchronises
    const int64_t* v = prof.data_ptr<int64_t>();
    for (int64_t i = 0; i < nb; ++i, v += kProfSlots)
      std::fprintf(stderr,
                   "emd profile item %lld n %lld: Mcycles (rounds) 1 bidder %.3f (%lld), 2-32 %.3f (%lld), >32 %.3f "
                   "(%lld), certificates %.3f (%lld); scans+reduce of 1 / 2-32 %.3f / %.3f, merge+bid %.3f / %.3f\n",
                   static_cast<long long>(i), static_cast<long long>(n), v[0] * 1e-6, static_cast<long long>(v[4]),
                   v[1] * 1e-6, static_cast<long long>(v[5]), v[2] * 1e-6, static_cast<long long>(v[6]),
                   v[3] * 1e-6, static_cast<long long>(v[7]), v[8] * 1e-6, v[9] * 1e-6, v[10] * 1e-6, v[11] * 1e-6);
  }
  // Plan, duals and cost from the assignment: stream-ordered tensor ops, no synchronisation.
  at::Tensor plan_index = at::zeros({nb, k, 2}, x.options().dtype(at::kLong));
  at::Tensor plan_weight = at::zeros({nb, k}, f64);
  plan_index.narrow(1, 0, n).select(2, 0).copy_(at::arange(n, plan_index.options()).unsqueeze(0).expand({nb, n}));
  plan_index.narrow(1, 0, n).select(2, 1).copy_(sigma);
  plan_weight.narrow(1, 0, n).fill_(1.0 / static_cast<double>(n));
  const double inv_n = 1.0 / static_cast<double>(n);
  at::Tensor g = -price;
  restore_object_order(order, plan_index, g);
  return {primal * inv_n, plan_index, plan_weight, row_min, g, status, gap * inv_n, rounds};
}

}  // namespace flashavatar
