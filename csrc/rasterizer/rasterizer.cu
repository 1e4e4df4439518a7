// CUDA rasteriser. Pipeline for B*C images in one launch sequence, with no host-device synchronisation:
//
//   project      one thread per (image, Gaussian): EWA projection, SH colour, opacity-aware pixel bounds,
//                the number of 16x16 tiles touched (tested by the whole warp, load-balanced over its lanes'
//                tile rects: warp_visit_hit_tiles), and a (image, depth) sort key
//   depth sort   cub radix sort of those keys -> every image's Gaussians front to back (static size B*C*N)
//   scan         tile counts in depth order (read through the sorted ids) -> inclusive offsets (static size)
//   emit         each Gaussian writes (image*tiles + tile) keys, in depth order, into a buffer of fixed
//                `capacity` (the same warp-wide tile visit); writes past it are dropped. The rest of the buffer
//                is padded with a sentinel.
//   tile sort    cub radix sort on the tile key only. It is stable, so entries of one tile stay in depth
//                order: the sort needs log2(images*tiles) bits instead of the peers' 64-bit tile|depth keys.
//   ranges       start/end of every tile in the sorted list
//   render       one 16x16 block per tile, Gaussians staged in shared memory in batches of 256, early exit
//                once every pixel of the tile is saturated; with few images, long lists split over several
//                blocks per tile (below).
//
// Overflow: the total number of intersections is known only on the device. An image whose intersections
// did not all fit (its last offset > capacity) is rendered by the same kernels from its depth-sorted Gaussian
// list instead (static size N; every Gaussian tested per pixel, exactly as a dense evaluation), so the image
// is right whatever the capacity. The Python wrapper reads the need back asynchronously and grows the
// capacity for later calls. Everything is capturable in a CUDA graph.
//
// Chunk state (few images: images * tiles <= 4096, where one block per tile leaves most SMs idle): at every
// 256-entry boundary b of a tile's list, each pixel's T and depth/colour sums before entry b, in slot
// (start + b) / 256 (unique: see chunk_state_numel), and each pixel's final sums. Boundaries at or past a pixel's
// stop are never read, so they need not be written.
//
// Forward split (default where the chunk state is kept and D <= 32; FLASHAVATAR_RAST_FWD=single turns it off).
// H200, untrained uv-128 avatar at batch 1: rasteriser 0.258 -> 0.197 ms. (It was opt-in for a while: gpu-preset
// training crashed with it twice, after a graph recapture. emit_kernel could then leave stale slots in the
// sorted range when its tile test disagreed with project_kernel's count; since it fills exactly the counted
// slots, the same training runs clean.) The critical path of one block per tile is the longest list; instead:
//   part pass     up to 16 blocks per tile (as many as the backward uses), block k blending part k of the list
//                 (whole 256-entry chunks, spread evenly) from T = 1, a pixel stopping where its local T would
//                 reach 1e-4 (the whole-list T, that times the front parts' T <= 1, would too). Its local state at
//                 each boundary inside the part and at the part's end (frozen where it stopped) goes to the chunk
//                 state (the last part's end: the final-sums region, T in its otherwise unused field 0), plus a
//                 part_info word (local last, stopped) per pixel and boundary. Tiles of one part are done here.
//   combine       one block per split tile, the parts in order with each pixel's running state g. g.T == 1
//                 (nothing blended in front): the part's records already are the whole-list ones, same arithmetic.
//                 Else each boundary record is rewritten in whole-list form (T = g.T T_local, sums = g +
//                 g.T local) while the stop provably lies beyond it (raster::may_stop_before, 1e-3 relative
//                 margin); from the first boundary where it may not, the part is re-walked entry by entry
//                 (block-cooperative through shared memory, storing the boundaries crossed) to the stop or the
//                 part's end. Short of float rounding the outputs, last_ids, transmittance and chunk state are the
//                 single kernel's: products and sums are associated differently (~1e-7 relative), so a pixel whose
//                 stop test lands within ~3e-4 relative of 1e-4 can stop one contributor earlier or later.
// The blend loop of the split kernels computes 4 alphas ahead of the serial T updates (blend_batch).
//
// Backward: the same traversal in reverse from each pixel's last contributor; per-Gaussian gradients are
// summed over the warp with shuffles before one atomicAdd per warp; with the chunk state, long lists split over
// up to 16 blocks per tile, each starting from the state kept at its chunk's end boundary.
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>
#include <type_traits>

#include <cub/cub.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include "common/checks.h"
#include "rasterizer/raster_math.h"
#include "rasterizer/rasterizer.h"

namespace flashavatar {
namespace {

using raster::Intrinsics;
using raster::kTileSize;
using raster::Projected;
using raster::Sym2;

constexpr int kBlock = kTileSize * kTileSize;  // 256 threads = one tile

struct Params {
  int B, C, N, K, D, W, H, tiles_x, tiles_y, sh_degree;
  float near_plane, far_plane, eps2d;
  int capacity;
  int64_t colors_bstride;  // elements from one set's colours to the next: N K D, or 0 (one set shared by all)
};

struct AtomicAdd {
  static __device__ __forceinline__ void add(float* p, float v) { atomicAdd(p, v); }
};

__device__ __forceinline__ Intrinsics<float> intrinsics_of(const float* K, const Params& p) {
  return Intrinsics<float>{K[0], K[4], K[2], K[5], p.W, p.H};
}

int bits_for(uint64_t n) {  // bits needed to represent n
  int b = 0;
  while (n) {
    ++b;
    n >>= 1;
  }
  return b;
}

// ------------------------------------------------------------------------------------------------------
constexpr unsigned kFullWarp = 0xffffffffu;
// Threads per block of the per-Gaussian kernels (project, emit): 128 rather than 256 spreads one image's ~15k
// Gaussians over ~110 SMs instead of ~57 (these kernels are latency bound at batch 1).
constexpr int kPerGaussianBlock = 128;

// The tiles each lane's Gaussian hits, visited by the whole warp: the warp's (Gaussian, tile) pairs (every lane's
// tile rect, `area` tiles) are numbered through an exclusive prefix sum and lane l tests pairs l, l + 32, ...,
// so one large Gaussian does not keep its warp's other 31 lanes waiting (trained avatars: a few Gaussians span
// tens of tiles, and the one-thread-per-Gaussian loops took 40 us each of a 0.27 ms frame on the H200).
// visit(owner, tx, ty) runs on the lane that tested the pair, for every tile the owner lane's Gaussian hits, in no
// particular order. Every lane of the warp must call this (lanes without a Gaussian with area 0); warp-uniform
// control flow throughout.
template <typename Visit>
__device__ __forceinline__ void warp_visit_hit_tiles(const Params& p, int4 rect, int area, float mx, float my,
                                                     Sym2<float> conic, float threshold, Visit visit) {
  const int lane = threadIdx.x & 31;
  int incl = area;  // inclusive prefix of the areas over the warp's lanes
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(kFullWarp, incl, off);
    if (lane >= off) incl += v;
  }
  const int total = __shfl_sync(kFullWarp, incl, 31);
  const int width = rect.z - rect.x + 1;
  for (int base = 0; base < total; base += 32) {
    const int t = base + lane;
    int owner = 0;  // the first lane whose inclusive prefix exceeds t (binary search over the lanes)
#pragma unroll
    for (int step = 16; step > 0; step >>= 1)
      if (__shfl_sync(kFullWarp, incl, owner + step - 1) <= t) owner += step;
    const int first = __shfl_sync(kFullWarp, incl - area, owner);
    const int ox = __shfl_sync(kFullWarp, rect.x, owner), oy = __shfl_sync(kFullWarp, rect.y, owner);
    const int ow = __shfl_sync(kFullWarp, width, owner);
    const float gx = __shfl_sync(kFullWarp, mx, owner), gy = __shfl_sync(kFullWarp, my, owner);
    const Sym2<float> gc{__shfl_sync(kFullWarp, conic.a, owner), __shfl_sync(kFullWarp, conic.b, owner),
                         __shfl_sync(kFullWarp, conic.c, owner)};
    const float gt = __shfl_sync(kFullWarp, threshold, owner);
    if (t < total) {
      const int local = t - first;
      const int ty = oy + local / ow, tx = ox + local % ow;
      if (raster::gaussian_hits_tile_t(gx, gy, gc, gt, tx, ty, kTileSize, p.W, p.H)) visit(owner, tx, ty);
    }
  }
}

// ------------------------------------------------------------------------------------------------------
__global__ void project_kernel(Params p, const float* __restrict__ means,  // [B, N, 3]
                               const float* __restrict__ quats,            // [B, N, 4]
                               const float* __restrict__ scales,           // [B, N, 3]
                               const float* __restrict__ opac,             // [B, N]
                               const float* __restrict__ colors,           // [B, N, K, D] (batch stride
                                                                           // p.colors_bstride)
                               const float* __restrict__ viewmats,         // [B*C, 16]
                               const float* __restrict__ Ks,               // [B*C, 9]
                               int32_t* __restrict__ radii,                // [B*C*N]
                               float2* __restrict__ means2d,               // [B*C*N]
                               float* __restrict__ conics,                 // [B*C*N, 3]
                               float* __restrict__ colors_eval,            // [B*C*N, D]
                               float* __restrict__ depths,                 // [B*C*N]
                               int4* __restrict__ tile_rect,               // [B*C*N] tile x0, y0, x1, y1
                               int32_t* __restrict__ tile_counts,          // [B*C*N]
                               uint64_t* __restrict__ depth_keys,          // [B*C*N]
                               int32_t* __restrict__ depth_vals) {         // [B*C*N]
  // Launched with kPerGaussianBlock threads: every lane reaches the warp-wide tile count (no early return before).
  __shared__ int s_count[kPerGaussianBlock];  // hits per lane's Gaussian
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = int64_t(p.B) * p.C * p.N;
  const bool in_range = idx < total;
  const int img = in_range ? int(idx / p.N) : 0, n = in_range ? int(idx % p.N) : 0, b = img / p.C;
  const int64_t g = int64_t(b) * p.N + n;
  const float* vm = viewmats + int64_t(img) * 16;
  Projected<float> pr;
  bool ok = false;
  if (in_range) {
    const Intrinsics<float> k = intrinsics_of(Ks + int64_t(img) * 9, p);
    ok = raster::project_gaussian(means + 3 * g, quats + 4 * g, scales + 3 * g, opac[g], vm, k, p.near_plane,
                                  p.far_plane, p.eps2d, pr);
    depth_vals[idx] = n;
  }
  // Exact ellipse-tile test: only tiles where alpha can reach 1/255 somewhere (fewer entries to sort and
  // blend than the bounding box; the image is the same). Counted by the whole warp.
  int4 r = make_int4(0, 0, 0, 0);
  float threshold = 0.f;
  if (ok) {
    r = make_int4(pr.rect.x0 / kTileSize, pr.rect.y0 / kTileSize, pr.rect.x1 / kTileSize, pr.rect.y1 / kTileSize);
    threshold = raster::hit_threshold(opac[g]);
  }
  s_count[threadIdx.x] = 0;
  __syncwarp();
  const int warp_base = threadIdx.x & ~31;
  warp_visit_hit_tiles(p, r, ok ? (r.z - r.x + 1) * (r.w - r.y + 1) : 0, ok ? pr.mx : 0.f, ok ? pr.my : 0.f,
                       ok ? pr.conic : Sym2<float>{0.f, 0.f, 0.f}, threshold,
                       [&](int owner, int, int) { atomicAdd(&s_count[warp_base + owner], 1); });
  __syncwarp();
  if (!in_range) return;
  if (!ok) {
    radii[idx] = 0;
    tile_counts[idx] = 0;
    means2d[idx] = make_float2(0.f, 0.f);
    conics[3 * idx] = conics[3 * idx + 1] = conics[3 * idx + 2] = 0.f;
    depths[idx] = 0.f;
    for (int c = 0; c < p.D; ++c) colors_eval[idx * p.D + c] = 0.f;
    depth_keys[idx] = (uint64_t(img) << 32) | 0xFFFFFFFFull;  // culled: last in its image
    return;
  }
  radii[idx] = pr.radius;
  means2d[idx] = make_float2(pr.mx, pr.my);
  conics[3 * idx] = pr.conic.a;
  conics[3 * idx + 1] = pr.conic.b;
  conics[3 * idx + 2] = pr.conic.c;
  depths[idx] = pr.depth;
  tile_rect[idx] = r;
  tile_counts[idx] = s_count[threadIdx.x];
  // depth >= near > 0, so the float's bits order like the float.
  depth_keys[idx] = (uint64_t(img) << 32) | uint64_t(__float_as_uint(pr.depth));
  float* out = colors_eval + idx * p.D;
  const float* cin = colors + b * p.colors_bstride + int64_t(n) * p.K * p.D;
  if (p.sh_degree >= 0) {
    const Vec3<float> cam = raster::camera_center(vm);
    const Vec3<float> dir{means[3 * g] - cam.x, means[3 * g + 1] - cam.y, means[3 * g + 2] - cam.z};
    raster::sh_colors(p.sh_degree, dir, cin, p.D, out);
  } else {
    for (int c = 0; c < p.D; ++c) out[c] = cin[c];
  }
}

// Tile count of the Gaussian in slot s of the depth-sorted list: read by the offsets scan through a transform
// iterator (no gathered copy, one launch fewer).
struct SortedTileCount {
  const int32_t* sorted_ids;   // [B*C*N]
  const int32_t* tile_counts;  // [B*C*N]
  int N;
  __host__ __device__ int32_t operator()(int64_t s) const { return tile_counts[(s / N) * N + sorted_ids[s]]; }
};

__global__ void emit_kernel(Params p, int64_t total, const int32_t* __restrict__ sorted_ids,
                            const int32_t* __restrict__ offsets,  // inclusive, depth order
                            const int32_t* __restrict__ tile_counts, const int4* __restrict__ tile_rect,
                            const float2* __restrict__ means2d, const float* __restrict__ conics,
                            const float* __restrict__ opac, uint32_t sentinel, uint32_t* __restrict__ keys,
                            int32_t* __restrict__ vals) {
  // Launched with kPerGaussianBlock threads: every lane reaches the warp-wide tile visit (no early return before).
  __shared__ int s_start[kPerGaussianBlock], s_slots[kPerGaussianBlock], s_used[kPerGaussianBlock];
  __shared__ int s_flat[kPerGaussianBlock];  // per lane's Gaussian: first slot, slot count, slots used, flat id
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int img = s < total ? int(s / p.N) : 0;
  const int64_t flat = s < total ? int64_t(img) * p.N + sorted_ids[s] : 0;
  const int cnt = s < total ? tile_counts[flat] : 0;
  // Exactly the slots [offsets[s] - cnt, offsets[s]) the scan gave this Gaussian (within the capacity; an image
  // past it is rendered by the fallback path): the tile test is re-evaluated here in another kernel, so should it
  // ever disagree with project_kernel's count, extra hits are dropped and missing ones padded with the sentinel
  // (sorted past every tile, never read) rather than leaving stale keys and ids in the sorted range. Within its
  // slots a Gaussian's tiles land in any order: the stable tile sort never compares two entries of one Gaussian
  // (they lie in different tiles), so the sorted lists are the same.
  const int start = cnt > 0 ? offsets[s] - cnt : 0;
  const bool active = cnt > 0 && start < p.capacity;
  const int slots = active ? min(offsets[s], p.capacity) - start : 0;
  int4 r = make_int4(0, 0, 0, 0);
  float2 m = make_float2(0.f, 0.f);
  Sym2<float> conic{0.f, 0.f, 0.f};
  float threshold = 0.f;
  if (active) {
    r = tile_rect[flat];
    m = means2d[flat];
    conic = Sym2<float>{conics[3 * flat], conics[3 * flat + 1], conics[3 * flat + 2]};
    threshold = raster::hit_threshold(opac[int64_t(img / p.C) * p.N + sorted_ids[s]]);
  }
  s_start[threadIdx.x] = start;
  s_slots[threadIdx.x] = slots;
  s_used[threadIdx.x] = 0;
  s_flat[threadIdx.x] = int32_t(flat);
  __syncwarp();
  const int warp_base = threadIdx.x & ~31;
  const uint32_t tiles = uint32_t(p.tiles_x * p.tiles_y);
  warp_visit_hit_tiles(p, r, active ? (r.z - r.x + 1) * (r.w - r.y + 1) : 0, m.x, m.y, conic, threshold,
                       [&](int owner, int tx, int ty) {
                         const int o = warp_base + owner;
                         const int k = atomicAdd(&s_used[o], 1);
                         if (k >= s_slots[o]) return;
                         const int pos = s_start[o] + k;
                         const int flat_o = s_flat[o];
                         keys[pos] = uint32_t(flat_o / p.N) * tiles + uint32_t(ty * p.tiles_x + tx);
                         vals[pos] = flat_o;
                       });
  __syncwarp();
  for (int pos = start + min(s_used[threadIdx.x], slots); pos < start + slots; ++pos) {
    keys[pos] = sentinel;
    vals[pos] = -1;
  }
}

// Pads the unused tail of the key buffer with the sentinel and zero-fills the tile ranges (one launch for both).
__global__ void pad_kernel(int capacity, const int32_t* __restrict__ offsets, int64_t total, uint32_t sentinel,
                           uint32_t* __restrict__ keys, int32_t* __restrict__ vals, int64_t n_ranges,
                           int2* __restrict__ ranges) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_ranges) ranges[i] = make_int2(0, 0);
  if (i >= capacity) return;
  const int used = total > 0 ? offsets[total - 1] : 0;
  if (i >= used) {
    keys[i] = sentinel;
    vals[i] = -1;
  }
}

__global__ void tile_ranges_kernel(int capacity, uint32_t sentinel, const uint32_t* __restrict__ keys,
                                   int2* __restrict__ ranges) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= capacity) return;
  const uint32_t k = keys[i];
  if (k >= sentinel) return;
  if (i == 0 || keys[i - 1] != k) ranges[k].x = i;
  if (i == capacity - 1 || keys[i + 1] != k) ranges[k].y = i + 1;
}

// The list a tile walks: its range of the tile-sorted intersections, or (overflowed image) the image's whole
// depth-sorted Gaussian list.
struct TileList {
  bool overflow;
  int start, count;
};
__device__ __forceinline__ TileList tile_list(const Params& p, int img, int tile, const int32_t* offsets,
                                              const int2* ranges) {
  TileList l;
  l.overflow = p.N > 0 && offsets[(int64_t(img) + 1) * p.N - 1] > p.capacity;
  if (l.overflow) {
    l.start = 0;
    l.count = p.N;
  } else {
    const int2 r = ranges[int64_t(img) * p.tiles_x * p.tiles_y + tile];
    l.start = r.x;
    l.count = r.y - r.x;
  }
  return l;
}

// Loads list entry i into registers: flat id and the opacity (0 for culled Gaussians on the fallback path,
// which makes them fail the 1/255 test everywhere).
__device__ __forceinline__ int list_entry(const Params& p, const TileList& l, int img, int i,
                                          const int32_t* __restrict__ sorted_ids, const int32_t* __restrict__ isect,
                                          const int32_t* __restrict__ radii, const float* __restrict__ opac,
                                          float& o) {
  const int64_t img_base = int64_t(img) * p.N;
  int flat;
  if (l.overflow) {
    flat = int(img_base + sorted_ids[img_base + i]);
  } else {
    flat = isect[l.start + i];
  }
  const int b = img / p.C;
  o = (!l.overflow || radii[flat] > 0) ? opac[int64_t(b) * p.N + (flat - img_base)] : 0.f;
  return flat;
}

// ------------------------------------------------------------------------------------------------------
// Forward blend.

// The forward blend's arrays, in one struct so that its kernels and helpers do not each repeat twenty pointers.
struct FwdArgs {
  const float2* means2d;      // [B*C*N]
  const float* conics;        // [B*C*N, 3]
  const float* opac;          // [B, N]
  const float* colors_eval;   // [B*C*N, D]
  const float* depths;        // [B*C*N]
  const int32_t* radii;       // [B*C*N]
  const int32_t* sorted_ids;  // [B*C*N]
  const int32_t* isect;       // [capacity]
  const int2* ranges;         // [B*C*tiles]
  const int32_t* offsets;     // [B*C*N]
  const float* bg;            // [B*C, D] or null
  float* render;              // [B*C, H, W, D]
  float* alpha;               // [B*C, H, W]
  float* depth;               // [B*C, H, W]
  int32_t* last_ids;          // [B*C, H, W]
  float* trans;               // [B*C, H, W]
  float* chunk_state;         // see chunk_state_numel; null: not kept
  int64_t n_slots;            // boundary slots of chunk_state
  int32_t* part_info;         // [n_slots * 256 + B*C*H*W] (split forward only, else null)
};

// A batch of up to 256 list entries staged in shared memory, packed so that the blend loop's test of an entry is
// two 16-byte broadcast loads (six 4-byte ones before; see render_fwd_kernel for what it gained):
// geo0 = (mean x, mean y, opacity, conic a), geo1 = (conic b, conic c, depth, unused), then the colour channels
// (RGB padded to 4, one more 16-byte load for a contributing entry).
template <int MAXD>
constexpr int col_stride() {
  return MAXD == 3 ? 4 : MAXD;
}
template <int MAXD>
struct FwdBatch {
  float4 geo0[kBlock];
  float4 geo1[kBlock];
  alignas(16) float col[kBlock * col_stride<MAXD>()];
};

// Thread tid stages list entry i (if i < end) with channels ch_off .. ch_off + nch - 1.
template <int MAXD>
__device__ __forceinline__ void stage_fwd_entry(const Params& p, const FwdArgs& a, const TileList& l, int img, int i,
                                                int end, int tid, int ch_off, int nch, FwdBatch<MAXD>& s) {
  if (i >= end) return;
  float o;
  const int flat = list_entry(p, l, img, i, a.sorted_ids, a.isect, a.radii, a.opac, o);
  const float2 m = a.means2d[flat];
  const float* con = a.conics + 3 * int64_t(flat);
  s.geo0[tid] = make_float4(m.x, m.y, o, con[0]);
  s.geo1[tid] = make_float4(con[1], con[2], a.depths[flat], 0.f);
  const float* cp = a.colors_eval + int64_t(flat) * p.D + ch_off;
#pragma unroll
  for (int c = 0; c < MAXD; ++c)
    if (c < nch) s.col[tid * col_stride<MAXD>() + c] = cp[c];
}

// Colour channels of staged entry j.
template <int MAXD>
__device__ __forceinline__ void staged_colors(const FwdBatch<MAXD>& s, int j, float (&cv)[MAXD]) {
  if constexpr (MAXD == 3) {
    const float4 v = reinterpret_cast<const float4*>(s.col)[j];
    cv[0] = v.x, cv[1] = v.y, cv[2] = v.z;
  } else {
#pragma unroll
    for (int c = 0; c < MAXD; ++c) cv[c] = s.col[j * MAXD + c];
  }
}

// A pixel's blend state: transmittance, depth and colour sums, list position after its last contributor.
template <int MAXD>
struct BlendState {
  float T, z, c[MAXD];
  int last;
  __device__ __forceinline__ void clear() {
    T = 1.f;
    z = 0.f;
#pragma unroll
    for (int i = 0; i < MAXD; ++i) c[i] = 0.f;
    last = 0;
  }
};

// Blends entries [0, nb) of the staged batch (list positions base, base + 1, ...) into the pixel's state until it
// stops. U > 1 computes the alphas of U entries before their serial transmittance updates (alpha does not depend
// on T): U independent exponentials for the scheduler, the same decisions in the same order, the same arithmetic.
template <int MAXD, int U>
__device__ __forceinline__ void blend_batch(const FwdBatch<MAXD>& s, int nb, int base, int nch, float fx, float fy,
                                            BlendState<MAXD>& st, bool& stopped) {
  for (int j0 = 0; j0 < nb; j0 += U) {
    float al[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = min(j0 + u, nb - 1);  // past the batch: an entry of it, discarded below (no stale reads)
      const float4 g0 = s.geo0[j], g1 = s.geo1[j];
      float vis;
      al[u] = raster::gaussian_alpha(Sym2<float>{g0.w, g1.x, g1.y}, g0.z, fx - g0.x, fy - g0.y, vis);
      if (j0 + u >= nb) al[u] = 0.f;  // fails the 1/255 test
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float next;
      const raster::BlendStep step = raster::blend_step(al[u], st.T, next);
      if (step == raster::BlendStep::kSkip) continue;
      if (step == raster::BlendStep::kStop) {
        stopped = true;
        return;
      }
      const int j = j0 + u;
      const float w = al[u] * st.T;
      float cv[MAXD];
      staged_colors(s, j, cv);
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < nch) st.c[c] += w * cv[c];
      st.z += w * s.geo1[j].z;
      st.T = next;
      st.last = base + j + 1;
    }
  }
}

// One pixel's record in chunk_state: field f (0: T, 1: depth sum, 2 + c: colour sums) at p[f * stride]. Boundary
// slots have stride 256 (indexed by the pixel's place in its tile), the final-sums region B*C*H*W (by pixel).
struct Record {
  float* p;
  int64_t stride;
  __device__ __forceinline__ float& operator[](int f) const { return p[f * stride]; }
};
// Index of (boundary b of the tile's list, pixel tid) in the slot arrays: slot (l.start + b) / 256 is unique to the
// boundary (see chunk_state_numel).
__device__ __forceinline__ int64_t boundary_index(const TileList& l, int b, int tid) {
  return int64_t((l.start + b) / kBlock) * kBlock + tid;
}
__device__ __forceinline__ Record boundary_record(const Params& p, const FwdArgs& a, const TileList& l, int b,
                                                  int tid) {
  const int64_t i = boundary_index(l, b, tid);
  return {a.chunk_state + (i - tid) * (2 + p.D) + tid, kBlock};
}
__device__ __forceinline__ Record final_record(const Params& p, const FwdArgs& a, int64_t pix) {
  return {a.chunk_state + a.n_slots * (2 + p.D) * kBlock + pix, int64_t(p.B) * p.C * p.H * p.W};
}
template <int MAXD>
__device__ __forceinline__ void store_record(const Record& r, const BlendState<MAXD>& st, int ch_off, int nch,
                                             bool with_T) {
  if (ch_off == 0) {
    if (with_T) r[0] = st.T;
    r[1] = st.z;
  }
#pragma unroll
  for (int c = 0; c < MAXD; ++c)
    if (c < nch) r[2 + ch_off + c] = st.c[c];
}

// Writes a pixel's outputs, and its final sums where the backward may split the tile's list.
template <int MAXD>
__device__ __forceinline__ void write_fwd_outputs(const Params& p, const FwdArgs& a, const TileList& l, int img,
                                                  int64_t pix, int ch_off, int nch, const BlendState<MAXD>& st) {
  float* out = a.render + pix * p.D + ch_off;
  const float* bgi = a.bg ? a.bg + int64_t(img) * p.D + ch_off : nullptr;
#pragma unroll
  for (int c = 0; c < MAXD; ++c)
    if (c < nch) out[c] = st.c[c] + (bgi ? st.T * bgi[c] : 0.f);
  if (ch_off == 0) {
    a.alpha[pix] = 1.f - st.T;
    a.depth[pix] = st.z;
    a.last_ids[pix] = st.last;
    a.trans[pix] = st.T;
  }
  if (a.chunk_state != nullptr && !l.overflow && l.count > kBlock)  // for the backward chunks' "behind" sums
    store_record(final_record(p, a, pix), st, ch_off, nch, false);
}

constexpr int kIlp = 4;  // alphas computed ahead of the serial blend (blend_batch)

// One block per tile walks its whole list: many images (no chunk state), D > 32 (channel chunks), or
// FLASHAVATAR_RAST_FWD=single. H200, 64 images of the untrained uv-128 avatar: 2.25 ms with six 4-byte shared
// loads per test and a 1-ahead loop, 1.97 ms with the packed batch, 1.91 ms with kIlp alphas ahead. Two pixels per
// thread (128 threads, each entry's geometry read once per two pixels) measured slower: 2.35 / 2.91 ms (1 / 4
// ahead; benchmarks/results/profile_batch_h200.md).
template <int MAXD>
__global__ void __launch_bounds__(kBlock) render_fwd_kernel(Params p, int ch_off, int nch, FwdArgs a) {
  __shared__ FwdBatch<MAXD> s;
  const int img = blockIdx.z;
  const int tile = blockIdx.y * p.tiles_x + blockIdx.x;
  const int tid = threadIdx.y * kTileSize + threadIdx.x;
  const int px = blockIdx.x * kTileSize + threadIdx.x, py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < p.W && py < p.H;
  const TileList l = tile_list(p, img, tile, a.offsets, a.ranges);
  const float fx = px + 0.5f, fy = py + 0.5f;
  BlendState<MAXD> st;
  st.clear();
  bool done = !inside;
  for (int base = 0; base < l.count; base += kBlock) {
    // Barrier before overwriting the batch, and early exit when every pixel of the tile is finished.
    if (__syncthreads_count(done) == kBlock) break;
    // State at this 256-entry boundary, where a backward block starts.
    if (base > 0 && a.chunk_state != nullptr && !l.overflow)
      store_record(boundary_record(p, a, l, base, tid), st, ch_off, nch, true);
    stage_fwd_entry(p, a, l, img, base + tid, l.count, tid, ch_off, nch, s);
    __syncthreads();
    if (!done) blend_batch<MAXD, kIlp>(s, min(kBlock, l.count - base), base, nch, fx, fy, st, done);
  }
  if (!inside) return;
  write_fwd_outputs(p, a, l, img, (int64_t(img) * p.H + py) * p.W + px, ch_off, nch, st);
}

// ---- Split forward: a tile's list in up to grid_chunks parts (whole 256-entry chunks), one block each, then a
// combine pass (rasterizer.cu top). Only with the chunk state kept and D <= 32 (one channel chunk).
// Parts of the tile's list: one for short lists (<= 256 entries) and overflowed images.
__device__ __forceinline__ int split_parts(const FwdArgs& a, const TileList& l, int grid_chunks) {
  if (l.overflow || a.chunk_state == nullptr) return 1;
  return max(1, min(grid_chunks, (l.count + kBlock - 1) / kBlock));
}
// Entries [x, y) of part k: the list's 256-entry chunks spread evenly over the parts.
__device__ __forceinline__ int2 part_range(int count, int parts, int k) {
  const int chunks = (count + kBlock - 1) / kBlock;
  return make_int2(k * chunks / parts * kBlock, min(count, (k + 1) * chunks / parts * kBlock));
}
// part_info word: a pixel's last (list position after its last contributor, 0: none) and whether it stopped.
__device__ __forceinline__ int32_t part_info_word(int last, bool stopped) { return stopped ? ~last : last; }

// Walks entries [begin, end) of the tile's list front to back, a 256-entry batch at a time through shared memory
// (the block's barriers are uniform). The pixel blends from entry `from` on (a batch start; >= end: not at all)
// until it stops; the block leaves once no pixel blends any more. At each 256-entry boundary b in (begin, end)
// the pixel stores its state into b's slot if it has blended up to b and not stopped, and (with_info) its
// part_info word there.
template <int MAXD>
__device__ void walk_part(const Params& p, const FwdArgs& a, const TileList& l, int img, int begin, int end,
                          int from, bool with_info, int tid, float fx, float fy, FwdBatch<MAXD>& s,
                          BlendState<MAXD>& st, bool& stopped) {
  for (int base = begin; base < end; base += kBlock) {
    if (base > begin) {
      if (a.chunk_state != nullptr && !l.overflow && !stopped && from < base)
        store_record(boundary_record(p, a, l, base, tid), st, 0, p.D, true);
      if (with_info) a.part_info[boundary_index(l, base, tid)] = part_info_word(st.last, stopped);
    }
    const bool blends = !stopped && from <= base;
    if (!__syncthreads_or(blends)) {  // also the barrier before overwriting the batch
      if (!__syncthreads_or(!stopped)) break;
      continue;  // pixels waiting for a later batch
    }
    stage_fwd_entry(p, a, l, img, base + tid, end, tid, 0, p.D, s);
    __syncthreads();
    if (blends) blend_batch<MAXD, kIlp>(s, min(kBlock, end - base), base, p.D, fx, fy, st, stopped);
  }
}

// Pass 1, grid (tiles_x, tiles_y, images * grid_chunks): block (tile, k) blends part k of the tile's list from
// T = 1, stopping a pixel where its local transmittance would drop to 1e-4 or below (the whole-list one, a
// product with the parts in front <= 1, drops there too). A tile of one part is finished here (outputs as
// render_fwd_kernel); otherwise each pixel's local state goes to the part's records: at inner boundaries
// (chunk_state slots + part_info words) and at the part's end (the slot of the next part's start, or the
// final-sums region with T in field 0 for the last part; frozen where the pixel stopped).
template <int MAXD>
__global__ void __launch_bounds__(kBlock) render_fwd_part_kernel(Params p, FwdArgs a, int grid_chunks) {
  __shared__ FwdBatch<MAXD> s;
  const int img = blockIdx.z / grid_chunks, part = blockIdx.z % grid_chunks;
  const int tile = blockIdx.y * p.tiles_x + blockIdx.x;
  const TileList l = tile_list(p, img, tile, a.offsets, a.ranges);
  const int parts = split_parts(a, l, grid_chunks);
  if (part >= parts) return;  // uniform over the block
  const int tid = threadIdx.y * kTileSize + threadIdx.x;
  const int px = blockIdx.x * kTileSize + threadIdx.x, py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < p.W && py < p.H;
  const int64_t pix = (int64_t(img) * p.H + py) * p.W + px;
  const int2 r = part_range(l.count, parts, part);
  BlendState<MAXD> st;
  st.clear();
  bool stopped = !inside;
  walk_part(p, a, l, img, r.x, r.y, r.x, parts > 1, tid, px + 0.5f, py + 0.5f, s, st, stopped);
  if (!inside) return;
  if (parts == 1) {
    write_fwd_outputs(p, a, l, img, pix, 0, p.D, st);
    return;
  }
  const bool last_part = part == parts - 1;
  store_record(last_part ? final_record(p, a, pix) : boundary_record(p, a, l, r.y, tid), st, 0, p.D, true);
  a.part_info[last_part ? a.n_slots * kBlock + pix : boundary_index(l, r.y, tid)] =
      part_info_word(st.last, stopped);
}

// Pass 2, one block per tile of several parts, one thread per pixel: the parts in order with the pixel's running
// whole-list state g. Nothing blended in front (g.T == 1): the part's walk was the whole-list walk (same
// arithmetic from the same state), take its end record as it is. Otherwise go through the part's boundaries
// while the stop provably lies beyond them (part_info not stopped, may_stop_before false), rewriting each record
// to whole-list form (T = g.T T_local, sums = g + g.T local); at the first boundary where the stop may lie before
// it, re-walk the part from the last boundary passed, entry by entry (block-cooperative, storing the boundaries
// it crosses), to the stop or the part's end. Then the outputs and the final sums.
template <int MAXD>
__global__ void __launch_bounds__(kBlock) render_fwd_combine_kernel(Params p, FwdArgs a, int grid_chunks) {
  __shared__ FwdBatch<MAXD> s;
  const int img = blockIdx.z;
  const int tile = blockIdx.y * p.tiles_x + blockIdx.x;
  const TileList l = tile_list(p, img, tile, a.offsets, a.ranges);
  const int parts = split_parts(a, l, grid_chunks);
  if (parts == 1) return;  // finished by pass 1 (uniform over the block)
  const int tid = threadIdx.y * kTileSize + threadIdx.x;
  const int px = blockIdx.x * kTileSize + threadIdx.x, py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < p.W && py < p.H;
  const int64_t pix = (int64_t(img) * p.H + py) * p.W + px;
  const int64_t final_info = a.n_slots * kBlock + pix;
  BlendState<MAXD> g;
  g.clear();
  bool fin = !inside;  // stopped (or outside the image)
  for (int k = 0; k < parts; ++k) {
    if (!__syncthreads_or(!fin)) break;  // every pixel of the tile has stopped
    const int2 r = part_range(l.count, parts, k);
    const bool last_part = k == parts - 1;
    int from = r.y;  // where this pixel re-walks the part from (r.y: it does not)
    if (!fin && g.T == 1.f) {
      const Record e = last_part ? final_record(p, a, pix) : boundary_record(p, a, l, r.y, tid);
      const int32_t w = a.part_info[last_part ? final_info : boundary_index(l, r.y, tid)];
      g.T = e[0];
      g.z = e[1];
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < p.D) g.c[c] = e[2 + c];
      g.last = w < 0 ? ~w : w;
      fin = w < 0;
    } else if (!fin) {
      // State at the part's start: g, which is also in the record of that boundary (k > 0 here; the previous
      // part stored it there). Its colour sums are read back from there rather than copied (registers, D = 32).
      const Record front = boundary_record(p, a, l, r.x, tid);
      const float t_front = g.T, z_front = g.z;
      const int last_front = g.last;
      from = r.x;
      for (int b = min(r.x + kBlock, r.y);; b = min(b + kBlock, r.y)) {
        const bool at_final = last_part && b == r.y;
        const Record rec = at_final ? final_record(p, a, pix) : boundary_record(p, a, l, b, tid);
        const int32_t w = a.part_info[at_final ? final_info : boundary_index(l, b, tid)];
        if (w < 0 || raster::may_stop_before(t_front, rec[0])) break;  // the stop may lie before b
        g.T = t_front * rec[0];
        g.z = raster::sum_behind(z_front, t_front, rec[1]);
#pragma unroll
        for (int c = 0; c < MAXD; ++c)
          if (c < p.D) g.c[c] = raster::sum_behind(front[2 + c], t_front, rec[2 + c]);
        g.last = w > 0 ? w : last_front;
        if (!at_final) store_record(rec, g, 0, p.D, true);
        from = b;
        if (b == r.y) break;
      }
    }
    bool stop = from >= r.y;  // true: no re-walk for this pixel
    walk_part(p, a, l, img, r.x, r.y, from, false, tid, px + 0.5f, py + 0.5f, s, g, stop);
    if (from < r.y) {
      if (stop)
        fin = true;
      else if (!last_part)
        store_record(boundary_record(p, a, l, r.y, tid), g, 0, p.D, true);
    }
  }
  if (!inside) return;
  write_fwd_outputs(p, a, l, img, pix, 0, p.D, g);
}

// Per-image geometry gradient row: mx, my, conic a, b, c, depth (+2 pad: one 32-byte sector per Gaussian).
constexpr int kGeoStride = 8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Previous backward blend (kept selectable with FLASHAVATAR_RAST_BWD=block for comparison): per-warp butterfly
// sums of every value, then per-block sums in shared memory flushed with one global atomic per Gaussian.
template <int MAXD>
__global__ void __launch_bounds__(kBlock)
    render_bwd_block_kernel(Params p, int ch_off, int nch, bool per_set_colors, const float2* __restrict__ means2d,
                      const float* __restrict__ conics, const float* __restrict__ opac,
                      const float* __restrict__ colors_eval, const float* __restrict__ depths,
                      const int32_t* __restrict__ radii, const int32_t* __restrict__ sorted_ids,
                      const int32_t* __restrict__ isect, const int2* __restrict__ ranges,
                      const int32_t* __restrict__ offsets, const float* __restrict__ bg,
                      const float* __restrict__ trans_final, const int32_t* __restrict__ last_ids,
                      const float* __restrict__ g_render, const float* __restrict__ g_alpha,
                      const float* __restrict__ g_depth,
                      float* __restrict__ v_geo,      // [B*C*N, kGeoStride]: mx, my, conic a, b, c, depth
                      float* __restrict__ v_opac,     // [B, N]
                      float* __restrict__ v_colors) { // [B, N, D] (plain colours) or [B*C*N, D] (SH)
  __shared__ int s_id[kBlock];
  __shared__ float3 s_xyo[kBlock];
  __shared__ float3 s_con[kBlock];
  __shared__ float s_z[kBlock];
  __shared__ float s_col[kBlock * MAXD];
  // Per-batch gradient sums of the block (shared atomics), flushed to global memory once per block and
  // Gaussian: 8x fewer global atomics than one per warp. Geometry: mx, my, conic a, b, c, opacity, depth.
  // Colours go through shared memory too when few (MAXD <= 4); wider chunks keep per-warp global atomics
  // (shared memory would exceed 48 KB).
  constexpr int kGeo = 7;  // odd stride: conflict-free flush
  constexpr bool kSharedColor = MAXD <= 4;
  __shared__ float s_grad[kBlock * kGeo];
  __shared__ float s_gcol[kSharedColor ? kBlock * MAXD : 1];
  __shared__ int s_max_last;
  const int img = blockIdx.z;
  const int tile = blockIdx.y * p.tiles_x + blockIdx.x;
  const int tid = threadIdx.y * kTileSize + threadIdx.x;
  const int lane = tid & 31;
  const int px = blockIdx.x * kTileSize + threadIdx.x, py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < p.W && py < p.H;
  const TileList l = tile_list(p, img, tile, offsets, ranges);
  const int64_t pix = (int64_t(img) * p.H + py) * p.W + px;
  const float fx = px + 0.5f, fy = py + 0.5f;
  const int b = img / p.C;
  const int64_t img_base = int64_t(img) * p.N;

  const float t_final = inside ? trans_final[pix] : 1.f;
  const int last = inside ? last_ids[pix] : 0;
  float gC[MAXD], acc[MAXD];
  const float* bgi = bg ? bg + int64_t(img) * p.D + ch_off : nullptr;
#pragma unroll
  for (int c = 0; c < MAXD; ++c) {
    gC[c] = (inside && c < nch) ? g_render[pix * p.D + ch_off + c] : 0.f;
    acc[c] = (bgi && c < nch) ? t_final * bgi[c] : 0.f;
  }
  const float gA = (inside && ch_off == 0 && g_alpha) ? g_alpha[pix] : 0.f;  // null: no gradient
  const float gD = (inside && ch_off == 0 && g_depth) ? g_depth[pix] : 0.f;
  float acc_z = 0.f, T = t_final;

  if (tid == 0) s_max_last = 0;
  __syncthreads();
  atomicMax(&s_max_last, last);
  __syncthreads();
  const int end = s_max_last;
  const int warp_last = __reduce_max_sync(0xffffffffu, last);  // entries past it touch no pixel of the warp
  const bool has_gd = g_depth != nullptr;

  for (int bend = end; bend > 0; bend -= kBlock) {
    const int bstart = max(0, bend - kBlock);
    __syncthreads();  // the previous batch is consumed
    const int i = bstart + tid;
    if (i < bend) {
      float o;
      const int flat = list_entry(p, l, img, i, sorted_ids, isect, radii, opac, o);
      const float2 m = means2d[flat];
      s_id[tid] = flat;
      s_xyo[tid] = make_float3(m.x, m.y, o);
      s_con[tid] = make_float3(conics[3 * flat], conics[3 * flat + 1], conics[3 * flat + 2]);
      s_z[tid] = depths[flat];
      const float* cp = colors_eval + int64_t(flat) * p.D + ch_off;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < nch) s_col[tid * MAXD + c] = cp[c];
    }
#pragma unroll
    for (int k = 0; k < kGeo; ++k) s_grad[tid * kGeo + k] = 0.f;
    if (kSharedColor) {
#pragma unroll
      for (int c = 0; c < MAXD; ++c) s_gcol[tid * MAXD + c] = 0.f;
    }
    __syncthreads();
    for (int j = bend - bstart - 1; j >= 0; --j) {
      const int idx = bstart + j;
      if (idx >= warp_last) continue;  // uniform over the warp
      const float3 xyo = s_xyo[j];
      const float3 co = s_con[j];
      const int flat = s_id[j];
      const Sym2<float> conic{co.x, co.y, co.z};
      const float dx = fx - xyo.x, dy = fy - xyo.y;
      float vis = 0.f, a = 0.f;
      bool valid = inside && idx < last;
      if (valid) {
        a = raster::gaussian_alpha(conic, xyo.z, dx, dy, vis);
        valid = a >= raster::alpha_threshold<float>();
      }
      // Every lane reaches here for every j (the loop is uniform over the block).
      if (!__any_sync(0xffffffffu, valid)) continue;
      float vcol[MAXD];
      float vmx = 0.f, vmy = 0.f, vop = 0.f, vz = 0.f;
      Sym2<float> vcon{0.f, 0.f, 0.f};
#pragma unroll
      for (int c = 0; c < MAXD; ++c) vcol[c] = 0.f;
      if (valid) {
        const float ra = 1.f / (1.f - a);  // one division, then products
        const float ti = T * ra;           // transmittance in front of this Gaussian
        const float w = a * ti;
        const float z = s_z[j];
        float ga = gA * t_final * ra + gD * (z * ti - acc_z * ra);
#pragma unroll
        for (int c = 0; c < MAXD; ++c)
          if (c < nch) {
            const float cv = s_col[j * MAXD + c];
            ga += gC[c] * (cv * ti - acc[c] * ra);
            vcol[c] = gC[c] * w;
            acc[c] += cv * w;
          }
        vz = gD * w;
        acc_z += z * w;
        T = ti;
        raster::gaussian_alpha_vjp(conic, xyo.z, dx, dy, vis, ga, vcon, vmx, vmy, vop);
      }
      // One atomic per warp and quantity: sum over the 32 pixels first.
      vmx = warp_sum(vmx);
      vmy = warp_sum(vmy);
      vcon.a = warp_sum(vcon.a);
      vcon.b = warp_sum(vcon.b);
      vcon.c = warp_sum(vcon.c);
      vop = warp_sum(vop);
      if (has_gd) vz = warp_sum(vz);  // uniform branch
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < nch) vcol[c] = warp_sum(vcol[c]);
      if (lane == 0) {
        float* sg = s_grad + j * kGeo;
        atomicAdd(sg + 0, vmx);
        atomicAdd(sg + 1, vmy);
        atomicAdd(sg + 2, vcon.a);
        atomicAdd(sg + 3, vcon.b);
        atomicAdd(sg + 4, vcon.c);
        atomicAdd(sg + 5, vop);
        if (has_gd) atomicAdd(sg + 6, vz);
        if (kSharedColor) {
#pragma unroll
          for (int c = 0; c < MAXD; ++c)
            if (c < nch) atomicAdd(s_gcol + j * MAXD + c, vcol[c]);
        } else {
          const int64_t g = int64_t(b) * p.N + (flat - img_base);
          float* vc = v_colors + (per_set_colors ? g : int64_t(flat)) * p.D + ch_off;
#pragma unroll
          for (int c = 0; c < MAXD; ++c)
            if (c < nch) atomicAdd(vc + c, vcol[c]);
        }
      }
    }
    __syncthreads();  // the batch's sums are complete
    if (tid < bend - bstart) {
      const int flat = s_id[tid];
      const int64_t g = int64_t(b) * p.N + (flat - img_base);
      const float* sg = s_grad + tid * kGeo;
      float* row = v_geo + int64_t(flat) * kGeoStride;
      float* dst[kGeo] = {row, row + 1, row + 2, row + 3, row + 4, v_opac + g, row + 5};
#pragma unroll
      for (int k = 0; k < kGeo; ++k)
        if (sg[k] != 0.f) atomicAdd(dst[k], sg[k]);
      if (kSharedColor) {
        float* vc = v_colors + (per_set_colors ? g : int64_t(flat)) * p.D + ch_off;
#pragma unroll
        for (int c = 0; c < MAXD; ++c)
          if (c < nch && s_gcol[tid * MAXD + c] != 0.f) atomicAdd(vc + c, s_gcol[tid * MAXD + c]);
      }
    }
  }
}

// Reduce-scatter of NP values over the warp (NP a power of two): each step a lane sends the half of its values
// its partner keeps and adds the half it keeps, so NP values cost NP - 1 + max(0, 5 - log2 NP) shuffles instead
// of the 5 NP of one butterfly per value (the shuffles were the backward's main cost). At the end, for NP <= 32,
// every lane holds the full sum of value (lane >> (5 - log2 NP)); for NP = 64, value 2 lane + r in v[r].
template <int NP, int MASK>
__device__ __forceinline__ void warp_reduce_scatter(float* v, int lane) {
  if constexpr (MASK > 0) {
    if constexpr (NP > 1) {
      constexpr int H = NP / 2;
      const bool upper = lane & MASK;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, MASK);
      }
      warp_reduce_scatter<H, MASK / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], MASK);
      warp_reduce_scatter<1, MASK / 2>(v, lane);
    }
  }
}

constexpr int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// Backward blend, one 16x16 block per tile, walking each pixel's list back to front from its last contributor.
// Per Gaussian the warp's per-pixel gradients (7 geometry values + the chunk's colours) are reduce-scattered
// (above), then up to 7 + MAXD lanes issue one atomicAdd each, in one instruction.
template <int MAXD>
__global__ void __launch_bounds__(kBlock)
    render_bwd_warp_kernel(Params p, int ch_off, int nch, bool per_set_colors, const float2* __restrict__ means2d,
                           const float* __restrict__ conics, const float* __restrict__ opac,
                           const float* __restrict__ colors_eval, const float* __restrict__ depths,
                           const int32_t* __restrict__ radii, const int32_t* __restrict__ sorted_ids,
                           const int32_t* __restrict__ isect, const int2* __restrict__ ranges,
                           const int32_t* __restrict__ offsets, const float* __restrict__ bg,
                           const float* __restrict__ trans_final, const int32_t* __restrict__ last_ids,
                           const float* __restrict__ g_render, const float* __restrict__ g_alpha,
                           const float* __restrict__ g_depth,
                           float* __restrict__ v_geo,      // [B*C*N, kGeoStride]
                           float* __restrict__ v_opac,     // [B, N]
                           float* __restrict__ v_colors,   // [B, N, D] (plain colours) or [B*C*N, D] (SH)
                           const float* __restrict__ chunk_state, int64_t n_slots, int grid_chunks) {
  constexpr int kNV = 7 + MAXD;  // mx, my, ca, cb, cc, z, opacity, colours
  constexpr int kNP = pow2_at_least(kNV);
  constexpr int kLog = kNP >= 32 ? 5 : (kNP == 16 ? 4 : (kNP == 8 ? 3 : 0));
  static_assert(kNP == 8 || kNP == 16 || kNP == 32 || kNP == 64, "value count");
  __shared__ int s_id[kBlock];
  __shared__ float3 s_xyo[kBlock];
  __shared__ float3 s_con[kBlock];
  __shared__ float s_z[kBlock];
  __shared__ float s_col[kBlock * MAXD];
  __shared__ int s_max_last;
  // Block = (tile, chunk): chunk k walks list entries [256 k, 256 (k + 1)) (the grid's last chunk: to the end),
  // starting from the state the forward kept at the chunk's end boundary.
  const int img = blockIdx.z / grid_chunks, chunk = blockIdx.z % grid_chunks;
  const int tile = blockIdx.y * p.tiles_x + blockIdx.x;
  const int tid = threadIdx.y * kTileSize + threadIdx.x;
  const int lane = tid & 31;
  const int px = blockIdx.x * kTileSize + threadIdx.x, py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < p.W && py < p.H;
  const TileList l = tile_list(p, img, tile, offsets, ranges);
  const int n_chunks = (l.overflow || chunk_state == nullptr) ? 1 : max(1, (l.count + kBlock - 1) / kBlock);
  if (chunk >= n_chunks) return;  // uniform over the block
  const int chunk_begin = chunk * kBlock;
  const int chunk_end = (chunk == n_chunks - 1 || chunk == grid_chunks - 1) ? l.count : chunk_begin + kBlock;
  const int64_t pix = (int64_t(img) * p.H + py) * p.W + px;
  const float fx = px + 0.5f, fy = py + 0.5f;
  const int b = img / p.C;
  const int64_t img_base = int64_t(img) * p.N;

  const float t_final = inside ? trans_final[pix] : 1.f;
  const int last = inside ? last_ids[pix] : 0;
  float gC[MAXD], acc[MAXD];
  const float* bgi = bg ? bg + int64_t(img) * p.D + ch_off : nullptr;
#pragma unroll
  for (int c = 0; c < MAXD; ++c) {
    gC[c] = (inside && c < nch) ? g_render[pix * p.D + ch_off + c] : 0.f;
    acc[c] = (bgi && c < nch) ? t_final * bgi[c] : 0.f;
  }
  const float gA = (inside && ch_off == 0 && g_alpha) ? g_alpha[pix] : 0.f;  // null: no gradient
  const float gD = (inside && ch_off == 0 && g_depth) ? g_depth[pix] : 0.f;
  float acc_z = 0.f, T = t_final;
  if (inside && last > chunk_end) {
    // The pixel goes on past this chunk: T after the entries < chunk_end, and the sums behind it = final sums -
    // prefix sums at the boundary (+ T_final * background, already in acc).
    const float* st = chunk_state + int64_t((l.start + chunk_end) / kBlock) * (2 + p.D) * kBlock;
    const int64_t npix = int64_t(p.B) * p.C * p.H * p.W;
    const float* fin = chunk_state + n_slots * (2 + p.D) * kBlock;
    T = st[tid];
    acc_z = fin[npix + pix] - st[kBlock + tid];
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < nch) acc[c] += fin[(2 + ch_off + c) * npix + pix] - st[(2 + ch_off + c) * kBlock + tid];
  }

  if (tid == 0) s_max_last = 0;
  __syncthreads();
  atomicMax(&s_max_last, min(last, chunk_end));
  __syncthreads();
  const int end = s_max_last;
  const int warp_last = __reduce_max_sync(0xffffffffu, last);  // entries past it touch no pixel of the warp
  // Which reduced value this lane adds to global memory (NP <= 32: one lane per value).
  const int my_value = kNP >= 32 ? lane * (kNP / 32) : lane >> (5 - kLog);
  const bool adder = kNP >= 32 || (lane & ((1 << (5 - kLog)) - 1)) == 0;

  for (int bend = end; bend > chunk_begin; bend -= kBlock) {
    const int bstart = max(chunk_begin, bend - kBlock);
    __syncthreads();  // the previous batch is consumed
    const int i = bstart + tid;
    if (i < bend) {
      float o;
      const int flat = list_entry(p, l, img, i, sorted_ids, isect, radii, opac, o);
      const float2 m = means2d[flat];
      s_id[tid] = flat;
      s_xyo[tid] = make_float3(m.x, m.y, o);
      s_con[tid] = make_float3(conics[3 * flat], conics[3 * flat + 1], conics[3 * flat + 2]);
      s_z[tid] = depths[flat];
      const float* cp = colors_eval + int64_t(flat) * p.D + ch_off;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < nch) s_col[tid * MAXD + c] = cp[c];
    }
    __syncthreads();
    for (int j = min(bend, warp_last) - bstart - 1; j >= 0; --j) {  // uniform over the warp
      const int idx = bstart + j;
      const float3 xyo = s_xyo[j];
      const float3 co = s_con[j];
      const Sym2<float> conic{co.x, co.y, co.z};
      const float dx = fx - xyo.x, dy = fy - xyo.y;
      float vis = 0.f, a = 0.f;
      bool valid = inside && idx < last;
      if (valid) {
        a = raster::gaussian_alpha(conic, xyo.z, dx, dy, vis);
        valid = a >= raster::alpha_threshold<float>();
      }
      if (!__any_sync(0xffffffffu, valid)) continue;
      float v[kNP];
#pragma unroll
      for (int k = 0; k < kNP; ++k) v[k] = 0.f;
      if (valid) {
        const float ra = 1.f / (1.f - a);  // one division, then products
        const float ti = T * ra;           // transmittance in front of this Gaussian
        const float w = a * ti;
        const float z = s_z[j];
        float ga = gA * t_final * ra + gD * (z * ti - acc_z * ra);
#pragma unroll
        for (int c = 0; c < MAXD; ++c)
          if (c < nch) {
            const float cv = s_col[j * MAXD + c];
            ga += gC[c] * (cv * ti - acc[c] * ra);
            v[7 + c] = gC[c] * w;
            acc[c] += cv * w;
          }
        v[5] = gD * w;
        acc_z += z * w;
        T = ti;
        Sym2<float> vcon;
        raster::gaussian_alpha_vjp(conic, xyo.z, dx, dy, vis, ga, vcon, v[0], v[1], v[6]);
        v[2] = vcon.a;
        v[3] = vcon.b;
        v[4] = vcon.c;
      }
      warp_reduce_scatter<kNP, 16>(v, lane);
      if (adder) {
        const int flat = s_id[j];
        const int64_t g = int64_t(b) * p.N + (flat - img_base);
#pragma unroll
        for (int r = 0; r < (kNP >= 32 ? kNP / 32 : 1); ++r) {
          const int k = my_value + r;
          if (k >= kNV || v[r] == 0.f) continue;
          float* dst;
          if (k < 6)
            dst = v_geo + int64_t(flat) * kGeoStride + k;
          else if (k == 6)
            dst = v_opac + g;
          else if (k - 7 < nch)
            dst = v_colors + (per_set_colors ? g : int64_t(flat)) * p.D + ch_off + (k - 7);
          else
            continue;
          atomicAdd(dst, v[r]);
        }
      }
    }
  }
}

// Zero-fills two buffers in one launch (grid-stride).
__global__ void zero2_kernel(float* __restrict__ a, int64_t na, float* __restrict__ b, int64_t nb) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < na + nb; i += stride) {
    if (i < na)
      a[i] = 0.f;
    else
      b[i - na] = 0.f;
  }
}

__global__ void project_bwd_kernel(Params p, const float* __restrict__ means, const float* __restrict__ quats,
                                   const float* __restrict__ scales, const float* __restrict__ colors,
                                   const float* __restrict__ viewmats, const float* __restrict__ Ks,
                                   const int32_t* __restrict__ radii,
                                   const float* __restrict__ v_geo,  // [B*C*N, kGeoStride]
                                   const float* __restrict__ v_colors_eval,  // [B*C*N, D] (SH only)
                                   float* __restrict__ d_means, float* __restrict__ d_quats,
                                   float* __restrict__ d_scales, float* __restrict__ d_colors) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.B) * p.C * p.N) return;
  if (radii[idx] == 0) return;
  const int img = int(idx / p.N), n = int(idx % p.N), b = img / p.C;
  const int64_t g = int64_t(b) * p.N + n;
  const float* vm = viewmats + int64_t(img) * 16;
  const Intrinsics<float> k = intrinsics_of(Ks + int64_t(img) * 9, p);
  float dm[3] = {0.f, 0.f, 0.f}, dq[4] = {0.f, 0.f, 0.f, 0.f}, ds[3] = {0.f, 0.f, 0.f};
  if (p.sh_degree >= 0) {
    const Vec3<float> cam = raster::camera_center(vm);
    const Vec3<float> dir{means[3 * g] - cam.x, means[3 * g + 1] - cam.y, means[3 * g + 2] - cam.z};
    const Vec3<float> gdir = raster::sh_colors_vjp<float, AtomicAdd>(
        p.sh_degree, dir, colors + b * p.colors_bstride + int64_t(n) * p.K * p.D, p.D, v_colors_eval + idx * p.D,
        d_colors + g * p.K * p.D);
    dm[0] += gdir.x;
    dm[1] += gdir.y;
    dm[2] += gdir.z;
  }
  const float4 v0 = *reinterpret_cast<const float4*>(v_geo + idx * kGeoStride);
  const float2 v1 = *reinterpret_cast<const float2*>(v_geo + idx * kGeoStride + 4);
  raster::project_gaussian_vjp(means + 3 * g, quats + 4 * g, scales + 3 * g, vm, k, p.eps2d, v0.x, v0.y,
                               Sym2<float>{v0.z, v0.w, v1.x}, v1.y, dm, dq, ds);
  for (int i = 0; i < 3; ++i) atomicAdd(d_means + 3 * g + i, dm[i]);
  for (int i = 0; i < 4; ++i) atomicAdd(d_quats + 4 * g + i, dq[i]);
  for (int i = 0; i < 3; ++i) atomicAdd(d_scales + 3 * g + i, ds[i]);
}

// Channel chunks: the blending kernels keep MAXD accumulators in registers.
template <typename F>
void for_each_channel_chunk(int D, F&& launch) {
  for (int off = 0; off < D; off += 32) {
    const int n = std::min(32, D - off);
    if (n == 1)
      launch(std::integral_constant<int, 1>{}, off, n);
    else if (n == 2)
      launch(std::integral_constant<int, 2>{}, off, n);
    else if (n == 3)
      launch(std::integral_constant<int, 3>{}, off, n);
    else if (n == 4)
      launch(std::integral_constant<int, 4>{}, off, n);
    else if (n <= 8)
      launch(std::integral_constant<int, 8>{}, off, n);
    else if (n <= 16)
      launch(std::integral_constant<int, 16>{}, off, n);
    else
      launch(std::integral_constant<int, 32>{}, off, n);
  }
}

Params make_params(const at::Tensor& means, const at::Tensor& colors, const at::Tensor& viewmats, int64_t width,
                   int64_t height, int64_t sh_degree, double near_plane, double far_plane, double eps2d,
                   int64_t capacity) {
  Params p;
  p.B = int(means.size(0));
  p.N = int(means.size(1));
  p.C = int(viewmats.size(1));
  p.K = int(colors.size(2));
  p.D = int(colors.size(3));
  p.W = int(width);
  p.H = int(height);
  p.tiles_x = int((width + kTileSize - 1) / kTileSize);
  p.tiles_y = int((height + kTileSize - 1) / kTileSize);
  p.sh_degree = int(sh_degree);
  p.near_plane = float(near_plane);
  p.far_plane = float(far_plane);
  p.eps2d = float(eps2d);
  p.capacity = int(capacity);
  // SH / colours of one set expanded over the batch (the Animator's per-Gaussian SH) are read in place
  const bool shared = colors.size(0) > 1 && colors.stride(0) == 0;
  p.colors_bstride = shared ? 0 : colors.size(1) * colors.size(2) * colors.size(3);
  return p;
}

// Chunk state (see rasterizer.h): [slots][2 + D][256] boundary states, then [2 + D][B*C*H*W] final sums (field 0
// not an output there; the split forward's scratch). Kept only where splitting helps (few images: too few busy
// tiles to fill the GPU) and it is small. Slot (start + b) / 256 of boundary b (256 <= b < count) of a tile's
// list [start, start + count) of the intersection buffer is unique: a tile's boundaries are 256 apart, and the
// next tile's lie at >= its start + 256 >= this tile's end + 256, so in a higher slot.
// flashavatar/ops/rasterize.py (_chunk_state_numel) computes the same size for the fake kernel.
int64_t chunk_slots(int64_t capacity) { return (capacity + kBlock - 1) / kBlock; }
int64_t chunk_state_numel(int64_t images, int64_t tiles, int64_t H, int64_t W, int64_t D, int64_t capacity) {
  const int64_t n = (chunk_slots(capacity) * kBlock + images * H * W) * (2 + D);
  return images * tiles <= 4096 && n * 4 <= (int64_t(256) << 20) ? n : 0;
}
// Blocks per tile in the backward when the chunk state is kept (lists split in 256-entry chunks).
int backward_chunks(int64_t images, int64_t tiles) {
  return int(std::max<int64_t>(1, std::min<int64_t>(16, 16384 / std::max<int64_t>(1, images * tiles))));
}

inline unsigned blocks_for(int64_t n, int threads = 256) { return unsigned((n + threads - 1) / threads); }

}  // namespace

RasterFwdOut rasterize_fwd_cuda(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                                const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                                int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                                double eps2d, int64_t capacity) {
  const char* op = "flashavatar::rasterize_fwd";
  const int64_t D = rasterize_check_inputs(op, means, quats, scales, opacities, colors, viewmats, Ks, backgrounds,
                                           width, height, sh_degree, /*colors_may_be_shared=*/true);
  FA_CHECK(op, means.scalar_type() == at::kFloat, "the CUDA path computes in float32; got means of dtype ",
           means.scalar_type(), " (the Python wrapper casts for you)");
  FA_CHECK(op, capacity >= 1 && capacity < (int64_t(1) << 31), "capacity must be in [1, 2^31), got ", capacity);
  FA_CHECK(op, near_plane > 0, "near_plane must be positive, got ", near_plane);
  const c10::cuda::CUDAGuard guard(means.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(means, colors, viewmats, width, height, sh_degree, near_plane, far_plane, eps2d,
                               capacity);
  const int64_t B = p.B, C = p.C, N = p.N, H = p.H, W = p.W, BC = B * C, BCN = BC * N;
  const int64_t tiles = int64_t(p.tiles_x) * p.tiles_y;
  FA_CHECK(op, BCN < (int64_t(1) << 31) && BC * tiles < (int64_t(1) << 31) - 1,
           "too many images x Gaussians for 32-bit indices: ", BC, " images, ", N, " Gaussians");
  const auto fopts = means.options();
  const auto iopts = fopts.dtype(at::kInt);
  const bool has_bg = backgrounds.has_value() && backgrounds->defined();

  at::Tensor render = at::empty({B, C, H, W, D}, fopts);
  at::Tensor alpha = at::empty({B, C, H, W, 1}, fopts);
  at::Tensor depth = at::empty({B, C, H, W, 1}, fopts);
  at::Tensor radii = at::empty({B, C, N}, iopts);
  at::Tensor means2d = at::empty({B, C, N, 2}, fopts);
  at::Tensor conics = at::empty({B, C, N, 3}, fopts);
  at::Tensor colors_eval = at::empty({B, C, N, D}, fopts);
  at::Tensor depths = at::empty({B, C, N}, fopts);
  // The backward's state and this call's scratch in one int32 allocation (host time matters at avatar sizes:
  // nine allocations were one each), segments 256-byte aligned:
  //   outputs: last_ids, trans [B*C*H*W] | sorted_ids, offsets [BCN] | isect_ids [capacity] | ranges [BC*tiles, 2]
  //            | chunk_state (float)
  //   scratch: tile_rect [BCN, 4] | tile_counts, depth_vals [BCN] | keys, vals, keys_sorted [capacity] |
  //            depth keys in / out [BCN] uint64 | cub temp storage (the largest of its three calls) |
  //            (split forward) part_info [slots * 256 + B*C*H*W]
  const int64_t HW = H * W;
  const uint32_t sentinel = uint32_t(BC * tiles);
  const int depth_end_bit = 32 + bits_for(uint64_t(BC - 1));
  const int tile_end_bit = bits_for(uint64_t(sentinel));
  size_t bytes_depth = 0, bytes_scan = 0, bytes_tile = 0;
  if (N > 0) {  // temp-storage sizes only (no pointer is read)
    const auto counts_it = thrust::make_transform_iterator(thrust::make_counting_iterator<int64_t>(0),
                                                           SortedTileCount{nullptr, nullptr, int(N)});
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes_depth, static_cast<uint64_t*>(nullptr),
                                                   static_cast<uint64_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), int(BCN), 0, depth_end_bit,
                                                   stream));
    C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, bytes_scan, counts_it, static_cast<int32_t*>(nullptr),
                                                 int(BCN), stream));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes_tile, static_cast<uint32_t*>(nullptr),
                                                   static_cast<uint32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), int(capacity), 0, tile_end_bit,
                                                   stream));
  }
  const int64_t temp_ints = int64_t((std::max(bytes_depth, std::max(bytes_scan, bytes_tile)) + 3) / 4);
  int64_t used = 0;
  auto segment = [&](int64_t ints) {  // offset of the next segment, in int32 units
    const int64_t at = used;
    used += (ints + 63) / 64 * 64;
    return at;
  };
  const int64_t n_chunk = chunk_state_numel(BC, tiles, H, W, D, capacity);
  // Long lists split over blocks (render_fwd_part_kernel + render_fwd_combine_kernel) where the chunk state is
  // kept and the channels fit one chunk (D <= 32); FLASHAVATAR_RAST_FWD=single: one block per tile (comparisons).
  const char* fwd_variant = std::getenv("FLASHAVATAR_RAST_FWD");
  const bool split = n_chunk > 0 && D <= 32 && !(fwd_variant && std::string_view(fwd_variant) == "single");
  const int64_t n_part_info = split ? chunk_slots(capacity) * kBlock + BC * HW : 0;
  const int64_t o_last = segment(BC * HW), o_trans = segment(BC * HW), o_sorted = segment(BCN),
                o_offsets = segment(BCN), o_isect = segment(capacity), o_ranges = segment(BC * tiles * 2),
                o_chunk = segment(n_chunk);
  const int64_t o_rect = segment(N > 0 ? 4 * BCN : 0), o_counts = segment(N > 0 ? BCN : 0),
                o_dvals = segment(N > 0 ? BCN : 0), o_keys = segment(N > 0 ? capacity : 0),
                o_vals = segment(N > 0 ? capacity : 0), o_keys_sorted = segment(N > 0 ? capacity : 0),
                o_dkeys = segment(N > 0 ? 4 * BCN : 0), o_temp = segment(N > 0 ? temp_ints : 0),
                o_part_info = segment(n_part_info);
  at::Tensor state = at::empty({used}, iopts);
  auto part = [&](int64_t off, int64_t n) { return state.narrow(0, off, n); };
  at::Tensor last_ids = part(o_last, BC * HW).view({B, C, H, W});
  at::Tensor trans = part(o_trans, BC * HW).view(at::kFloat).view({B, C, H, W});
  at::Tensor sorted_ids = part(o_sorted, BCN);
  at::Tensor offsets = part(o_offsets, BCN);
  at::Tensor isect_ids = part(o_isect, capacity);
  at::Tensor ranges = part(o_ranges, BC * tiles * 2).view({BC * tiles, 2});  // zero-filled by pad_kernel
  at::Tensor chunk_state = part(o_chunk, n_chunk).view(at::kFloat);

  if (N > 0) {
    int32_t* ip = state.data_ptr<int32_t>();
    int32_t* sorted_ptr = ip + o_sorted;
    int32_t* offsets_ptr = ip + o_offsets;
    int4* tile_rect = reinterpret_cast<int4*>(ip + o_rect);
    int32_t* tile_counts = ip + o_counts;
    int32_t* depth_vals = ip + o_dvals;
    uint32_t* keys = reinterpret_cast<uint32_t*>(ip + o_keys);
    int32_t* vals = ip + o_vals;
    uint32_t* keys_sorted = reinterpret_cast<uint32_t*>(ip + o_keys_sorted);
    uint64_t* depth_keys = reinterpret_cast<uint64_t*>(ip + o_dkeys);
    uint64_t* depth_keys_sorted = depth_keys + BCN;
    void* temp = ip + o_temp;
    const auto sorted_counts = thrust::make_transform_iterator(thrust::make_counting_iterator<int64_t>(0),
                                                               SortedTileCount{sorted_ptr, tile_counts, int(N)});

    project_kernel<<<blocks_for(BCN, kPerGaussianBlock), kPerGaussianBlock, 0, stream>>>(
        p, means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(), opacities.data_ptr<float>(),
        colors.data_ptr<float>(), viewmats.data_ptr<float>(), Ks.data_ptr<float>(), radii.data_ptr<int32_t>(),
        reinterpret_cast<float2*>(means2d.data_ptr<float>()), conics.data_ptr<float>(),
        colors_eval.data_ptr<float>(), depths.data_ptr<float>(), tile_rect, tile_counts, depth_keys, depth_vals);
    FA_CUDA_CHECK_LAUNCH();
    // 1. Depth sort per image: key = image << 32 | depth bits.
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, bytes_depth, depth_keys, depth_keys_sorted,
                                                   depth_vals, sorted_ptr, int(BCN), 0, depth_end_bit, stream));
    // 2. Tile counts in depth order -> inclusive offsets.
    C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp, bytes_scan, sorted_counts, offsets_ptr, int(BCN),
                                                 stream));
    // 3. Emit tile keys (depth order) into the fixed-capacity buffer; pad the rest with the sentinel.
    emit_kernel<<<blocks_for(BCN, kPerGaussianBlock), kPerGaussianBlock, 0, stream>>>(p, BCN, sorted_ptr, offsets_ptr, tile_counts, tile_rect,
                                                      reinterpret_cast<const float2*>(means2d.data_ptr<float>()),
                                                      conics.data_ptr<float>(), opacities.data_ptr<float>(),
                                                      sentinel, keys, vals);
    FA_CUDA_CHECK_LAUNCH();
    pad_kernel<<<blocks_for(std::max<int64_t>(capacity, BC * tiles)), 256, 0, stream>>>(
        int(capacity), offsets_ptr, BCN, sentinel, keys, vals, BC * tiles,
        reinterpret_cast<int2*>(ranges.data_ptr<int32_t>()));
    FA_CUDA_CHECK_LAUNCH();
    // 4. Stable sort on the tile key only (depth order within a tile is kept).
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, bytes_tile, keys, keys_sorted, vals,
                                                   isect_ids.data_ptr<int32_t>(), int(capacity), 0, tile_end_bit,
                                                   stream));
    tile_ranges_kernel<<<blocks_for(capacity), 256, 0, stream>>>(int(capacity), sentinel, keys_sorted,
                                                                  reinterpret_cast<int2*>(ranges.data_ptr<int32_t>()));
    FA_CUDA_CHECK_LAUNCH();
  } else {
    // No Gaussians: keep every output defined (zero offsets mark no overflow; empty tile ranges).
    radii.zero_();
    ranges.zero_();
  }

  const dim3 grid(p.tiles_x, p.tiles_y, unsigned(BC)), block(kTileSize, kTileSize);
  FwdArgs a;
  a.means2d = reinterpret_cast<const float2*>(means2d.data_ptr<float>());
  a.conics = conics.data_ptr<float>();
  a.opac = opacities.data_ptr<float>();
  a.colors_eval = colors_eval.data_ptr<float>();
  a.depths = depths.data_ptr<float>();
  a.radii = radii.data_ptr<int32_t>();
  a.sorted_ids = sorted_ids.data_ptr<int32_t>();
  a.isect = isect_ids.data_ptr<int32_t>();
  a.ranges = reinterpret_cast<const int2*>(ranges.data_ptr<int32_t>());
  a.offsets = offsets.data_ptr<int32_t>();
  a.bg = has_bg ? backgrounds->data_ptr<float>() : nullptr;
  a.render = render.data_ptr<float>();
  a.alpha = alpha.data_ptr<float>();
  a.depth = depth.data_ptr<float>();
  a.last_ids = last_ids.data_ptr<int32_t>();
  a.trans = trans.data_ptr<float>();
  a.chunk_state = n_chunk > 0 ? chunk_state.data_ptr<float>() : nullptr;
  a.n_slots = chunk_slots(capacity);
  a.part_info = split ? state.data_ptr<int32_t>() + o_part_info : nullptr;
  if (split) {
    const int grid_chunks = backward_chunks(BC, tiles);
    const dim3 grid_parts(p.tiles_x, p.tiles_y, unsigned(BC * grid_chunks));
    for_each_channel_chunk(int(D), [&](auto maxd, int, int) {  // one chunk: D <= 32
      render_fwd_part_kernel<decltype(maxd)::value><<<grid_parts, block, 0, stream>>>(p, a, grid_chunks);
      FA_CUDA_CHECK_LAUNCH();
      render_fwd_combine_kernel<decltype(maxd)::value><<<grid, block, 0, stream>>>(p, a, grid_chunks);
      FA_CUDA_CHECK_LAUNCH();
    });
  } else {
    for_each_channel_chunk(int(D), [&](auto maxd, int off, int nch) {
      render_fwd_kernel<decltype(maxd)::value><<<grid, block, 0, stream>>>(p, off, nch, a);
      FA_CUDA_CHECK_LAUNCH();
    });
  }
  return {render, alpha, depth, radii, means2d, conics, colors_eval, depths, last_ids, trans,
          sorted_ids, isect_ids, ranges, offsets, chunk_state};
}

RasterBwdOut rasterize_bwd_cuda(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                const at::Tensor& opacities, const at::Tensor& colors, const at::Tensor& viewmats,
                                const at::Tensor& Ks, const c10::optional<at::Tensor>& backgrounds, int64_t width,
                                int64_t height, int64_t sh_degree, double near_plane, double far_plane,
                                double eps2d, const at::Tensor& alpha, const at::Tensor& radii,
                                const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors_eval,
                                const at::Tensor& depths, const at::Tensor& last_ids, const at::Tensor& transmittance,
                                const at::Tensor& sorted_ids, const at::Tensor& isect_ids,
                                const at::Tensor& tile_ranges, const at::Tensor& offsets,
                                const at::Tensor& chunk_state, const at::Tensor& grad_render,
                                const c10::optional<at::Tensor>& grad_alpha,
                                const c10::optional<at::Tensor>& grad_depth) {
  const char* op = "flashavatar::rasterize_bwd";
  const int64_t D = rasterize_check_inputs(op, means, quats, scales, opacities, colors, viewmats, Ks, backgrounds,
                                           width, height, sh_degree, /*colors_may_be_shared=*/true);
  FA_CHECK(op, means.scalar_type() == at::kFloat, "the CUDA path computes in float32");
  (void)alpha;
  at::globalContext().alertNotDeterministic("flashavatar::rasterize_bwd (CUDA, uses atomicAdd)");
  const c10::cuda::CUDAGuard guard(means.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(means, colors, viewmats, width, height, sh_degree, near_plane, far_plane, eps2d,
                               isect_ids.size(0));
  const int64_t B = p.B, C = p.C, N = p.N, H = p.H, W = p.W, BCN = B * C * N;
  FA_CHECK(op, grad_render.sizes() == at::IntArrayRef({B, C, H, W, D}), "grad_render must have shape [", B, ", ",
           C, ", ", H, ", ", W, ", ", D, "], got ", sizes_str(grad_render));
  const at::Tensor gr = grad_render.to(at::kFloat).contiguous();
  auto optional_grad = [&](const c10::optional<at::Tensor>& g, const char* name) {
    if (!g.has_value() || !g->defined()) return at::Tensor();  // kernel reads null as zero
    FA_CHECK(op, g->sizes() == at::IntArrayRef({B, C, H, W, 1}), name, " must have shape [", B, ", ", C, ", ", H,
             ", ", W, ", 1], got ", sizes_str(*g));
    return g->to(at::kFloat).contiguous();
  };
  const at::Tensor ga = optional_grad(grad_alpha, "grad_alpha");
  const at::Tensor gd = optional_grad(grad_depth, "grad_depth");
  const auto fopts = means.options();
  const bool sh = sh_degree >= 0;
  // The five gradients are views of one buffer, and the per-image accumulators share a second one; one kernel
  // zero-fills both (host time: one launch instead of six memsets).
  //   grads:   d_means [B,N,3] | d_quats [B,N,4] | d_scales [B,N,3] | d_opac [B,N] | d_colors [B,N,K,D]
  //   scratch: v_geo [BCN, kGeoStride] | (SH only) v_colors [BCN, D]
  const int64_t BN = B * N, n_col = colors.numel();
  at::Tensor grads = at::empty({11 * BN + n_col}, fopts);
  at::Tensor d_means = grads.narrow(0, 0, 3 * BN).view(means.sizes());
  at::Tensor d_quats = grads.narrow(0, 3 * BN, 4 * BN).view(quats.sizes());
  at::Tensor d_scales = grads.narrow(0, 7 * BN, 3 * BN).view(scales.sizes());
  at::Tensor d_opac = grads.narrow(0, 10 * BN, BN).view(opacities.sizes());
  at::Tensor d_colors = grads.narrow(0, 11 * BN, n_col).view(colors.sizes());
  if (N == 0) return {d_means, d_quats, d_scales, d_opac, d_colors};
  const int64_t n_scratch = BCN * (kGeoStride + (sh ? D : 0));
  at::Tensor scratch = at::empty({n_scratch}, fopts);
  zero2_kernel<<<std::min<int64_t>(blocks_for(grads.numel() + n_scratch), 1024), 256, 0, stream>>>(
      grads.data_ptr<float>(), grads.numel(), scratch.data_ptr<float>(), n_scratch);
  FA_CUDA_CHECK_LAUNCH();
  float* v_geo = scratch.data_ptr<float>();
  // Plain colours: the blending kernel accumulates straight into d_colors [B, N, 1, D].
  float* v_colors = sh ? v_geo + BCN * kGeoStride : d_colors.data_ptr<float>();
  const bool has_bg = backgrounds.has_value() && backgrounds->defined();
  const float* bg_ptr = has_bg ? backgrounds->data_ptr<float>() : nullptr;
  // FLASHAVATAR_RAST_BWD selects a previous blend kernel (benchmark comparisons): "block" (per-block sums),
  // "warp" (reduce-scatter, one block per tile); default: reduce-scatter with long lists split over blocks.
  const char* variant = std::getenv("FLASHAVATAR_RAST_BWD");
  const bool block_sums = variant != nullptr && std::string_view(variant) == "block";
  FA_CHECK(op, chunk_state.numel() == 0 ||
                   chunk_state.numel() == chunk_state_numel(B * C, int64_t(p.tiles_x) * p.tiles_y, H, W, D,
                                                            isect_ids.size(0)),
           "chunk_state must be the forward's (", chunk_state.numel(), " elements)");
  const bool split = chunk_state.numel() > 0 && !block_sums && !(variant && std::string_view(variant) == "warp");
  const int64_t tiles = int64_t(p.tiles_x) * p.tiles_y;
  const int grid_chunks = split ? backward_chunks(B * C, tiles) : 1;
  const float* chunk_ptr = split ? chunk_state.data_ptr<float>() : nullptr;
  const dim3 grid(p.tiles_x, p.tiles_y, unsigned(B * C * grid_chunks)), block(kTileSize, kTileSize);
  for_each_channel_chunk(int(D), [&](auto maxd, int off, int nch) {
    constexpr int kMaxD = decltype(maxd)::value;
    if (!block_sums) {
      render_bwd_warp_kernel<kMaxD><<<grid, block, 0, stream>>>(
          p, off, nch, !sh, reinterpret_cast<const float2*>(means2d.data_ptr<float>()), conics.data_ptr<float>(),
          opacities.data_ptr<float>(), colors_eval.data_ptr<float>(), depths.data_ptr<float>(),
          radii.data_ptr<int32_t>(), sorted_ids.data_ptr<int32_t>(), isect_ids.data_ptr<int32_t>(),
          reinterpret_cast<const int2*>(tile_ranges.data_ptr<int32_t>()), offsets.data_ptr<int32_t>(), bg_ptr,
          transmittance.data_ptr<float>(), last_ids.data_ptr<int32_t>(), gr.data_ptr<float>(),
          ga.defined() ? ga.data_ptr<float>() : nullptr, gd.defined() ? gd.data_ptr<float>() : nullptr, v_geo,
          d_opac.data_ptr<float>(), v_colors, chunk_ptr, chunk_slots(isect_ids.size(0)), grid_chunks);
      FA_CUDA_CHECK_LAUNCH();
      return;
    }
    render_bwd_block_kernel<kMaxD><<<grid, block, 0, stream>>>(
        p, off, nch, !sh, reinterpret_cast<const float2*>(means2d.data_ptr<float>()), conics.data_ptr<float>(),
        opacities.data_ptr<float>(), colors_eval.data_ptr<float>(), depths.data_ptr<float>(),
        radii.data_ptr<int32_t>(), sorted_ids.data_ptr<int32_t>(), isect_ids.data_ptr<int32_t>(),
        reinterpret_cast<const int2*>(tile_ranges.data_ptr<int32_t>()), offsets.data_ptr<int32_t>(), bg_ptr,
        transmittance.data_ptr<float>(), last_ids.data_ptr<int32_t>(), gr.data_ptr<float>(),
        ga.defined() ? ga.data_ptr<float>() : nullptr, gd.defined() ? gd.data_ptr<float>() : nullptr, v_geo,
        d_opac.data_ptr<float>(), v_colors);
    FA_CUDA_CHECK_LAUNCH();
  });
  project_bwd_kernel<<<blocks_for(BCN), 256, 0, stream>>>(
      p, means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(), colors.data_ptr<float>(),
      viewmats.data_ptr<float>(), Ks.data_ptr<float>(), radii.data_ptr<int32_t>(), v_geo, sh ? v_colors : nullptr,
      d_means.data_ptr<float>(), d_quats.data_ptr<float>(), d_scales.data_ptr<float>(), d_colors.data_ptr<float>());
  FA_CUDA_CHECK_LAUNCH();
  return {d_means, d_quats, d_scales, d_opac, d_colors};
}

}  // namespace flashavatar
