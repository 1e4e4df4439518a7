"""Renderer choice, plus a dense pure-torch Gaussian rasteriser used when no better one is installed.

:func:`rasterize` has the signature of ``flashavatar.ops.rasterize_gaussians`` (SPEC 6) and picks the
compiled op when ``flashavatar._C`` is built for the tensors' device, else :func:`dense_rasterize` below.
``FLASHAVATAR_RASTERIZER=ops|reference|dense`` forces one (``reference`` = ``flashavatar.ops.reference``).

:func:`dense_rasterize` evaluates every Gaussian at every pixel (no tiles), with the gsplat "classic"
conventions of SPEC 5: EWA Jacobian with gsplat's off-screen clamp, ``eps2d`` low-pass, pixel centres at
``+0.5``, alpha = min(0.99, o exp(-sigma)), alpha < 1/255 skipped, a pixel stops before the Gaussian that
would bring its transmittance to <= 1e-4, near/far culling. Work is done per small tile over only the
Gaussians whose opacity-derived screen box meets the tile, which gives exactly the dense per-pixel result.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from .losses import quat_to_rotmat

# Real spherical-harmonics constants (the 3DGS convention, degree <= 3).
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
       1.445305721320277, -0.5900435899266435)


def eval_sh(degree: int, sh: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Colour from SH coefficients: sh [..., K, D], dirs [..., 3] (unit) -> [..., D], using bands <= degree.

    Returns the raw SH sum; the caller adds 0.5 and clamps at 0 (the 3DGS/gsplat convention).
    """
    out = _C0 * sh[..., 0, :]
    if degree < 1:
        return out
    x, y, z = (dirs[..., i:i + 1] for i in range(3))
    out = out - _C1 * y * sh[..., 1, :] + _C1 * z * sh[..., 2, :] - _C1 * x * sh[..., 3, :]
    if degree < 2:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (out + _C2[0] * xy * sh[..., 4, :] + _C2[1] * yz * sh[..., 5, :]
           + _C2[2] * (2 * zz - xx - yy) * sh[..., 6, :] + _C2[3] * xz * sh[..., 7, :]
           + _C2[4] * (xx - yy) * sh[..., 8, :])
    if degree < 3:
        return out
    return (out + _C3[0] * y * (3 * xx - yy) * sh[..., 9, :] + _C3[1] * xy * z * sh[..., 10, :]
            + _C3[2] * y * (4 * zz - xx - yy) * sh[..., 11, :]
            + _C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12, :]
            + _C3[4] * x * (4 * zz - xx - yy) * sh[..., 13, :] + _C3[5] * z * (xx - yy) * sh[..., 14, :]
            + _C3[6] * x * (xx - 3 * yy) * sh[..., 15, :])


def dense_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
                    sh_degree=None, near=0.01, far=1e10, eps2d=0.3, backgrounds=None, tile_size=4):
    """Pure-torch dense splatting with the SPEC 6 signature.

    means [B?, N, 3], quats [B?, N, 4] (wxyz), scales [B?, N, 3] (std-devs), opacities [B?, N],
    colors [B?, N, D] or SH [B?, N, K, 3] with ``sh_degree``, viewmats [B?, C, 4, 4] world->camera (OpenCV),
    Ks [B?, C, 3, 3]  ->  render [B?, C, H, W, D], alpha [B?, C, H, W, 1], meta {depth [B?, C, H, W, 1],
    radii [B?, C, N]}.
    """
    batched = means.ndim == 3
    if means.shape[-1] != 3 or means.ndim not in (2, 3):
        raise ValueError(f"rasterize: means must be [N, 3] or [B, N, 3], got {tuple(means.shape)}")
    if not batched:
        means, quats, scales, opacities, colors = (t.unsqueeze(0) for t in (means, quats, scales, opacities,
                                                                           colors))
        viewmats, Ks = viewmats.unsqueeze(0), Ks.unsqueeze(0)
        if backgrounds is not None:
            backgrounds = backgrounds.unsqueeze(0)
    b, n = means.shape[:2]
    for name, t, tail in (("quats", quats, (4,)), ("scales", scales, (3,))):
        if t.shape != (b, n) + tail:
            raise ValueError(f"rasterize: {name} must be {(b, n) + tail}, got {tuple(t.shape)}")
    if opacities.shape != (b, n):
        raise ValueError(f"rasterize: opacities must be {(b, n)}, got {tuple(opacities.shape)}")
    if viewmats.ndim != 4 or viewmats.shape[0] != b or viewmats.shape[-2:] != (4, 4):
        raise ValueError(f"rasterize: viewmats must be [B, C, 4, 4] with B={b}, got {tuple(viewmats.shape)}")
    c = viewmats.shape[1]
    if Ks.shape != (b, c, 3, 3):
        raise ValueError(f"rasterize: Ks must be {(b, c, 3, 3)}, got {tuple(Ks.shape)}")

    dtype = torch.float32 if means.dtype in (torch.float16, torch.bfloat16) else means.dtype
    means, quats, scales, opacities, colors, viewmats, Ks = (
        t.to(dtype) for t in (means, quats, scales, opacities, colors, viewmats, Ks))

    rot, trans = viewmats[..., :3, :3], viewmats[..., :3, 3]  # [B, C, 3, 3], [B, C, 3]
    means_c = torch.einsum("bcij,bnj->bcni", rot, means) + trans[:, :, None]  # [B, C, N, 3]
    x, y, z = means_c.unbind(-1)
    valid = (z > near) & (z < far)  # [B, C, N]
    z_safe = torch.where(valid, z, torch.ones_like(z))

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [B, C, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    # gsplat's clamp of x/z, y/z to 1.3x the field of view keeps the Jacobian bounded off screen
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_xp, lim_xn = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_yp, lim_yn = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = z_safe * torch.minimum(lim_xp, torch.maximum(-lim_xn, x / z_safe))
    ty = z_safe * torch.minimum(lim_yp, torch.maximum(-lim_yn, y / z_safe))
    zero = torch.zeros_like(z_safe)
    jac = torch.stack([fx / z_safe, zero, -fx * tx / z_safe**2,
                       zero, fy / z_safe, -fy * ty / z_safe**2], -1).reshape(b, c, n, 2, 3)

    r_g = quat_to_rotmat(quats)  # [B, N, 3, 3]
    m = r_g * scales[:, :, None, :]  # R diag(s)
    cov3 = m @ m.transpose(-1, -2)  # [B, N, 3, 3]
    cov_c = rot[:, :, None] @ cov3[:, None] @ rot[:, :, None].transpose(-1, -2)  # [B, C, N, 3, 3]
    cov2 = jac @ cov_c @ jac.transpose(-1, -2)  # [B, C, N, 2, 2]
    a = cov2[..., 0, 0] + eps2d
    d = cov2[..., 1, 1] + eps2d
    bxy = cov2[..., 0, 1]
    det = a * d - bxy * bxy
    valid = valid & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conic = torch.stack([d / det_safe, -bxy / det_safe, a / det_safe], -1)  # [B, C, N, 3]
    u = fx * x / z_safe + cx  # [B, C, N]
    v = fy * y / z_safe + cy

    # radius (for meta only): 3 sigma of the larger eigenvalue, 0 when culled
    mid = 0.5 * (a + d)
    lam = mid + torch.sqrt((mid * mid - det).clamp_min(0.1))
    radii = torch.where(valid, torch.ceil(3.0 * torch.sqrt(lam)), torch.zeros_like(lam)).to(torch.int32)

    if sh_degree is not None:
        if colors.ndim != 4 or colors.shape[-1] != 3 or colors.shape[-2] < (sh_degree + 1) ** 2:
            raise ValueError(f"rasterize: with sh_degree={sh_degree} colors must be [B, N, K>={(sh_degree + 1) ** 2},"
                             f" 3], got {tuple(colors.shape)}")
        campos = -torch.einsum("bcji,bcj->bci", rot, trans)  # [B, C, 3]
        dirs = F.normalize(means[:, None] - campos[:, :, None], dim=-1)  # [B, C, N, 3]
        feats = (eval_sh(sh_degree, colors[:, None].expand(b, c, n, *colors.shape[-2:]), dirs) + 0.5)
        feats = feats.clamp_min(0.0)  # [B, C, N, 3]
    else:
        if colors.ndim != 3 or colors.shape[1] != n:
            raise ValueError(f"rasterize: colors must be [B, N, D], got {tuple(colors.shape)}")
        feats = colors[:, None].expand(b, c, n, colors.shape[-1])
    depth_feat = z_safe[..., None]

    opac = torch.where(valid, opacities[:, None].expand(b, c, n), torch.zeros_like(z))
    order = torch.argsort(torch.where(valid, z, torch.full_like(z, float("inf"))), dim=-1)  # front to back

    def gather(t):
        return torch.gather(t, 2, order.reshape(b, c, n, *([1] * (t.ndim - 3))).expand_as(t))

    u_s, v_s, opac_s = gather(u), gather(v), gather(opac)
    conic_s, feats_s, depth_s = gather(conic), gather(feats), gather(depth_feat)

    # Screen bounds from the opacity: alpha >= 1/255 needs sigma <= ln(255 o), an ellipse whose axis-aligned
    # half-extents are sqrt(2 ln(255 o) cov2d_xx), sqrt(... cov2d_yy). Every pixel that can receive alpha
    # >= 1/255 from a Gaussian lies in its box, so evaluating per tile only the Gaussians whose box meets the
    # tile gives exactly the dense image (same depth order, same stopping rule).
    with torch.no_grad():
        level = 2.0 * torch.log((255.0 * opac_s).clamp_min(1.0))  # 0 when o <= 1/255 -> empty box
        cxx = gather(a)
        cyy = gather(d)
        ext_x = torch.sqrt(level * cxx) + 1e-3
        ext_y = torch.sqrt(level * cyy) + 1e-3
        live = opac_s * 255.0 > 1.0  # [B, C, N]
        ts = tile_size
        tiles_x, tiles_y = -(-width // ts), -(-height // ts)
        tx0 = torch.arange(tiles_x, device=means.device, dtype=dtype) * ts + 0.5  # first pixel centre of tile
        ty0 = torch.arange(tiles_y, device=means.device, dtype=dtype) * ts + 0.5
        tx1 = (tx0 + ts - 1).clamp_max(width - 0.5)
        ty1 = (ty0 + ts - 1).clamp_max(height - 0.5)
        hit_x = ((u_s + ext_x)[..., None, :] >= tx0[:, None]) & ((u_s - ext_x)[..., None, :] <= tx1[:, None])
        hit_y = ((v_s + ext_y)[..., None, :] >= ty0[:, None]) & ((v_s - ext_y)[..., None, :] <= ty1[:, None])
        hit = (hit_y[..., :, None, :] & hit_x[..., None, :, :]) & live[..., None, None, :]  # [B,C,Ty,Tx,N]
        n_tiles = tiles_y * tiles_x
        hit = hit.reshape(b * c * n_tiles, n)
        counts = hit.sum(-1)  # [BC*T]
        k_max = max(int(counts.max()), 1)
        # indices of the hit Gaussians of each tile, in depth order, padded with misses (alpha forced to 0)
        sel = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True)[:, :k_max]  # [BC*T, K]
        sel_ok = torch.gather(hit, -1, sel)
        # tiles grouped by hit count (powers of two) so that padding to the group's max wastes little work
        bucket = torch.ceil(torch.log2(counts.clamp_min(1).to(torch.float32))).to(torch.int64)
        bucket = torch.where(counts > 0, bucket, torch.full_like(bucket, -1))

    feat_dim = feats_s.shape[-1]
    # every per-Gaussian quantity the pixels need, packed: [BC*N, 6 + D + 1] (u, v, o, conic xx/xy/yy, f, z)
    packed = torch.cat([u_s[..., None], v_s[..., None], opac_s[..., None], conic_s, feats_s, depth_s], -1)
    packed = packed.reshape(b * c * n, -1)

    # pixel centres of every tile: [T, ts*ts] (pixels beyond the image edge are dropped at the end)
    ly, lx = torch.meshgrid(torch.arange(ts, device=means.device, dtype=dtype),
                            torch.arange(ts, device=means.device, dtype=dtype), indexing="ij")
    px = (tx0[None, :, None] + lx.reshape(1, 1, -1)).expand(tiles_y, tiles_x, ts * ts).reshape(-1, ts * ts)
    py = (ty0[:, None, None] + ly.reshape(1, 1, -1)).expand(tiles_y, tiles_x, ts * ts).reshape(-1, ts * ts)

    out = packed.new_zeros(b * c * n_tiles, ts * ts, feat_dim + 2)  # f, depth, alpha per pixel
    for level in torch.unique(bucket).tolist():
        if level < 0:
            continue  # tiles no Gaussian reaches stay empty
        tiles = torch.nonzero(bucket == level).flatten()  # [nt]
        k = min(2**level, k_max)
        idx = sel[tiles, :k] + (tiles // n_tiles * n)[:, None]  # rows of `packed`
        g = packed[idx.reshape(-1)].reshape(len(tiles), k, -1)  # [nt, K, F]
        ok = sel_ok[tiles, :k]
        local = tiles % n_tiles
        dx = px[local][:, :, None] - g[:, None, :, 0]  # [nt, p, K]
        dy = py[local][:, :, None] - g[:, None, :, 1]
        sigma = 0.5 * (g[:, None, :, 3] * dx * dx + g[:, None, :, 5] * dy * dy) + g[:, None, :, 4] * dx * dy
        alpha = torch.clamp_max((g[..., 2] * ok)[:, None, :] * torch.exp(-sigma), 0.99)
        alpha = torch.where((sigma >= 0) & (alpha >= 1.0 / 255.0), alpha, torch.zeros_like(alpha))
        # a pixel stops before the Gaussian whose alpha would bring T to <= 1e-4 (and ignores all after it)
        with torch.no_grad():
            keep = torch.cumprod(1.0 - alpha, dim=-1) > 1e-4
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        t_incl = torch.cumprod(1.0 - alpha, dim=-1)
        t_excl = torch.cat([torch.ones_like(t_incl[..., :1]), t_incl[..., :-1]], -1)
        w = alpha * t_excl  # [nt, p, K]
        shaded = w @ g[..., 6:]  # [nt, p, D + 1]
        out = out.index_copy(0, tiles, torch.cat([shaded, 1.0 - t_incl[..., -1:]], -1))

    def untile(t):  # [BC*T, ts*ts, F] -> [B, C, H, W, F]
        f = t.shape[-1]
        t = t.reshape(b, c, tiles_y, tiles_x, ts, ts, f).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(b, c, tiles_y * ts, tiles_x * ts, f)[:, :, :height, :width]

    out = untile(out)
    rgb, dep, alpha = out[..., :feat_dim], out[..., feat_dim:feat_dim + 1], out[..., feat_dim + 1:]
    if backgrounds is not None:
        rgb = rgb + (1.0 - alpha) * backgrounds.to(dtype)[:, :, None, None, :]
    depth = dep / alpha.clamp_min(1e-10)  # expected depth
    meta = {"depth": depth, "radii": radii, "means2d": torch.stack([u, v], -1), "conics": conic}
    if not batched:
        rgb, alpha = rgb[0], alpha[0]
        meta = {k: t[0] for k, t in meta.items()}
    return rgb, alpha, meta


def _ops_rasterizer(device: torch.device) -> Callable | None:
    try:
        from flashavatar import ops
    except Exception:  # noqa: BLE001  (a broken partial checkout must not stop rendering)
        return None
    fn = getattr(ops, "rasterize_gaussians", None)
    if fn is None or not ops.available():
        return None
    if device.type == "cuda" and not ops.cuda_compiled():
        return None
    return fn


def _reference_rasterizer() -> Callable | None:
    try:
        from flashavatar.ops import reference
    except Exception:  # noqa: BLE001  (absent, or broken in a partial checkout)
        return None
    return getattr(reference, "rasterize_gaussians", None)


def pick_rasterizer(device: torch.device | str) -> tuple[str, Callable]:
    """(name, function) of the rasteriser used for tensors on ``device``."""
    device = torch.device(device)
    forced = os.environ.get("FLASHAVATAR_RASTERIZER", "").strip().lower()
    candidates = {"ops": lambda: _ops_rasterizer(device), "reference": _reference_rasterizer,
                  "dense": lambda: dense_rasterize}
    if forced:
        if forced not in candidates:
            raise ValueError(f"FLASHAVATAR_RASTERIZER must be one of {', '.join(candidates)}, got '{forced}'")
        fn = candidates[forced]()
        if fn is None:
            raise RuntimeError(f"FLASHAVATAR_RASTERIZER={forced}: that rasteriser is not available in this build")
        return forced, fn
    # the pure-torch reference evaluates every pixel against every Gaussian: the tiled stand-in here gives the
    # same image much faster, so it is preferred when the compiled op is missing
    for name in ("ops", "dense"):
        fn = candidates[name]()
        if fn is not None:
            return name, fn
    raise AssertionError("unreachable")


def rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kwargs):
    """``flashavatar.ops.rasterize_gaussians`` if built for this device, else a pure-torch stand-in."""
    _, fn = pick_rasterizer(means.device)
    return fn(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kwargs)


def fov_to_K(fov_deg: float, width: int, height: int) -> torch.Tensor:
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=torch.float32)
