"""GPU tests of the CUDA rasteriser: equals the CPU path (float64 ground truth, float32 tolerance), large
scenes, long tile lists split over blocks (forward and backward) against the one-block-per-tile kernels, CUDA-graph
capture and replay, batched input, and the intersection-buffer overflow fallback."""

import pytest
import torch

import flashavatar.ops as ops
import flashavatar.ops.rasterize as rast
from flashavatar.ops import rasterize_gaussians
from raster_scenes import cameras, head_scene

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not ops.cuda_compiled(), reason="flashavatar._C built without CUDA kernels")]

DEV = "cuda"


def _scene(n, d=3, sh=None, seed=0, cams=3, width=64, height=48, scale=0.015, distance=0.35, bg=True):
    m, q, s, o, c = head_scene(n, d=d, sh_degree=sh, seed=seed, scale=scale)
    vm, K = cameras(cams, width, height, distance=distance)
    backgrounds = torch.rand(cams, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) if bg else None
    return [m, q, s, o, c, vm, K], backgrounds


def _run(args, bg, width, height, sh, device, dtype, cot=None, grads=True):
    """Forward (+ VJP with cotangents cot) on a device; returns outputs and gradients as float64 CPU tensors."""
    leaves = [t.to(device, dtype).requires_grad_(grads and i < 5) for i, t in enumerate(args)]
    bgl = None if bg is None else bg.to(device, dtype).requires_grad_(grads)
    r, a, meta = rasterize_gaussians(*leaves, width, height, sh_degree=sh, backgrounds=bgl)
    outs = (r, a, meta["depth"])
    g = []
    if grads:
        wrt = leaves[:5] + ([bgl] if bgl is not None else [])
        g = torch.autograd.grad(sum((o * c.to(device, dtype)).sum() for o, c in zip(outs, cot)), wrt)
    f = lambda t: t.detach().double().cpu()  # noqa: E731
    return [f(o) for o in outs], [f(x) for x in g], meta


def _cot(outs_shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in outs_shapes]


def _assert_images_close(a, b, name):
    # float32 vs float64: tiny everywhere, except where a 1/255 or transmittance cut-off flips (rare, bounded).
    diff = (a - b).abs()
    assert diff.mean() < 2e-5, f"{name}: mean abs diff {diff.mean():.3g}"
    assert diff.max() < 1e-2, f"{name}: max abs diff {diff.max():.3g}"


def _assert_grads_close(ga, gb, names, tol=2e-3):
    for name, x, y in zip(names, ga, gb):
        assert torch.isfinite(x).all(), name
        rel = (x - y).norm() / y.norm().clamp_min(1e-12)
        assert rel < tol, f"{name}: relative error {rel:.3g}"


NAMES = ["means", "quats", "scales", "opacities", "colors", "backgrounds"]
BIG_CAPACITY = 1 << 20  # room for every intersection of the scenes below (no overflow)


def _fwd_raw(args, bg, width, height, sh, capacity=BIG_CAPACITY):
    """The raw forward op (one Gaussian set) on the GPU: all 15 outputs, including the tiling and chunk state."""
    m, q, s, o, c, vm, K = (t.to(DEV, torch.float32)[None] for t in args)
    bg = None if bg is None else bg.to(DEV, torch.float32)[None]
    return torch.ops.flashavatar.rasterize_fwd(m, q, s, o, c if sh is not None else c[:, :, None], vm, K, bg, width,
                                               height, -1 if sh is None else sh, 0.01, 1e10, 0.3, capacity)


def _longest_list(out):
    return int((out[12][:, 1] - out[12][:, 0]).max())


def _run_against_cpu(args, bg, width, height, sh, cot, tol):
    """Forward + VJP on the GPU (float32) checked against the float64 CPU path; returns the GPU's images and
    gradients."""
    ref_out, ref_g, _ = _run(args, bg, width, height, sh, "cpu", torch.float64, cot)
    out, g, _ = _run(args, bg, width, height, sh, DEV, torch.float32, cot)
    for name, a, b in zip(("render", "alpha", "depth"), out, ref_out):
        _assert_images_close(a, b, name)
    _assert_grads_close(g, ref_g, NAMES, tol=tol)
    return out, g


@pytest.mark.parametrize("d,sh", [(3, None), (3, 3), (40, None)])
def test_cuda_many_images_without_chunk_state_matches_cpu(d, sh):
    """17 images of 16 x 16 tiles (more than 4096 image-tiles): no chunk state, so the forward is the one-block-
    per-tile kernel (the batched-render path; channel chunks with D = 40) and the backward the unsplit one. The
    last tile column and row are partial (10 and 7 pixels)."""
    W, H, cams = 250, 247, 17
    args, backgrounds = _scene(3000, d=d, sh=sh, seed=5, cams=cams, width=W, height=H, scale=0.02, distance=0.45)
    assert _fwd_raw(args, backgrounds, W, H, sh)[14].numel() == 0  # the chunk state is not kept
    shapes = [(cams, H, W, d), (cams, H, W, 1), (cams, H, W, 1)]
    out, _ = _run_against_cpu(args, backgrounds, W, H, sh, _cot(shapes, 3), tol=5e-3)
    assert out[1].mean() > 0.2


@pytest.mark.parametrize("d,sh,bg", [(1, None, False), (3, None, True), (8, None, True), (3, 0, True),
                                     (3, 1, False), (3, 2, True), (3, 3, True), (40, None, True)])
def test_cuda_matches_cpu_forward_backward(d, sh, bg):
    W, H = 64, 48
    args, backgrounds = _scene(300, d=d, sh=sh, seed=d + (sh or 0), bg=bg)
    shapes = [(3, H, W, d), (3, H, W, 1), (3, H, W, 1)]
    cot = _cot(shapes, 1)
    ref_out, ref_g, _ = _run(args, backgrounds, W, H, sh, "cpu", torch.float64, cot)
    out, g, _ = _run(args, backgrounds, W, H, sh, DEV, torch.float32, cot)
    assert ref_out[1].mean() > 0.2
    for name, a, b in zip(("render", "alpha", "depth"), out, ref_out):
        _assert_images_close(a, b, name)
    _assert_grads_close(g, ref_g, NAMES)


@pytest.mark.parametrize("n,width,height,cams", [(100_000, 256, 256, 1), (100_000, 511, 300, 2)])
def test_cuda_large_scene_matches_cpu(n, width, height, cams):
    args, bg = _scene(n, d=3, seed=7, cams=cams, width=width, height=height, scale=0.004, distance=0.45)
    shapes = [(cams, height, width, 3), (cams, height, width, 1), (cams, height, width, 1)]
    cot = _cot(shapes, 2)
    ref_out, ref_g, _ = _run(args, bg, width, height, None, "cpu", torch.float64, cot)
    out, g, meta = _run(args, bg, width, height, None, DEV, torch.float32, cot)
    assert ref_out[1].mean() > 0.2
    for name, a, b in zip(("render", "alpha", "depth"), out, ref_out):
        _assert_images_close(a, b, name)
    _assert_grads_close(g, ref_g, NAMES, tol=5e-3)


@pytest.mark.parametrize("d,sh,bg", [(3, None, True), (3, 2, False), (40, None, True)])
def test_cuda_long_tile_lists_split_backward(d, sh, bg, monkeypatch):
    # Thousands of faint Gaussians per tile: pixels stay unsaturated through lists of thousands of entries, so
    # the backward splits every list over several blocks (from the forward's chunk state). Against the float64
    # CPU path, and against the unsplit kernel (FLASHAVATAR_RAST_BWD=warp) on the same inputs.
    W, H = 64, 48
    (m, q, s, o, c, vm, K), backgrounds = _scene(5000, d=d, sh=sh, seed=20 + d, cams=2, scale=0.02, bg=bg)
    args = [m, q, s, 0.05 * o, c, vm, K]
    lists = _fwd_raw(args, None, W, H, sh)
    longest = _longest_list(lists)
    assert lists[14].numel() > 0 and longest > 4 * 256, (lists[14].numel(), longest)
    assert int(lists[8].max()) > 2 * 256  # pixels really walk past several chunk boundaries
    cot = _cot([(2, H, W, d), (2, H, W, 1), (2, H, W, 1)], 5)
    _, g = _run_against_cpu(args, backgrounds, W, H, sh, cot, tol=5e-3)
    monkeypatch.setenv("FLASHAVATAR_RAST_BWD", "warp")
    _, g_unsplit, _ = _run(args, backgrounds, W, H, sh, DEV, torch.float32, cot)
    _assert_grads_close(g, g_unsplit, NAMES, tol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Forward split over blocks (default where the chunk state is kept) against the one-block-per-tile kernel
# (FLASHAVATAR_RAST_FWD=single). They agree up to float rounding: the split forms T and the sums as products and
# sums of per-part values, so values differ by ~1e-7 relative, and a pixel whose stop test lands within rounding of
# the 1e-4 cut-off (rare) can stop one contributor earlier or later: then its last_ids differ and its values by up
# to that contributor's weight (< 1e-2).

def _long_scene(kind, n, d=3, sh=None, seed=0, width=64, height=48, bg=True):
    """Two cameras on a head of n Gaussians (scale 0.02): tile lists of thousands of entries. Opacities:
    'faint' 0.005-0.01 (20k Gaussians at 72x40: lists to ~8.6k entries, i.e. 16 parts of 2-3 chunks; ~85% of the
    pixels never stop), 'opaque' 0.9-0.99 (nearly every pixel stops, ~30% beyond the first chunk, up to the 7th),
    'layered' faint (0.01-0.03) in front of z = 0.02 and opaque behind (pixels blend hundreds to thousands of faint
    entries, then stop in chunks 1-9), 'mix' 10% opaque at random (stops in chunks 0-7). The figures come from an
    emulation of the tile lists and walks on the CPU path's projection, over three seeds."""
    (m, q, s, o, c, vm, K), backgrounds = _scene(n, d=d, sh=sh, seed=seed, cams=2, width=width, height=height,
                                                  scale=0.02, bg=bg)
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    faint, opaque = 0.01 + 0.02 * u, 0.9 + 0.09 * u
    o = {"faint": 0.005 + 0.005 * u, "opaque": opaque, "layered": torch.where(m[:, 2] < 0.02, faint, opaque),
         "mix": torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.9, faint, opaque)}[kind]
    return [m, q, s, o, c, vm, K], backgrounds


def _assert_mostly_close(a, b, name, atol, rtol, frac=2e-3, max_abs=2e-2):
    """a == b within atol + rtol |b| except on a fraction <= frac of the entries, and within max_abs everywhere."""
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, (name, a.shape, b.shape)
    off = (a - b).abs() > atol + rtol * b.abs()
    assert off.double().mean() <= frac, (f"{name}: {int(off.sum())} of {off.numel()} differ, e.g. {a[off][:4]} vs "
                                         f"{b[off][:4]}")
    if a.numel():
        assert (a - b).abs().max() < max_abs, f"{name}: max abs diff {(a - b).abs().max():.3g}"


def _read_chunk_state(out, D, width, height, same):
    """What the backward reads of the chunk state: per tile of > 256 entries, for every pixel whose last_ids agree in
    both runs (`same` [C, H, W]) and every boundary b < last, the boundary record (T, depth sum, D colour sums), and
    the pixel's final sums. Returns (records [R, 2 + D], final sums [P, 1 + D])."""
    C, capacity = out[8].shape[1], out[11].numel()
    slots = (capacity + 255) // 256
    cs = out[14].cpu()
    bnd = cs[: slots * 256 * (2 + D)].view(slots, 2 + D, 256)
    fin = cs[slots * 256 * (2 + D):].view(2 + D, C * height * width)
    ranges, last, same = out[12].cpu(), out[8][0].cpu(), same.cpu()
    tx, ty = (width + 15) // 16, (height + 15) // 16
    ly, lx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    recs, fins = [], []
    for img in range(C):
        for t in range(tx * ty):
            start, end = (int(v) for v in ranges[img * tx * ty + t])
            if end - start <= 256:
                continue
            px, py, tid = (lx + (t % tx) * 16).flatten(), (ly + (t // tx) * 16).flatten(), (ly * 16 + lx).flatten()
            keep = (px < width) & (py < height)
            px, py, tid = px[keep], py[keep], tid[keep]
            keep = same[img, py, px]
            px, py, tid = px[keep], py[keep], tid[keep]
            lp = last[img, py, px]
            for b in range(256, end - start, 256):
                recs.append(bnd[(start + b) // 256][:, tid[lp > b]].T)
            fins.append(fin[1:, (img * height + py) * width + px].T)
    return torch.cat(recs), torch.cat(fins)


def _assert_split_matches_single(split, single, D, width, height):
    """Raw forward outputs of the split and the single kernel on the same inputs."""
    for i in (3, 10, 11, 12, 13):  # projection and tiling: the same kernels
        assert torch.equal(split[i], single[i]), i
    same = split[8] == single[8]
    assert (~same).double().mean() <= 2e-3, f"last_ids differ at {int((~same).sum())} pixels"
    for i, name in ((0, "render"), (1, "alpha"), (2, "depth")):
        _assert_mostly_close(split[i], single[i], name, atol=2e-5, rtol=1e-5)
    _assert_mostly_close(split[9], single[9], "transmittance", atol=1e-7, rtol=1e-4)
    rec_s, fin_s = _read_chunk_state(split, D, width, height, same[0])
    rec_1, fin_1 = _read_chunk_state(single, D, width, height, same[0])
    assert rec_s.shape[0] > 0 and fin_s.shape[0] > 0
    _assert_mostly_close(rec_s[:, 0], rec_1[:, 0], "chunk state T", atol=1e-7, rtol=1e-4)
    _assert_mostly_close(rec_s[:, 1:], rec_1[:, 1:], "chunk state sums", atol=2e-5, rtol=1e-4)
    _assert_mostly_close(fin_s, fin_1, "final sums", atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,n,d,sh,bg,width,height", [
    ("faint", 20000, 3, None, True, 72, 40),
    ("faint", 20000, 3, 2, False, 72, 40),
    ("opaque", 5000, 3, None, True, 64, 48),
    ("opaque", 5000, 3, 1, False, 72, 40),
    ("layered", 5000, 3, None, True, 64, 48),
    ("layered", 5000, 3, 3, True, 72, 40),
    ("mix", 5000, 3, None, False, 64, 48),
    ("mix", 5000, 8, None, True, 64, 48),
    ("layered", 5000, 40, None, True, 64, 48),  # D > 32: both fall back to the single kernel
])
def test_cuda_split_forward_matches_single(kind, n, d, sh, bg, width, height, monkeypatch):
    args, backgrounds = _long_scene(kind, n, d=d, sh=sh, seed=30 + d + (sh or 0), width=width, height=height,
                                    bg=bg)
    monkeypatch.setenv("FLASHAVATAR_RAST_FWD", "split")
    split = _fwd_raw(args, backgrounds, width, height, sh)
    monkeypatch.setenv("FLASHAVATAR_RAST_FWD", "single")
    single = _fwd_raw(args, backgrounds, width, height, sh)
    # The scenes are what they claim: chunk state kept, no overflow, long lists, pixels deep into them.
    assert split[14].numel() > 0 and int(split[13][-1]) <= BIG_CAPACITY
    assert _longest_list(split) > (16 if kind == "faint" else 8) * 256, _longest_list(split)
    last, alpha = single[8], single[1][..., 0]
    assert int(last.max()) > 3 * 256, int(last.max())
    if kind == "faint":
        assert (alpha < 0.99).double().mean() > 0.3  # most pixels never stop
    else:  # saturated pixels whose last contributor lies in many different chunks
        assert len(torch.unique(last[alpha > 0.99] // 256)) >= 4
    if d > 32:
        for i in range(14):
            assert torch.equal(split[i], single[i]), i
        return
    _assert_split_matches_single(split, single, d, width, height)


@pytest.mark.parametrize("kind,d,sh,bg", [("layered", 3, None, True), ("mix", 3, 1, False), ("opaque", 3, None, True)])
def test_cuda_split_forward_backward_matches_cpu(kind, d, sh, bg, monkeypatch):
    # Forward + backward with the split forward (and the split backward reading its chunk state) against the float64
    # CPU path, and the gradients against those after the single forward (same backward kernel).
    W, H = 64, 48
    args, backgrounds = _long_scene(kind, 5000, d=d, sh=sh, seed=40 + (sh or 0), bg=bg)
    monkeypatch.setattr(rast, "_FORCE_CAPACITY", BIG_CAPACITY)
    monkeypatch.setenv("FLASHAVATAR_RAST_FWD", "split")
    assert _longest_list(_fwd_raw(args, backgrounds, W, H, sh)) > 8 * 256
    cot = _cot([(2, H, W, d), (2, H, W, 1), (2, H, W, 1)], 6)
    out, g = _run_against_cpu(args, backgrounds, W, H, sh, cot, tol=5e-3)
    monkeypatch.setenv("FLASHAVATAR_RAST_FWD", "single")
    out_1, g_1, _ = _run(args, backgrounds, W, H, sh, DEV, torch.float32, cot)
    for name, a, b in zip(("render", "alpha", "depth"), out, out_1):
        _assert_mostly_close(a, b, name, atol=2e-5, rtol=1e-5)
    _assert_grads_close(g, g_1, NAMES, tol=1e-3)


def test_cuda_split_forward_with_an_overflowed_image(monkeypatch):
    # The first image's intersections fit the buffer (its long lists are split, the chunk state is kept), the
    # second's do not (it walks its whole depth-sorted list in one block). Against the call with room for both.
    W, H, n = 64, 48, 5000
    args, bg = _long_scene("layered", n, seed=50)
    monkeypatch.setenv("FLASHAVATAR_RAST_FWD", "split")
    full = _fwd_raw(args, bg, W, H, None)
    need0, need = int(full[13][n - 1]), int(full[13][-1])  # offsets: inclusive over both images
    cap = (need0 + need) // 2
    assert need0 < cap < need and _longest_list(full) > 8 * 256
    part = _fwd_raw(args, bg, W, H, None, capacity=cap)
    assert part[14].numel() > 0
    for i in (0, 1, 2, 8, 9):  # the first image: the same split walk over the same lists
        assert torch.equal(part[i][:, 0], full[i][:, 0]), i
    # (last_ids of the second image are positions in another list: its depth-sorted Gaussians, not its tiles')
    for i, name in ((0, "render"), (1, "alpha"), (2, "depth"), (9, "transmittance")):
        _assert_mostly_close(part[i], full[i], name, atol=2e-5, rtol=1e-4)
    cot = _cot([(2, H, W, 3), (2, H, W, 1), (2, H, W, 1)], 7)
    monkeypatch.setattr(rast, "_FORCE_CAPACITY", BIG_CAPACITY)
    _, g_full, _ = _run(args, bg, W, H, None, DEV, torch.float32, cot)
    monkeypatch.setattr(rast, "_FORCE_CAPACITY", cap)
    _, g_part, _ = _run(args, bg, W, H, None, DEV, torch.float32, cot)
    _assert_grads_close(g_part, g_full, NAMES, tol=1e-3)


def test_tile_lists_with_large_gaussians():
    """Tile lists of a scene where a few Gaussians span tens of tiles among many small ones (the warp-wide tile
    visit of project and emit hands a warp's (Gaussian, tile) pairs out 32 at a time): every Gaussian appears
    once in exactly as many lists as project counted, each list is in depth order, and the image equals the
    float64 CPU path."""
    W, H = 256, 192  # 16 x 12 tiles
    (m, q, s, o, c, vm, K), bg = _scene(3000, d=3, seed=31, cams=2, width=W, height=H, scale=0.004)
    s = s.clone()
    s[::97] *= 25.0  # ~31 Gaussians with radii of tens to hundreds of pixels
    o = o.clone()
    o[::97] = 0.6
    args = [m, q, s, o, c, vm, K]
    out = _fwd_raw(args, bg, W, H, None)
    n, tiles = m.shape[0], (W // 16) * (H // 16)
    radii, depths, sorted_ids, isect, ranges, offsets = (out[i].cpu() for i in (3, 7, 10, 11, 12, 13))
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))  # [C*N] tiles per Gaussian, depth order
    per_gauss = torch.zeros(2 * n, dtype=torch.long)
    per_gauss[(torch.arange(2 * n) // n) * n + sorted_ids.long()] = counts.long()
    assert int(per_gauss[torch.arange(0, n, 97)].max()) > 32, "no Gaussian spans more than 32 tiles"
    seen = torch.zeros(2 * n, dtype=torch.long)
    flat_depth = depths.reshape(-1)
    for t in range(ranges.shape[0]):
        a, b = int(ranges[t, 0]), int(ranges[t, 1])
        ids = isect[a:b].long()
        assert (ids >= 0).all(), f"tile {t}: padding inside its list"
        assert torch.unique(ids).numel() == ids.numel(), f"tile {t}: a Gaussian listed twice"
        assert (ids // n == t // tiles).all(), f"tile {t}: a Gaussian of another image"
        assert (torch.diff(flat_depth[ids]) >= 0).all(), f"tile {t}: list not in depth order"
        seen[ids] += 1
    torch.testing.assert_close(seen, per_gauss, msg="entries per Gaussian != project's tile count")
    assert int(seen.sum()) == int(offsets[-1])
    assert int((radii.reshape(-1) > 0).sum()) > 0
    ref_out, _, _ = _run(args, bg, W, H, None, "cpu", torch.float64, grads=False)
    gpu_out, _, _ = _run(args, bg, W, H, None, DEV, torch.float32, grads=False)
    for name, x, y in zip(("render", "alpha", "depth"), gpu_out, ref_out):
        _assert_images_close(x, y, name)


def test_forced_overflow_is_exact(monkeypatch):
    W, H = 64, 48
    args, bg = _scene(400, d=3, sh=2, seed=3, cams=3)
    cot = _cot([(3, H, W, 3), (3, H, W, 1), (3, H, W, 1)], 3)
    out, g, meta = _run(args, bg, W, H, 2, DEV, torch.float32, cot)
    need = None
    for cap in (1, 200, 2000):  # everything overflows / the first image fits partly / some images fit
        monkeypatch.setattr(rast, "_FORCE_CAPACITY", cap)
        out_o, g_o, _ = _run(args, bg, W, H, 2, DEV, torch.float32, cot)
        for a, b in zip(out_o, out):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        _assert_grads_close(g_o, g, NAMES, tol=1e-4)
    monkeypatch.setattr(rast, "_FORCE_CAPACITY", None)
    del need


def test_capacity_grows_without_sync():
    W, H = 128, 128
    args, bg = _scene(20_000, d=3, seed=4, cams=4, width=W, height=H, scale=0.006)
    dev = [t.to(DEV, torch.float32) for t in args]
    rast._capacities.clear()
    for _ in range(3):
        r, a, meta = rasterize_gaussians(*dev, W, H, backgrounds=bg.to(DEV, torch.float32))
        torch.cuda.synchronize()
    st = next(iter(rast._capacities.values()))
    out = torch.ops.flashavatar.rasterize_fwd(dev[0][None], dev[1][None], dev[2][None], dev[3][None],
                                              dev[4][None, :, None], dev[5][None], dev[6][None], None, W, H, -1,
                                              0.01, 1e10, 0.3, st.value)
    assert int(out[13][-1]) <= st.value, "capacity did not grow to the need"


def test_batched_equals_separate_calls():
    W, H = 64, 48
    sets = [_scene(300, d=3, sh=1, seed=10 + i, cams=2) for i in range(3)]
    stacked = [torch.stack([s[0][j] for s in sets]).to(DEV, torch.float32).requires_grad_(j < 5) for j in range(7)]
    bgs = torch.stack([s[1] for s in sets]).to(DEV, torch.float32)
    r, a, meta = rasterize_gaussians(*stacked, W, H, sh_degree=1, backgrounds=bgs)
    assert r.shape == (3, 2, H, W, 3)
    cot = torch.randn_like(r)
    gb = torch.autograd.grad((r * cot).sum() + a.sum(), stacked[:5])
    for i, (args, bg) in enumerate(sets):
        leaves = [t.to(DEV, torch.float32).requires_grad_(j < 5) for j, t in enumerate(args)]
        ri, ai, mi = rasterize_gaussians(*leaves, W, H, sh_degree=1, backgrounds=bg.to(DEV, torch.float32))
        torch.testing.assert_close(r[i], ri, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a[i], ai, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(meta["depth"][i], mi["depth"], atol=1e-6, rtol=1e-6)
        gi = torch.autograd.grad((ri * cot[i]).sum() + ai.sum(), leaves[:5])
        for x, y in zip(gb, gi):
            torch.testing.assert_close(x[i], y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sh", [None, 2])
def test_colors_shared_over_the_batch_are_read_in_place(sh):
    """One colour / SH set expanded over the batch (stride 0, as the Animator passes its per-Gaussian SH) gives
    the images and gradients of the same set copied per batch entry; the colour gradient is the sum over the
    batch (through the expand)."""
    W, H, B = 64, 48, 4
    sets = [_scene(300, d=3, sh=sh, seed=20 + i, cams=2) for i in range(B)]
    geo = [torch.stack([s[0][j] for s in sets]).to(DEV, torch.float32).requires_grad_(j < 4) for j in (0, 1, 2, 3)]
    cams = [torch.stack([s[0][j] for s in sets]).to(DEV, torch.float32) for j in (5, 6)]
    base = sets[0][0][4].to(DEV, torch.float32)  # [N, D] or [N, K, D]
    shared = base.clone().requires_grad_(True)
    copied = base.clone().requires_grad_(True)
    expanded = shared.expand(B, *base.shape)
    assert expanded.stride(0) == 0
    outs = []
    for col in (expanded, copied.expand(B, *base.shape).contiguous()):
        r, a, meta = rasterize_gaussians(*geo[:4], col, *cams, W, H, sh_degree=sh)
        outs.append((r, a, meta["depth"]))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert outs[0][1].mean() > 0.2
    g = torch.Generator().manual_seed(3)
    cot = torch.randn(outs[0][0].shape, generator=g).to(DEV)
    grads = [torch.autograd.grad((o[0] * cot).sum() + o[1].sum(), geo[:4] + [leaf])
             for o, leaf in zip(outs, (shared, copied))]
    # The same values summed by atomics in another order: where terms cancel (a quaternion's gradient through the
    # normalisation) single elements differ by up to ~1e-3 relative, so the check is on each gradient's norm.
    for x in grads[0]:
        assert x.abs().max() > 0
    _assert_grads_close([g.double() for g in grads[0]], [g.double() for g in grads[1]], NAMES[:5], tol=1e-4)


@pytest.mark.parametrize("fwd", ["single", "split"])
def test_cuda_graph_capture_and_replay(fwd, monkeypatch):
    monkeypatch.setenv("FLASHAVATAR_RAST_FWD", fwd)
    W, H = 96, 64
    args, bg = _scene(5000, d=3, sh=3, seed=5, cams=2, width=W, height=H, scale=0.008)
    # Lists of up to ~1800 entries: the forward and the backward split them over blocks (chunk state kept).
    lists = _fwd_raw(args, bg, W, H, 3)
    assert lists[14].numel() > 0 and _longest_list(lists) > 4 * 256
    static = [t.to(DEV, torch.float32).requires_grad_(i < 5) for i, t in enumerate(args)]
    bg_s = bg.to(DEV, torch.float32)
    cot = torch.randn(2, H, W, 3, device=DEV)

    def step():
        r, a, meta = rasterize_gaussians(*static, W, H, sh_degree=3, backgrounds=bg_s)
        g = torch.autograd.grad((r * cot).sum() + a.sum() + meta["depth"].sum(), static[:5])
        return (r, a, meta["depth"]) + tuple(g)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: also lets the intersection capacity settle
            step()
            torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        with torch.no_grad():  # new inputs into the static tensors, then replay
            static[0].add_(0.003 * torch.randn(static[0].shape, generator=gen).to(DEV))
            static[3].copy_((static[3] * 0.9 + 0.05).clamp(0, 1))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for x, y in zip(captured[:3], eager[:3]):  # images: same kernels, same inputs
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        # Gradients: equal up to the summation order of the atomics (amplified by cancellation in quats).
        _assert_grads_close(captured[3:], eager[3:], NAMES[:5], tol=1e-4)
        assert captured[1].max() > 0.5


def test_cuda_bad_input_raises():
    args, _ = _scene(50, d=3, seed=6, cams=1)
    dev = [t.to(DEV, torch.float32) for t in args]
    dev[2] = dev[2].clone()
    dev[2][4, 1] = float("nan")
    with pytest.raises(ValueError, match="scales .*NaN or inf"):
        rasterize_gaussians(*dev, 32, 32)
    dev2 = [t.to(DEV, torch.float32) for t in args]
    dev2[6] = dev2[6].cpu()
    with pytest.raises(ValueError, match="Ks is on cpu"):
        rasterize_gaussians(*dev2, 32, 32)


def test_cuda_zero_gaussians_and_behind_camera():
    args, bg = _scene(30, d=3, seed=8, cams=2)
    dev = [t.to(DEV, torch.float32) for t in args]
    empty = [t[:0].requires_grad_() for t in dev[:5]]
    r, a, meta = rasterize_gaussians(*empty, dev[5], dev[6], 40, 30, backgrounds=bg.to(DEV, torch.float32))
    torch.testing.assert_close(r, bg.to(DEV, torch.float32)[:, None, None].expand_as(r))
    r.sum().backward()
    behind = dev[0].clone()
    behind[:, 2] -= 3.0
    r, a, meta = rasterize_gaussians(behind, *dev[1:], 40, 30)
    assert (a == 0).all() and (meta["radii"] == 0).all()
