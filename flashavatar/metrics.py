"""Image metrics: PSNR, SSIM (full frame or inside a mask), optional LPIPS.

Images are float tensors in [0, 1], channel-last ``[..., H, W, 3]`` as the rasteriser returns them; masks
are ``[..., H, W]`` or ``[..., H, W, 1]`` with 1 = pixel counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def _mask_hw1(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim == like.ndim - 1:
        mask = mask.unsqueeze(-1)
    if mask.shape[:-1] != like.shape[:-1]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match image of shape {tuple(like.shape)}")
    return mask.to(like.dtype)


def mse(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per image: [..., H, W, C] -> [...]; inside ``mask`` if given."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape")
    err = (pred - gt) ** 2
    m = _mask_hw1(mask, pred)
    if m is None:
        return err.mean(dim=(-3, -2, -1))
    return (err * m).sum(dim=(-3, -2, -1)) / (m.sum(dim=(-3, -2, -1)) * pred.shape[-1]).clamp_min(1.0)


def psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per image (peak 1.0): [..., H, W, C] -> [...]."""
    return -10.0 * torch.log10(mse(pred, gt, mask).clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _blur_matrix(n: int, g: torch.Tensor, mode: str) -> torch.Tensor:
    """``[n, n]`` matrix of the 1-D filter ``g`` (odd length) with 'same' padding by ``mode`` folded in:
    ``M @ v`` equals ``conv1d(pad(v, mode), g)``. Built from device ops alone (no host copy: CUDA-graph safe)."""
    pad = g.numel() // 2
    src = torch.arange(n, device=g.device)[:, None] + torch.arange(g.numel(), device=g.device)[None, :] - pad
    if mode == "reflect":  # PyTorch's reflect leaves the edge sample out: -1 -> 1, n -> n - 2
        src = torch.where(src < 0, -src, src)
        src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    else:  # replicate
        src = src.clamp(0, n - 1)
    onehot = (src[:, :, None] == torch.arange(n, device=g.device)).to(g.dtype)  # [n out, taps, n in]
    return torch.einsum("k,okj->oj", g, onehot)


SSIM_BLURS = ("auto", "fused", "conv", "matmul64")


def ssim_map(pred: torch.Tensor, gt: torch.Tensor, window: int = 11, sigma: float = 1.5,
             blur: str = "auto") -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5, 'same' padding by reflection).

    pred, gt: [..., H, W, C] in [0, 1]  ->  [..., H, W] (mean over channels).
    ``blur``: how the SSIM runs. "fused": the compiled op (``flashavatar.ops.fused_ssim_map``: one kernel
    forward, one backward; window 11, H and W > 5). "auto": "fused" where it applies, else "conv".
    "conv": two 1-D convolutions (the reference formulation). "matmul64": banded ``[H, H]``
    and ``[W, W]`` matrices with the padding folded in, applied as float64 GEMMs (a few large GEMMs instead of
    single-channel convolutions and pads; float64 because the variances below are differences of blurred values,
    E[x^2] - E[x]^2, and a TF32 GEMM's 10-bit mantissa turned them into noise: training diverged). Same values
    up to float32 rounding.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape")
    if blur not in SSIM_BLURS:
        raise ValueError(f"ssim_map: blur must be one of {SSIM_BLURS}, got {blur!r}")
    if blur in ("auto", "fused"):
        from .ops.ssim import fused_ssim_map, fused_ssim_supported  # lazy: metrics stays importable alone

        if window == 11 and fused_ssim_supported(pred):
            return fused_ssim_map(pred, gt, sigma)
        if blur == "fused":
            raise ValueError(f"ssim_map: blur='fused' needs window 11, images of at least 6 x 6 pixels in float32/64 "
                             f"and the compiled extension for {pred.device.type}; got window {window}, "
                             f"{list(pred.shape)} {pred.dtype}")
        blur = "conv"
    lead, (h, w, c) = pred.shape[:-3], pred.shape[-3:]
    x = pred.reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, h, w)  # [B*C, H, W]
    y = gt.reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, h, w)
    g = _gaussian_window(window, sigma, pred.device, pred.dtype)
    pad = window // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    stacked = torch.stack((x, y, x * x, y * y, x * y))  # [5, B*C, H, W]: every blurred quantity in one go
    if blur == "matmul64":
        g64 = g.to(torch.float64)
        rows = _blur_matrix(h, g64, mode)
        cols = rows if w == h else _blur_matrix(w, g64, mode)
        blurred = (rows @ stacked.to(torch.float64) @ cols.t()).to(pred.dtype)
    else:
        t = F.pad(stacked.reshape(-1, 1, h, w), (pad, pad, pad, pad), mode=mode)
        t = F.conv2d(F.conv2d(t, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
        blurred = t.view(stacked.shape)
    mu_x, mu_y, bxx, byy, bxy = blurred.unbind(0)

    c1, c2 = 0.01**2, 0.03**2
    sxx = bxx - mu_x**2
    syy = byy - mu_y**2
    sxy = bxy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.reshape(-1, c, h, w).mean(dim=1).reshape(*lead, h, w)


def ssim(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None, blur: str = "auto") -> torch.Tensor:
    """Mean SSIM per image: [..., H, W, C] -> [...]; averaged over ``mask`` pixels if given (``blur``: see
    :func:`ssim_map`)."""
    s = ssim_map(pred, gt, blur=blur)
    if mask is None:
        return s.mean(dim=(-2, -1))
    m = _mask_hw1(mask, pred)[..., 0]
    return (s * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1)).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- LPIPS

def lpips_weights_available(path: str | None = None) -> bool:
    """LPIPS-VGG runs only from local files: the ``lpips`` package and the torchvision VGG-16 weights."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    if path is not None:
        return Path(path).is_file()
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return any(hub.glob("vgg16-*.pth"))


class LPIPS(torch.nn.Module):
    """LPIPS-VGG from the ``lpips`` package, built only from weights already on disk (never downloaded)."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        if not lpips_weights_available(weights):
            raise RuntimeError(
                "LPIPS-VGG needs the `lpips` package and the VGG-16 weights on disk "
                f"({weights or Path(torch.hub.get_dir()) / 'checkpoints' / 'vgg16-*.pth'}); "
                "they are never downloaded: use the SSIM perceptual term instead (loss.perceptual=ssim)"
            )
        import lpips

        kwargs = {"model_path": weights} if weights else {}
        self.net = lpips.LPIPS(net="vgg", verbose=False, **kwargs).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """[..., H, W, 3] in [0, 1] -> [...]."""
        lead, (h, w, c) = pred.shape[:-3], pred.shape[-3:]
        x = pred.reshape(-1, h, w, c).permute(0, 3, 1, 2) * 2 - 1
        y = gt.reshape(-1, h, w, c).permute(0, 3, 1, 2) * 2 - 1
        return self.net(x, y).reshape(lead)


def fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"
