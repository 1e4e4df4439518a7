"""Fused SSIM: ``torch.ops.flashavatar.ssim_fwd`` / ``ssim_bwd`` (kernels in ``csrc/ssim/``).

The per-pixel SSIM map of two channel-last image batches (11-tap Gaussian window, reflection padding), the
value ``flashavatar.metrics.ssim_map(blur="conv")`` computes with pads, convolutions and an element-wise chain,
here in one launch forward and one backward (the blurred moments are kept for the backward). Autograd through
``torch.library.register_autograd``; shapes for ``torch.compile`` / fake tensors through ``register_fake``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

__all__ = ["fused_ssim_map", "fused_ssim_supported"]

if _ext.available():

    @torch.library.register_fake("flashavatar::ssim_fwd")
    def _ssim_fwd_fake(pred, gt, sigma, keep_moments):
        N, H, W, C = pred.shape
        return pred.new_empty(N, H, W), (pred.new_empty(5, N, H, W, C) if keep_moments else pred.new_empty(0))

    @torch.library.register_fake("flashavatar::ssim_bwd")
    def _ssim_bwd_fake(grad_map, pred, gt, moments, sigma, need_pred, need_gt):
        return (torch.empty_like(pred) if need_pred else pred.new_empty(0),
                torch.empty_like(gt) if need_gt else gt.new_empty(0))

    def _ssim_setup(ctx, inputs, output):
        pred, gt, sigma, keep_moments = inputs
        ctx.save_for_backward(pred, gt, output[1])
        ctx.sigma = sigma
        ctx.mark_non_differentiable(output[1])

    def _ssim_backward(ctx, grad_map, grad_moments):
        pred, gt, moments = ctx.saved_tensors
        if moments.numel() == 0:
            raise RuntimeError("flashavatar.fused_ssim_map: backward needs the moments: call it with gradients "
                               "enabled (keep_moments=True)")
        need_pred, need_gt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_pred, g_gt = torch.ops.flashavatar.ssim_bwd(grad_map.contiguous(), pred, gt, moments, ctx.sigma,
                                                      need_pred, need_gt)
        return (g_pred if need_pred else None), (g_gt if need_gt else None), None, None

    torch.library.register_autograd("flashavatar::ssim_fwd", _ssim_backward, setup_context=_ssim_setup)


def fused_ssim_supported(pred: Tensor) -> bool:
    """True when :func:`fused_ssim_map` can take ``pred`` ([..., H, W, C], H and W > 5, float32/64) as built."""
    if not _ext.available() or pred.dtype not in (torch.float32, torch.float64) or pred.dim() < 3:
        return False
    if min(pred.shape[-3], pred.shape[-2]) <= 5:
        return False
    return pred.device.type == "cpu" or (pred.device.type == "cuda" and _ext.cuda_compiled())


def fused_ssim_map(pred: Tensor, gt: Tensor, sigma: float = 1.5) -> Tensor:
    """Per-pixel SSIM, mean over channels: ``pred, gt [..., H, W, C]`` -> ``[..., H, W]``.

    Gaussian window of 11 taps (standard deviation ``sigma`` pixels), 'same' padding by reflection, constants
    (0.01, 0.03) for images in [0, 1]: equal to ``metrics.ssim_map(blur="conv")`` up to rounding. H and W must
    exceed 5. Differentiable with respect to both images.
    """
    op = "fused_ssim_map"
    for name, t in (("pred", pred), ("gt", gt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flashavatar.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if pred.shape != gt.shape:
        raise ValueError(f"flashavatar.{op}: pred {list(pred.shape)} and gt {list(gt.shape)} must have the same shape")
    if pred.dim() < 3:
        raise ValueError(f"flashavatar.{op}: pred must have shape [..., H, W, C], got {list(pred.shape)}")
    if pred.dtype != gt.dtype or pred.device != gt.device:
        raise ValueError(f"flashavatar.{op}: pred is {pred.dtype} on {pred.device}, gt is {gt.dtype} on {gt.device}")
    if pred.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"flashavatar.{op}: images must be float32 or float64, got {pred.dtype}")
    if min(pred.shape[-3], pred.shape[-2]) <= 5:
        raise ValueError(f"flashavatar.{op}: images must be at least 6 x 6 pixels (reflection padding of the "
                         f"11-tap window), got {list(pred.shape)}")
    if not sigma > 0:
        raise ValueError(f"flashavatar.{op}: sigma must be positive, got {sigma}")
    _ext.require(op, pred.device)
    lead, (h, w, c) = pred.shape[:-3], pred.shape[-3:]
    keep = torch.is_grad_enabled() and (pred.requires_grad or gt.requires_grad)
    smap, _ = torch.ops.flashavatar.ssim_fwd(pred.reshape(-1, h, w, c), gt.reshape(-1, h, w, c), float(sigma), keep)
    return smap.reshape(*lead, h, w)
