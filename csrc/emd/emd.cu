// CUDA kernel of emd for the assignment case (N = M, uniform weights): the epsilon-scaling Jacobi auction of
// auction.h, one thread block per batch item running every phase and round in one launch (no host round trips,
// no host-device synchronisation). General weights / N != M are solved by the CPU transportation solver on a
// copy (see emd.h).
//
// A round inside the block: the unassigned persons are split over the 32 warps (a warp per person, or several
// warps per person when few are left, so the tail of a phase still uses the whole block); each warp scans all
// objects for (best, second best) and reduces with shuffles; bids go to objects with a 64-bit atomicMax on the
// bit pattern of the (positive) double bid, ties to the smaller person with atomicMin; the winners take the
// objects and the evicted persons form the next round's list. A round with a single bidder (most rounds at the
// end of a phase: chains of evictions) skips the auction bookkeeping. Prices, bids, owners and the bidder lists
// live in shared memory when they fit (see the tiers in auction_kernel).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "emd/auction.h"
#include "emd/emd.h"

namespace flashavatar {
namespace {

using namespace ot;

constexpr int kBlock = 1024;
constexpr int kWarps = kBlock / 32;

// Device workspace, each array [B, n] (or [B]) in global memory.
struct AuctionWork {
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

template <int DIM, typename scalar_t>
__global__ void __launch_bounds__(kBlock) auction_kernel(const scalar_t* __restrict__ x_all /* [B, n, d] */,
                                                         const scalar_t* __restrict__ y_all /* [B, n, d] */, int n,
                                                         int d, int p, double tol, long long max_iter,
                                                         int smem_tier, AuctionWork w) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long item = blockIdx.x, off = item * n;
  const scalar_t* x = x_all + off * d;
  const scalar_t* y = y_all + off * d;
  int* sigma = w.sigma + off;
  double* row_min = w.row_min + off;
  double* slack = w.slack + off;
  // State touched every round lives in shared memory when it fits: a round is a chain of dependent accesses
  // (list -> bid -> owner -> list), so global-memory latency, not arithmetic, sets its time.
  //   tier 2: everything (44 bytes per object, N up to ~5k on Hopper); tier 1: per-object state only (24 bytes,
  //   N up to ~9.6k); tier 0: all in global memory.
  extern __shared__ __align__(16) unsigned char s_dyn[];
  double* price;                  // [n]
  unsigned long long* best_bits;  // [n] highest bid of the round per object (bits of a positive double)
  int* winner;                    // [n] smallest person index among the highest bids
  int* owner;                     // [n] object -> person (-1 free)
  double* bid_val;                // [n] per bidder slot
  int* bid_obj;                   // [n] per bidder slot
  int* cur;                       // [n] unassigned persons (double-buffered with nxt)
  int* nxt;                       // [n]
  if (smem_tier >= 1) {
    price = reinterpret_cast<double*>(s_dyn);
    best_bits = reinterpret_cast<unsigned long long*>(price + n);
    double* after = reinterpret_cast<double*>(best_bits + n);
    if (smem_tier >= 2) {
      bid_val = after;
      after += n;
    } else {
      bid_val = w.bid_val + off;
    }
    winner = reinterpret_cast<int*>(after);
    owner = winner + n;
    if (smem_tier >= 2) {
      bid_obj = owner + n;
      cur = bid_obj + n;
      nxt = cur + n;
    } else {
      bid_obj = w.bid_obj + off;
      cur = w.list0 + off;
      nxt = w.list1 + off;
    }
  } else {
    price = w.price + off;
    best_bits = w.best_bits + off;
    winner = w.winner + off;
    owner = w.owner + off;
    bid_val = w.bid_val + off;
    bid_obj = w.bid_obj + off;
    cur = w.list0 + off;
    nxt = w.list1 + off;
  }

  __shared__ BestTwo s_part[kWarps];
  __shared__ double s_red[kWarps];
  __shared__ int s_count, s_next;

  for (int j = tid; j < n; j += kBlock) {
    price[j] = 0.0;
    sigma[j] = -1;
    owner[j] = -1;
    best_bits[j] = 0ull;
    winner[j] = kNoIndex;
    cur[j] = j;
  }
  double rx = 0.0, ry = 0.0;
  for (int i = tid; i < n; i += kBlock) {
    rx = fmax(rx, sqrt(static_cast<double>(ground_cost<DIM, scalar_t>(x + static_cast<long>(i) * d, x, d, 2))));
    ry = fmax(ry, sqrt(static_cast<double>(ground_cost<DIM, scalar_t>(y + static_cast<long>(i) * d, x, d, 2))));
  }
  rx = block_reduce(rx, true, s_red);
  ry = block_reduce(ry, true, s_red);
  const double cmax = cost_bound(rx, ry, p);
  double eps = initial_eps(cmax);
  if (tid == 0) s_count = n, s_next = 0;
  __syncthreads();
  long long rounds = 0;
  int status = kRunning;
  double primal = 0.0, gap = 0.0;
  for (int phase = 0;; ++phase) {
    int count = s_count;
    // ---- rounds of the phase ----
    while (count > 0 && rounds < max_iter) {
      ++rounds;
      for (int base = 0; base < count; base += kWarps) {
        const int nb = min(kWarps, count - base);
        const int wpb = kWarps / nb;  // warps per bidder: the whole block scans for a lone bidder
        const int k_local = warp / wpb, sub = warp - k_local * wpb;
        if (k_local < nb) {
          Person<DIM, scalar_t> me;
          me.load(x, cur[base + k_local], d);
          BestTwo bt = best_two_init();
          for (int j = sub * 32 + lane; j < n; j += wpb * 32) best_two_push(bt, me.cost_to(y, j, d, p) + price[j], j);
          bt = warp_reduce_best_two(bt);
          if (lane == 0) s_part[warp] = bt;
        }
        __syncthreads();
        if (warp < nb) {  // warp k merges the partials of bidder k
          BestTwo bt = lane < wpb ? s_part[warp * wpb + lane] : best_two_init();
          if (wpb > 1) bt = warp_reduce_best_two(bt);
          if (lane == 0) {
            const int j = bid_target(bt), i = cur[base + warp];
            const double val = bid_price(bt, price[j], eps);
            if (count == 1) {  // a lone bidder wins outright: no auction bookkeeping needed
              const int old = owner[j];
              if (old >= 0) sigma[old] = -1, nxt[0] = old;
              owner[j] = i;
              sigma[i] = j;
              price[j] = val;
              s_count = old >= 0 ? 1 : 0;
            } else {
              bid_obj[base + warp] = j;
              bid_val[base + warp] = val;
              atomicMax(&best_bits[j], static_cast<unsigned long long>(__double_as_longlong(val)));
            }
          }
        }
        __syncthreads();
      }
      if (count > 1) {
        for (int k = tid; k < count; k += kBlock) {
          const int j = bid_obj[k];
          if (static_cast<unsigned long long>(__double_as_longlong(bid_val[k])) == best_bits[j])
            atomicMin(&winner[j], cur[k]);
        }
        __syncthreads();
        for (int k = tid; k < count; k += kBlock) {
          const int j = bid_obj[k], i = cur[k];
          if (winner[j] == i) {
            const int old = owner[j];
            if (old >= 0) {
              sigma[old] = -1;
              nxt[atomicAdd(&s_next, 1)] = old;
            }
            owner[j] = i;
            sigma[i] = j;
            price[j] = bid_val[k];
          } else {
            nxt[atomicAdd(&s_next, 1)] = i;
          }
        }
        __syncthreads();
        for (int k = tid; k < count; k += kBlock) {
          const int j = bid_obj[k];
          best_bits[j] = 0ull;
          winner[j] = kNoIndex;
        }
        if (tid == 0) s_count = s_next, s_next = 0;
        __syncthreads();
      }
      count = s_count;
      int* t = cur;
      cur = nxt;
      nxt = t;
    }
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
    // ---- certificate: a warp per row ----
    double loc_primal = 0.0, loc_gap = 0.0;
    for (int i = warp; i < n; i += kWarps) {
      Person<DIM, scalar_t> me;
      me.load(x, i, d);
      double m = kInf;
      for (int j = lane; j < n; j += 32) m = fmin(m, me.cost_to(y, j, d, p) + price[j]);
      m = warp_min(m);
      if (lane == 0) {
        const int j = sigma[i];
        const double ci = me.cost_to(y, j, d, p);
        const double s = fmax(0.0, ci + price[j] - m);
        row_min[i] = m;
        slack[i] = s;
        loc_primal += ci;
        loc_gap += s;
      }
    }
    primal = block_reduce(loc_primal, false, s_red);
    gap = block_reduce(loc_gap, false, s_red);
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
  if (smem_tier >= 1)
    for (int j = tid; j < n; j += kBlock) w.price[off + j] = price[j];
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
  const size_t tier1 = 2 * sizeof(double) + 2 * sizeof(int);  // price, best_bits, winner, owner
  const size_t tier2 = tier1 + sizeof(double) + 3 * sizeof(int);  // + bid_val, bid_obj, two lists
  const size_t static_bytes = 2048;                               // s_part, s_red, counters (upper bound)
  const size_t avail = max_optin > static_cast<int>(static_bytes) ? max_optin - static_bytes : 0;
  const size_t nn = static_cast<size_t>(n);
  const int tier = tier2 * nn <= avail ? 2 : (tier1 * nn <= avail ? 1 : 0);
  const size_t bytes = tier == 2 ? tier2 * nn : (tier == 1 ? tier1 * nn : 0);
  auto kernel = auction_kernel<DIM, scalar_t>;
  // Opt in to more than the default 48 KiB of dynamic shared memory (static bytes count against it too).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  kernel<<<nb, kBlock, bytes, stream>>>(xp, yp, n, d, p, tol, max_iter, tier, w);
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
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const auto f64 = x.options().dtype(at::kDouble), i32 = x.options().dtype(at::kInt);
  at::Tensor price = at::empty({nb, n}, f64), sigma = at::empty({nb, n}, i32), owner = at::empty({nb, n}, i32),
             best_bits = at::empty({nb, n}, x.options().dtype(at::kLong)), winner = at::empty({nb, n}, i32),
             list0 = at::empty({nb, n}, i32), list1 = at::empty({nb, n}, i32), bid_obj = at::empty({nb, n}, i32),
             bid_val = at::empty({nb, n}, f64), row_min = at::empty({nb, n}, f64), slack = at::empty({nb, n}, f64),
             primal = at::empty({nb}, f64), gap = at::empty({nb}, f64), status = at::empty({nb}, i32),
             rounds = at::empty({nb}, x.options().dtype(at::kLong));
  AuctionWork w;
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emd_forward_cuda", [&] {
    launch_auction<scalar_t>(x, y, static_cast<int>(p), tol, static_cast<long long>(max_iter), w, stream);
  });
  // Plan, duals and cost from the assignment: stream-ordered tensor ops, no synchronisation.
  at::Tensor plan_index = at::zeros({nb, k, 2}, x.options().dtype(at::kLong));
  at::Tensor plan_weight = at::zeros({nb, k}, f64);
  plan_index.narrow(1, 0, n).select(2, 0).copy_(at::arange(n, plan_index.options()).unsqueeze(0).expand({nb, n}));
  plan_index.narrow(1, 0, n).select(2, 1).copy_(sigma);
  plan_weight.narrow(1, 0, n).fill_(1.0 / static_cast<double>(n));
  const double inv_n = 1.0 / static_cast<double>(n);
  return {primal * inv_n, plan_index, plan_weight, row_min, -price, status, gap * inv_n, rounds};
}

}  // namespace flashavatar
