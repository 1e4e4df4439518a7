"""Training losses (SPEC 4): Huber image terms, perceptual term, Wasserstein temporal term, EMD term.

The squared 2-Wasserstein distance and the EMD are the package's own ops (``flashavatar.ops``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import metrics, ops


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


def ssim_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None,
              blur: str = "auto") -> torch.Tensor:
    """1 - SSIM, averaged over images (and over ``mask`` pixels); ``blur``: see :func:`metrics.ssim_map`."""
    return (1.0 - metrics.ssim(pred, gt, mask, blur=blur)).mean()


# ------------------------------------------------------------------------------------------- transport

def wasserstein_temporal(state0: dict[str, torch.Tensor], state1: dict[str, torch.Tensor],
                         unit_scale: float = 1000.0) -> torch.Tensor:
    """Mean squared W2 between each Gaussian's residual state at t-1 and t (same index, no assignment).

    state: {"means": [P, N, 3], "scales": [P, N, 3] (std-devs), "quats": [P, N, 4]} in metres;
    ``unit_scale`` converts to millimetres so the Bures term sits far above float precision.
    """
    k = unit_scale
    w2 = ops.gaussian_w2_from_scales_quats(state0["means"] * k, state0["scales"] * k, state0["quats"],
                                       state1["means"] * k, state1["scales"] * k, state1["quats"])
    return w2.mean()


def emd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact EMD per point (p = 2, uniform weights summing to 1, so already a mean): x [B, N, d], y [B, M, d] -> [B]."""
    return ops.emd(x, y, p=2)
