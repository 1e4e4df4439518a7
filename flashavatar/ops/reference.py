"""Pure-PyTorch reference implementations of flashavatar's ops, simple enough to trust.

Slow on purpose (dense, no tiling; general linear algebra such as eigendecompositions and dense cost matrices
where the compiled kernels use closed forms and specialised solvers). They exist for tests and for readers;
the compiled ops must match them.
"""

from __future__ import annotations

# ---- rasterizer reference ----
import torch
from torch import Tensor

_ALPHA_THRESHOLD = 1.0 / 255.0
_MAX_ALPHA = 0.99
_MIN_TRANSMITTANCE = 1e-4


def _quat_to_rotmat(quats: Tensor) -> Tensor:
    """[N, 4] (w, x, y, z), any norm -> [N, 3, 3]."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quats.shape[:-1], 3, 3)


def _sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis of unit directions [N, 3] -> [N, (degree+1)^2], gsplat's convention."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.2820947917738781)]
    if degree >= 1:
        out += [-0.48860251190292 * y, 0.48860251190292 * z, -0.48860251190292 * x]
    if degree >= 2:
        z2, fc1, fs1 = z * z, x * x - y * y, 2 * x * y
        out += [
            0.5462742152960395 * fs1,
            -1.092548430592079 * z * y,
            0.9461746957575601 * z2 - 0.3153915652525201,
            -1.092548430592079 * z * x,
            0.5462742152960395 * fc1,
        ]
    if degree >= 3:
        tc = -2.285228997322329 * z2 + 0.4570457994644658
        tb = 1.445305721320277 * z
        fc2, fs2 = x * fc1 - y * fs1, x * fs1 + y * fc1
        out += [
            -0.5900435899266435 * fs2,
            tb * fs1,
            tc * y,
            z * (1.865881662950577 * z2 - 1.119528997770346),
            tc * x,
            tb * fc1,
            -0.5900435899266435 * fc2,
        ]
    return torch.stack(out, dim=-1)


def _render_one_camera(means, quats, scales, opacities, colors, viewmat, K, width, height, sh_degree, near, far,
                       eps2d, background):
    """One image: every Gaussian evaluated at every pixel. Returns render [H,W,D], alpha [H,W,1], depth [H,W,1]."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    pc = means @ R.T + t  # [N, 3] camera space
    x, y, z = pc.unbind(-1)
    M = _quat_to_rotmat(quats) * scales[:, None, :]  # R(q) diag(s)
    cov_c = R @ (M @ M.transpose(-1, -2)) @ R.T  # [N, 3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    # EWA Jacobian with x/z, y/z clamped to 1.3x the field of view (gsplat's convention).
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    tx = z * torch.clamp(x / z, min=-(cx / fx + 0.3 * tan_fovx), max=(width - cx) / fx + 0.3 * tan_fovx)
    ty = z * torch.clamp(y / z, min=-(cy / fy + 0.3 * tan_fovy), max=(height - cy) / fy + 0.3 * tan_fovy)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / z**2, zero, fy / z, -fy * ty / z**2], -1).reshape(-1, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=means.dtype, device=means.device)
    det = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    valid = (z >= near) & (z <= far) & (det > 0)
    safe_det = torch.where(valid, det, torch.ones_like(det))
    conic_a, conic_b, conic_c = cov2d[:, 1, 1] / safe_det, -cov2d[:, 0, 1] / safe_det, cov2d[:, 0, 0] / safe_det
    mean2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)  # [N, 2]

    if sh_degree is None:
        rgb = colors  # [N, D]
    else:
        campos = -R.T @ t
        dirs = torch.nn.functional.normalize(means - campos, dim=-1)
        nb = (sh_degree + 1) ** 2
        rgb = torch.clamp_min((_sh_basis(sh_degree, dirs)[:, :, None] * colors[:, :nb]).sum(1) + 0.5, 0.0)

    # Front-to-back order: stable sort by depth, culled Gaussians last (and masked out below).
    order = torch.sort(torch.where(valid, z, torch.full_like(z, float("inf"))).detach(), stable=True).indices
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means.dtype, device=means.device) + 0.5,
                            torch.arange(width, dtype=means.dtype, device=means.device) + 0.5, indexing="ij")
    dx = xs.reshape(-1, 1) - mean2d[order, 0]  # [P, N]
    dy = ys.reshape(-1, 1) - mean2d[order, 1]
    sigma = 0.5 * (conic_a[order] * dx * dx + conic_c[order] * dy * dy) + conic_b[order] * dx * dy
    alpha = torch.clamp(opacities[order] * torch.exp(-sigma), max=_MAX_ALPHA)
    alpha = torch.where(valid[order] & (alpha >= _ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
    # A pixel stops before the Gaussian that would bring its transmittance to <= 1e-4; since the running
    # product only decreases, "kept" is exactly "transmittance after it is still > 1e-4".
    with torch.no_grad():
        keep = torch.cumprod(1 - alpha, dim=1) > _MIN_TRANSMITTANCE
    alpha = alpha * keep
    trans_after = torch.cumprod(1 - alpha, dim=1)
    trans_before = torch.cat([torch.ones_like(trans_after[:, :1]), trans_after[:, :-1]], dim=1)
    weights = alpha * trans_before  # [P, N]
    t_final = trans_after[:, -1:] if trans_after.shape[1] else torch.ones_like(xs.reshape(-1, 1))
    render = weights @ rgb[order]
    if background is not None:
        render = render + t_final * background
    depth = weights @ z[order][:, None]
    return (render.reshape(height, width, -1), (1 - t_final).reshape(height, width, 1),
            depth.reshape(height, width, 1))


def rasterize_reference(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                        viewmats: Tensor, Ks: Tensor, width: int, height: int, *, sh_degree: int | None = None,
                        near: float = 0.01, far: float = 1e10, eps2d: float = 0.3,
                        backgrounds: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Dense reference of ``flashavatar.ops.rasterize_gaussians`` (no batch dimension).

    means [N,3], quats [N,4], scales [N,3], opacities [N], colors [N,D] (or SH [N,K,D] with sh_degree),
    viewmats [C,4,4], Ks [C,3,3], backgrounds [C,D] -> render [C,H,W,D], alpha [C,H,W,1],
    depth [C,H,W,1] (sum of w_i z_i, not normalised). Differentiable by autograd.
    """
    outs = [
        _render_one_camera(means, quats, scales, opacities, colors, viewmats[c], Ks[c], width, height, sh_degree,
                           near, far, eps2d, None if backgrounds is None else backgrounds[c])
        for c in range(viewmats.shape[0])
    ]
    return tuple(torch.stack(o, 0) for o in zip(*outs))  # type: ignore[return-value]


# ---- emd reference ----


def gaussian_w2_reference(mu0: torch.Tensor, cov0: torch.Tensor, mu1: torch.Tensor, cov1: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance via symmetric eigendecompositions (float64).

    ``|mu0 - mu1|^2 + tr cov0 + tr cov1 - 2 tr (cov0^1/2 cov1 cov0^1/2)^1/2``.
    mu ``[..., 3]``, cov ``[..., 3, 3]`` -> ``[...]``. Forward only: eigenvector gradients are unstable at
    repeated eigenvalues, which is why the kernel does not use this formula.
    """
    mu0, cov0, mu1, cov1 = (t.double() for t in (mu0, cov0, mu1, cov1))
    cov0 = 0.5 * (cov0 + cov0.transpose(-1, -2))
    cov1 = 0.5 * (cov1 + cov1.transpose(-1, -2))
    lam0, vec0 = torch.linalg.eigh(cov0)
    root0 = vec0 @ torch.diag_embed(lam0.clamp_min(0).sqrt()) @ vec0.transpose(-1, -2)
    middle = root0 @ cov1 @ root0
    middle = 0.5 * (middle + middle.transpose(-1, -2))
    bures = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum(-1)
    tr = torch.diagonal(cov0, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1)
    return ((mu0 - mu1) ** 2).sum(-1) + (tr - 2 * bures).clamp_min(0)


def quat_to_rotmat_reference(quats: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (w, x, y, z), any norm -> rotation matrices ``[..., 3, 3]``."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(*quats.shape[:-1], 3, 3)


def covariance_from_scales_quats_reference(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """``cov = R diag(scales^2) R^T``; scales ``[..., 3]`` (std-devs), quats ``[..., 4]`` -> ``[..., 3, 3]``."""
    rot = quat_to_rotmat_reference(quats)
    return rot @ torch.diag_embed(scales * scales) @ rot.transpose(-1, -2)


def emd_cost_reference(x: torch.Tensor, y: torch.Tensor, plan: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``sum_ij plan_ij |x_i - y_j|^p`` in float64; x ``[N, d]``, y ``[M, d]``, plan ``[N, M]`` -> scalar."""
    dist = (x.double()[:, None, :] - y.double()[None, :, :]).norm(dim=-1)  # [N, M], not cdist's mm form
    return (plan.double() * dist**p).sum()


def emd_bruteforce_reference(x: torch.Tensor, y: torch.Tensor, p: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact uniform-weight EMD by enumerating every permutation (N = M <= 8): cost, assignment ``[N]``.

    ``min_sigma (1/N) sum_i |x_i - y_sigma(i)|^p``; x, y ``[N, d]``.
    """
    import itertools

    n = x.shape[0]
    if y.shape[0] != n or n > 8:
        raise ValueError(f"emd_bruteforce_reference: needs N = M <= 8, got x {list(x.shape)}, y {list(y.shape)}")
    cost = (x.double()[:, None, :] - y.double()[None, :, :]).norm(dim=-1) ** p
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)  # [N!, N]
    totals = cost[torch.arange(n), perms].sum(-1)  # [N!]
    best = int(totals.argmin())
    return totals[best] / n, perms[best]


# ---- assembly reference ----
def gaussian_assembly_reference(verts: torch.Tensor, faces: torch.Tensor, barycentrics: torch.Tensor,
                                rotation: torch.Tensor, log_scale: torch.Tensor, raw: torch.Tensor,
                                offset_scale: float = 1.0, parity: bool = False):
    """``flashavatar.ops.gaussian_assembly`` in plain torch, written as ``GaussianAvatar.forward`` writes it:
    ``verts [B, V, 3]``, ``faces [N, 3]``, ``barycentrics [N, 3]``, ``rotation [N, 4]``, ``log_scale [N, 3]``,
    ``raw [B, N, 10]`` -> ``(means, quats, scales, local_quats)``."""
    from ..model.camera import matrix_to_quat, quat_multiply  # lazy: keeps ops importable on its own

    tri = verts[:, faces]  # [B, N, 3 corners, 3]
    means = (tri * barycentrics[None, :, :, None]).sum(2) + offset_scale * raw[..., :3]
    q_delta = torch.cat((torch.exp(raw[..., 3:4]), raw[..., 4:7]), dim=-1)
    q_delta = q_delta / q_delta.norm(dim=-1, keepdim=True)
    q_local = quat_multiply(rotation / rotation.norm(dim=-1, keepdim=True).clamp_min(1e-12), q_delta)
    if parity:
        return means, q_local, torch.exp(log_scale * torch.exp(raw[..., 7:10])), q_local
    e1 = tri[:, :, 1] - tri[:, :, 0]
    n = torch.cross(e1, tri[:, :, 2] - tri[:, :, 0], dim=-1)
    e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    frame = matrix_to_quat(torch.stack((e1, torch.cross(n, e1, dim=-1), n), dim=-1))  # columns e1, n x e1, n
    return means, quat_multiply(frame, q_local), torch.exp(log_scale + raw[..., 7:10]), q_local


def ssim_map_reference(pred: torch.Tensor, gt: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """SSIM map of the fused op in pure PyTorch: ``metrics.ssim_map(blur="conv")`` (reflection pad, two 1-D
    Gaussian convolutions, the closed form per pixel). ``pred, gt [..., H, W, C]`` -> ``[..., H, W]``."""
    from .. import metrics  # lazy: metrics imports the ops package for its fused path

    return metrics.ssim_map(pred, gt, sigma=sigma, blur="conv")


# ---- fused MLP reference ----
def fused_mlp_reference(h_pe: Tensor, cond: Tensor, w_hidden: Tensor, b_hidden: Tensor, w_out: Tensor,
                        b_out: Tensor) -> Tensor:
    """``[B, N, O]`` float32: what ``flashavatar.ops.fused_mlp`` computes, layer by layer in float32 with the
    activations rounded to the input dtype after every layer (``h_pe [N, H]``, ``cond [B, H]``,
    ``w_hidden [L, H, H]``, ``b_hidden [L, H]``, ``w_out [O, H]``, ``b_out [O]``)."""
    dt, f32 = h_pe.dtype, torch.float32
    h = torch.relu(h_pe.to(f32)[None] + cond.to(f32)[:, None]).to(dt)  # [B, N, H]
    for w, b in zip(w_hidden, b_hidden):
        h = torch.relu(h.to(f32) @ w.to(f32).T + b).to(dt)
    return h.to(f32) @ w_out.to(f32).T + b_out


def mlp_input_reference(h_pe: Tensor, cond: Tensor) -> Tensor:
    """``[B, N, H]``: what ``flashavatar.ops.mlp_input`` computes (``h_pe [N, H]``, ``cond [B, H]``)."""
    return torch.relu(h_pe.float()[None] + cond.float()[:, None]).to(h_pe.dtype)


def mlp_head_reference(h: Tensor, w: Tensor, b: Tensor, apply_tanh: bool = False) -> Tensor:
    """``[R, O]`` float32: what ``flashavatar.ops.mlp_head`` computes (``h [R, H]``, ``w [O, H]``, ``b [O]``)."""
    out = h.float() @ w.float().T + b
    return torch.tanh(out) if apply_tanh else out
