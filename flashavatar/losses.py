"""Training losses (SPEC 4): Huber image terms, perceptual term, Wasserstein temporal term, EMD term.

The squared 2-Wasserstein distance and the EMD come from ``flashavatar.ops`` when the compiled extension
provides them; otherwise small pure-torch stand-ins below are used (same names and conventions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import metrics


def huber(pred: torch.Tensor, gt: torch.Tensor, delta: float = 0.1,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Huber loss (quadratic below ``delta``) over all elements.

    With ``mask`` ([..., H, W] or [..., H, W, 1]) only masked pixels contribute but the mean is still over
    the whole image, as FlashAvatar's ``huber(image * mouth, gt * mouth)``: a small region weighs in
    proportion to its area, which is what the 40x mouth weight is tuned for.
    """
    if mask is None:
        return F.huber_loss(pred, gt, delta=delta)
    if mask.ndim == pred.ndim - 1:
        mask = mask.unsqueeze(-1)
    mask = mask.to(pred.dtype)
    return F.huber_loss(pred * mask, gt * mask, delta=delta)


def ssim_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - SSIM, averaged over images (and over ``mask`` pixels)."""
    return (1.0 - metrics.ssim(pred, gt, mask)).mean()


# ------------------------------------------------------------------------------------------- geometry

def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """[..., 4] (w, x, y, z; normalised here) -> [..., 3, 3]."""
    q = F.normalize(quats, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)


def _sqrt_psd_trace(m: torch.Tensor) -> torch.Tensor:
    """Tr(M^1/2) for symmetric PSD [..., 3, 3] from eigenvalues only (no eigenvector gradients).

    ``eigvalsh``'s backward is V diag(g) V^T; with g = 1/(2 sqrt(lambda)) equal on equal eigenvalues this is
    well defined on isotropic Gaussians. The clamp keeps sqrt's slope finite at 0.
    """
    lam = torch.linalg.eigvalsh(0.5 * (m + m.transpose(-1, -2)))
    return lam.clamp_min(1e-12).sqrt().sum(-1)


def gaussian_w2_torch(mu0, cov0, mu1, cov1, sqrt_cov0=None) -> torch.Tensor:
    """Squared W2 between Gaussians: |mu0-mu1|^2 + Tr S0 + Tr S1 - 2 Tr (S0^1/2 S1 S0^1/2)^1/2.

    mu: [..., 3], cov: [..., 3, 3] -> [...]. ``sqrt_cov0`` ([..., 3, 3]) skips a matrix square root.
    """
    if sqrt_cov0 is None:
        lam, vec = torch.linalg.eigh(cov0.detach())
        sqrt_cov0 = vec @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ vec.transpose(-1, -2)
    cross = sqrt_cov0 @ cov1 @ sqrt_cov0
    bures = cov0.diagonal(dim1=-2, dim2=-1).sum(-1) + cov1.diagonal(dim1=-2, dim2=-1).sum(-1) \
        - 2.0 * _sqrt_psd_trace(cross)
    return ((mu0 - mu1) ** 2).sum(-1) + bures.clamp_min(0.0)


def gaussian_w2_from_scales_quats_torch(mu0, scales0, quats0, mu1, scales1, quats1) -> torch.Tensor:
    """Squared W2 with Sigma = R diag(s^2) R^T; scales are std-devs. [..., 3], [..., 3], [..., 4] -> [...]."""
    r0, r1 = quat_to_rotmat(quats0), quat_to_rotmat(quats1)
    cov0 = r0 @ torch.diag_embed(scales0**2) @ r0.transpose(-1, -2)
    cov1 = r1 @ torch.diag_embed(scales1**2) @ r1.transpose(-1, -2)
    sqrt_cov0 = r0 @ torch.diag_embed(scales0) @ r0.transpose(-1, -2)  # exact, differentiable
    return gaussian_w2_torch(mu0, cov0, mu1, cov1, sqrt_cov0=sqrt_cov0)


def _ops():
    try:
        from flashavatar import ops
    except Exception:  # noqa: BLE001  (absent or broken: use the pure-torch versions)
        return None
    return ops


def gaussian_w2_from_scales_quats(mu0, scales0, quats0, mu1, scales1, quats1) -> torch.Tensor:
    """The package op when it is built for this device, else the pure-torch version."""
    ops = _ops()
    fn = getattr(ops, "gaussian_w2_from_scales_quats", None) if ops is not None else None
    if fn is not None and ops.available() and (mu0.device.type == "cpu" or ops.cuda_compiled()):
        return fn(mu0, scales0, quats0, mu1, scales1, quats1)
    return gaussian_w2_from_scales_quats_torch(mu0, scales0, quats0, mu1, scales1, quats1)


def wasserstein_temporal(state0: dict[str, torch.Tensor], state1: dict[str, torch.Tensor],
                         unit_scale: float = 1000.0) -> torch.Tensor:
    """Mean squared W2 between each Gaussian's residual state at t-1 and t (same index, no assignment).

    state: {"means": [P, N, 3], "scales": [P, N, 3] (std-devs), "quats": [P, N, 4]} in metres;
    ``unit_scale`` converts to millimetres so the Bures term sits far above float precision.
    """
    k = unit_scale
    w2 = gaussian_w2_from_scales_quats(state0["means"] * k, state0["scales"] * k, state0["quats"],
                                       state1["means"] * k, state1["scales"] * k, state1["quats"])
    return w2.mean()


def emd_torch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact EMD (p = 2, uniform weights) for equal-size sets: x, y [B, N, d] -> mean cost per point [B].

    With equal sizes and uniform weights the optimal plan is a permutation, found by the Hungarian algorithm
    on detached costs (scipy); the cost is then differentiable in x and y.
    """
    from scipy.optimize import linear_sum_assignment

    if x.shape != y.shape:
        raise ValueError(f"emd_torch: x {tuple(x.shape)} and y {tuple(y.shape)} must have equal shapes")
    cost = torch.cdist(x.detach().double(), y.detach().double()) ** 2  # [B, N, N]
    out = []
    for b in range(x.shape[0]):
        _, cols = linear_sum_assignment(cost[b].cpu().numpy())
        cols = torch.as_tensor(cols, device=x.device)
        out.append(((x[b] - y[b, cols]) ** 2).sum(-1).mean())
    return torch.stack(out)


def emd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EMD per point (p = 2) [B]: the package op when available, else :func:`emd_torch`."""
    ops = _ops()
    fn = getattr(ops, "emd", None) if ops is not None else None
    if fn is not None and ops.available() and (x.device.type == "cpu" or ops.cuda_compiled()):
        return fn(x, y, p=2)  # uniform weights summing to 1 (POT convention): already a mean
    return emd_torch(x, y)
