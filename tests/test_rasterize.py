"""CPU tests of flashavatar.ops.rasterize_gaussians against the dense pure-PyTorch reference."""

import pytest
import torch
from op_checks import assert_op_raises

import flashavatar.ops as ops
from flashavatar.ops import rasterize_gaussians
from flashavatar.ops.reference import rasterize_reference
from raster_scenes import cameras, head_scene, look_at_viewmat

pytestmark = pytest.mark.skipif(not ops.available(), reason="flashavatar._C not built")

W, H = 24, 20


def _scene(n=60, d=3, sh=None, seed=0, cams=3, dtype=torch.float64, scale=0.015, width=W, height=H, bg=False,
           distance=0.3):
    m, q, s, o, c = head_scene(n, d=d, sh_degree=sh, seed=seed, scale=scale, dtype=dtype)
    vm, K = cameras(cams, width, height, distance=distance, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    backgrounds = torch.rand(cams, d, generator=g, dtype=dtype) if bg else None
    return (m, q, s, o, c, vm, K), backgrounds


def _render(args, width=W, height=H, **kw):
    render, alpha, meta = rasterize_gaussians(*args, width, height, **kw)
    return render, alpha, meta["depth"]


@pytest.mark.parametrize(
    "d,sh,bg,seed",
    [(1, None, False, 0), (3, None, True, 1), (8, None, False, 2), (8, None, True, 3), (3, 0, False, 4),
     (3, 1, True, 5), (3, 2, False, 6), (3, 3, True, 7), (5, 3, False, 8)],
)
def test_forward_matches_reference(d, sh, bg, seed):
    args, backgrounds = _scene(d=d, sh=sh, seed=seed, bg=bg)
    out = _render(args, sh_degree=sh, backgrounds=backgrounds)
    ref = rasterize_reference(*args, W, H, sh_degree=sh, backgrounds=backgrounds)
    assert out[1].max() > 0.3, "scene too empty to test anything"
    for name, a, b in zip(("render", "alpha", "depth"), out, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)


def test_forward_float32_close_to_float64():
    args, bg = _scene(d=3, sh=2, seed=11, bg=True)
    out64 = _render(args, sh_degree=2, backgrounds=bg)
    out32 = _render([t.float() for t in args], sh_degree=2, backgrounds=bg.float())
    for a, b in zip(out32, out64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)


def test_dense_scene_saturates_and_matches():
    # Many overlapping Gaussians: exercises the 0.99 clamp and the 1e-4 transmittance stop.
    args, bg = _scene(n=300, d=3, seed=12, scale=0.04, cams=2, bg=True)
    args = list(args)
    args[3] = torch.full_like(args[3], 1.0)  # opacity 1: alpha clamps at 0.99 near centres
    out = _render(args, backgrounds=bg)
    ref = rasterize_reference(*args, W, H, backgrounds=bg)
    assert (out[1] > 0.999).float().mean() > 0.5  # most pixels reach the transmittance stop
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def _vjp_check(args, bg, sh, seed):
    leaves = [t.clone().requires_grad_() for t in args[:5]] + list(args[5:])
    bgl = None if bg is None else bg.clone().requires_grad_()
    g = torch.Generator().manual_seed(seed)
    out = _render(leaves, sh_degree=sh, backgrounds=bgl)
    cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out]
    wrt = leaves[:5] + ([bgl] if bgl is not None else [])
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cots)), wrt)
    ref = rasterize_reference(*leaves, W, H, sh_degree=sh, backgrounds=bgl)
    ref_grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ref, cots)), wrt)
    names = ["means", "quats", "scales", "opacities", "colors", "backgrounds"]
    for name, a, b in zip(names, grads, ref_grads):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)
    assert any(a.abs().max() > 0 for a in grads)


@pytest.mark.parametrize("d,sh,bg,seed", [(3, None, True, 0), (1, None, False, 1), (8, None, True, 2),
                                          (3, 0, False, 3), (3, 1, True, 4), (3, 3, True, 5)])
def test_vjp_matches_reference(d, sh, bg, seed):
    args, backgrounds = _scene(d=d, sh=sh, seed=seed, bg=bg, scale=0.02)
    _vjp_check(args, backgrounds, sh, seed)


def test_vjp_matches_reference_with_saturation():
    args, bg = _scene(n=120, d=3, seed=21, scale=0.03, cams=2, bg=True)
    args = list(args)
    args[3] = 0.6 + 0.4 * args[3]  # many clamped alphas; no gradient may leak through the clamp
    _vjp_check(args, bg, None, 21)


@pytest.mark.parametrize("sh,seed", [(None, 0), (3, 1)])
def test_gradcheck_float64(sh, seed):
    args, bg = _scene(n=20, d=3, sh=sh, seed=seed + 30, cams=2, bg=True, scale=0.025)
    m, q, s, o, c, vm, K = args

    def fn(m, q, s, o, c, bg):
        r, a, meta = rasterize_gaussians(m, q, s, o, c, vm, K, W, H, sh_degree=sh, backgrounds=bg)
        return r, a, meta["depth"]

    inputs = tuple(t.clone().requires_grad_() for t in (m, q, s, o, c, bg))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_noncontiguous_inputs():
    args, bg = _scene(n=16, d=2, seed=40, cams=1, bg=False, scale=0.025)
    m, q, s, o, c, vm, K = args
    # Strided views: every other row of a bigger tensor, and a transposed copy.
    mt = torch.cat([m, m], 1)[:, ::2].clone().requires_grad_()  # contiguous leaf
    sv = s.t().contiguous().t().requires_grad_()  # non-contiguous leaf

    def fn(mm, ss):
        r, a, meta = rasterize_gaussians(mm, q, ss, o, c, vm, K, W, H)
        return r, a

    assert not sv.is_contiguous()
    assert torch.autograd.gradcheck(fn, (mt, sv), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        (m, q, s, o, c, vm, K), bg = _scene(n=12, d=3, seed=50, cams=2, bg=True, dtype=dtype)
        args = (m[None], q[None], s[None], o[None], c[None, :, None], vm[None], K[None], bg[None], 16, 12, -1, 0.01,
                1e10, 0.3, 0)
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and i < 5 else a for i, a in enumerate(args))
        # The raw forward kernel (no autograd), and the differentiable op on batched and unbatched inputs.
        raw = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.flashavatar.rasterize_fwd.default, raw)
        torch.library.opcheck(torch.ops.flashavatar.rasterize.default, args)
        unbatched = (m, q, s, o, c, vm, K, bg, 16, 12, -1, 0.01, 1e10, 0.3, 0)
        unbatched = tuple(a.detach().requires_grad_(i < 5 or i == 7) if isinstance(a, torch.Tensor) else a
                          for i, a in enumerate(unbatched))
        torch.library.opcheck(torch.ops.flashavatar.rasterize.default, unbatched)


def test_batched_equals_separate_calls():
    sets = [_scene(n=30, d=3, sh=1, seed=60 + i, cams=2, bg=True) for i in range(3)]
    stacked = [torch.stack([s[0][j] for s in sets]) for j in range(7)]
    bgs = torch.stack([s[1] for s in sets])
    r, a, meta = rasterize_gaussians(*stacked, W, H, sh_degree=1, backgrounds=bgs)
    assert r.shape == (3, 2, H, W, 3) and meta["radii"].shape == (3, 2, 30)
    for i, (args, bg) in enumerate(sets):
        ri, ai, mi = rasterize_gaussians(*args, W, H, sh_degree=1, backgrounds=bg)
        torch.testing.assert_close(r[i], ri, atol=0, rtol=0)
        torch.testing.assert_close(a[i], ai, atol=0, rtol=0)
        torch.testing.assert_close(meta["depth"][i], mi["depth"], atol=0, rtol=0)
        torch.testing.assert_close(meta["radii"][i], mi["radii"], atol=0, rtol=0)


def test_half_inputs_computed_in_float32():
    (m, q, s, o, c, vm, K), _ = _scene(n=40, d=3, seed=70, cams=2, dtype=torch.float32)
    ref = _render((m, q, s, o, c, vm, K))
    for dt in (torch.float16, torch.bfloat16):
        leaves = [t.to(dt).requires_grad_() for t in (m, q, s, o, c)]
        out = _render(leaves + [vm, K])
        assert out[0].dtype == torch.float32
        want = _render([t.to(dt).float() for t in (m, q, s, o, c)] + [vm, K])
        for x, y in zip(out, want):
            torch.testing.assert_close(x, y)
        assert (ref[0] - out[0]).abs().max() < 0.1
        out[0].sum().backward()
        assert leaves[0].grad.dtype == dt and torch.isfinite(leaves[0].grad.float()).all()


# ---- edge cases --------------------------------------------------------------------------------------

def test_zero_gaussians():
    (m, q, s, o, c, vm, K), bg = _scene(n=5, d=3, seed=80, cams=2, bg=True)
    empty = [t[:0].clone().requires_grad_() for t in (m, q, s, o, c)]
    r, a, meta = rasterize_gaussians(*empty, vm, K, W, H, backgrounds=bg)
    assert r.shape == (2, H, W, 3) and meta["radii"].shape == (2, 0)
    torch.testing.assert_close(r, bg[:, None, None, :].expand_as(r))
    assert (a == 0).all() and (meta["depth"] == 0).all()
    r.sum().backward()
    assert empty[0].grad.shape == (0, 3)


def test_all_behind_camera():
    (m, q, s, o, c, vm, K), _ = _scene(n=30, d=3, seed=81, cams=2)
    behind = m.clone()
    behind[:, 2] -= 3.0  # cameras sit at z ~ -0.6 looking towards +z: these are behind them
    r, a, meta = rasterize_gaussians(behind, q, s, o, c, vm, K, W, H)
    assert (a == 0).all() and (r == 0).all() and (meta["radii"] == 0).all()


def test_straddling_near_plane_and_huge_and_zero_scales():
    # Camera 0 sits at z = -0.6 looking along +z; camera 1 looks from the side.
    vm = torch.stack([look_at_viewmat((0.0, 0.0, -0.6)), look_at_viewmat((0.5, 0.1, -0.3))])
    K = cameras(2, W, H)[1]
    means = torch.tensor([[0.0, 0.0, -0.6 + 0.005], [0.01, 0.0, -0.6 + 0.02], [0.0, 0.01, 0.0],
                          [0.02, -0.01, 0.05], [0.0, 0.0, 0.1]], dtype=torch.float64)
    quats = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    scales = torch.tensor([[0.05, 0.05, 0.05],   # centre in front of the camera but inside near: culled
                           [0.05, 0.04, 0.03],   # straddles the near plane, centre beyond it: kept
                           [2.0, 1.5, 1.0],      # huge: covers the whole screen
                           [0.0, 0.0, 0.0],      # zero scale: only the 0.3 px low-pass remains
                           [0.02, 0.0, 0.01]], dtype=torch.float64)
    opac = torch.tensor([0.9, 0.8, 0.3, 0.9, 0.7], dtype=torch.float64)
    colors = torch.rand(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    args = [means, quats, scales, opac, colors]
    leaves = [t.clone().requires_grad_() for t in args]
    r, a, meta = rasterize_gaussians(*leaves, vm, K, W, H)
    rr, ra, rd = rasterize_reference(*leaves, vm, K, W, H)
    torch.testing.assert_close(r, rr, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(a, ra, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(meta["depth"], rd, atol=1e-10, rtol=1e-9)
    assert meta["radii"][0, 0] == 0 and meta["radii"][0, 1] > 0 and meta["radii"][0, 2] > max(W, H)
    assert (a[:, :, :] > 0.2).all(), "the huge Gaussian should cover every pixel"
    cot = torch.randn(r.shape, dtype=r.dtype, generator=torch.Generator().manual_seed(5))
    g = torch.autograd.grad((r * cot).sum() + a.sum() + meta["depth"].sum(), leaves)
    g_ref = torch.autograd.grad((rr * cot).sum() + ra.sum() + rd.sum(), leaves)
    for name, x, y in zip(("means", "quats", "scales", "opacities", "colors"), g, g_ref):
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x, y, atol=1e-8, rtol=1e-7, msg=name)


def test_non_multiple_size_511x300():
    (m, q, s, o, c, vm, K), bg = _scene(n=12, d=3, seed=90, cams=1, width=511, height=300, scale=0.03, bg=True)
    out = _render((m, q, s, o, c, vm, K), width=511, height=300, backgrounds=bg)
    ref = rasterize_reference(m, q, s, o, c, vm, K, 511, 300, backgrounds=bg)
    assert out[0].shape == (1, 300, 511, 3)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_noncontiguous_inputs_equal_contiguous():
    (m, q, s, o, c, vm, K), bg = _scene(n=40, d=4, seed=91, cams=2, bg=True)
    nc = [torch.stack([t, t], -1)[..., 0] for t in (m, q, s, o, c)]  # same values, strided views
    assert not nc[0].is_contiguous()
    vm_nc = vm.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not vm_nc.is_contiguous()
    out = _render(nc + [vm_nc, K], backgrounds=bg.t().contiguous().t())
    ref = _render((m, q, s, o, c, vm, K), backgrounds=bg)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_many_channels():
    args, bg = _scene(n=30, d=40, seed=92, cams=1, bg=True)
    out = _render(args, backgrounds=bg)
    ref = rasterize_reference(*args, W, H, backgrounds=bg)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


# ---- bad input -------------------------------------------------------------------------------------

def _good():
    (m, q, s, o, c, vm, K), bg = _scene(n=10, d=3, seed=95, cams=2, dtype=torch.float32, bg=True)
    return dict(means=m, quats=q, scales=s, opacities=o, colors=c, viewmats=vm, Ks=K), bg


def _call(kw, bg=None, **extra):
    return rasterize_gaussians(kw["means"], kw["quats"], kw["scales"], kw["opacities"], kw["colors"], kw["viewmats"],
                               kw["Ks"], W, H, backgrounds=bg, **extra)


@pytest.mark.parametrize("name", ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises(name, bad):
    kw, _ = _good()
    kw[name] = kw[name].clone()
    kw[name].view(-1)[3] = bad
    with pytest.raises(ValueError, match=f"{name} .*NaN or inf"):
        _call(kw)


def test_zero_quaternion_raises():
    kw, _ = _good()
    kw["quats"] = kw["quats"].clone()
    kw["quats"][2] = 0
    with pytest.raises(ValueError, match="quats.*zero quaternion"):
        _call(kw)


@pytest.mark.parametrize(
    "name,shape",
    [("means", (10, 4)), ("quats", (10, 3)), ("scales", (9, 3)), ("opacities", (10, 1)), ("colors", (10,)),
     ("viewmats", (2, 3, 4)), ("Ks", (3, 3, 3))],
)
def test_wrong_shape_raises(name, shape):
    kw, _ = _good()
    kw[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=name):
        _call(kw)


def test_wrong_background_and_sh_shapes_raise():
    kw, bg = _good()
    with pytest.raises(ValueError, match=r"backgrounds must have shape \[2, 3\]"):
        _call(kw, bg[:, :2])
    with pytest.raises(ValueError, match="with sh_degree=3 colors"):
        _call(kw, sh_degree=3)
    with pytest.raises(ValueError, match="sh_degree"):
        _call(kw, sh_degree=5)


def test_dtype_and_device_mismatch_raise():
    kw, _ = _good()
    kw2 = dict(kw, quats=kw["quats"].double())
    with pytest.raises(TypeError, match="quats has dtype torch.float64"):
        _call(kw2)
    kw3 = dict(kw, scales=kw["scales"].to("meta"))
    with pytest.raises(ValueError, match="scales is on meta"):
        _call(kw3)
    kw4 = dict(kw, opacities=kw["opacities"].int())
    with pytest.raises(TypeError, match="opacities must be a floating-point"):
        _call(kw4)


def test_op_level_checks_name_argument():
    # In a child process: a C++ exception must come back as a RuntimeError, never crash the test run.
    assert_op_raises(f"""
        m, q, s, o = torch.rand(1, 4, 3), torch.rand(1, 4, 3), torch.rand(1, 4, 3), torch.rand(1, 4)
        c, vm, K = torch.rand(1, 4, 1, 3), torch.eye(4).expand(1, 1, 4, 4).contiguous(), torch.eye(3).expand(1, 1, 3, 3).contiguous()
        torch.ops.flashavatar.rasterize_fwd(m, q, s, o, c, vm, K, None, {W}, {H}, -1, 0.01, 1e10, 0.3, 0)
        """, r"flashavatar::rasterize_fwd: quats must have shape \[1, 4, 4\]")
