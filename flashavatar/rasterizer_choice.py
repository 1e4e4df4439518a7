"""Which rasteriser training, rendering and benchmarks use.

Always the compiled ``flashavatar.ops.rasterize_gaussians`` (CPU and CUDA kernels): a missing build, or CUDA
tensors with a CPU-only build, is an error that says how to build it. ``FLASHAVATAR_RASTERIZER=reference``
selects the dense pure-PyTorch renderer of ``flashavatar.ops.reference`` instead (slow, memory ~N·H·W per
camera: for checking small scenes by eye, not for training).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .ops import _ext
from .ops.reference import rasterize_reference

_CHOICES = ("ops", "reference")


def batched_reference(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, sh_degree=None,
                      backgrounds=None, near=0.01, far=1e10, eps2d=0.3, **_unused):
    """``rasterize_reference`` with the batch dims of ``rasterize_gaussians``: ``[..., N, ...]`` Gaussians and
    ``[..., C, 4, 4]`` cameras -> ``(render [..., C, H, W, D], alpha [..., C, H, W, 1], {"depth": ...})``."""
    batch = means.shape[:-2]
    flat = lambda t: t.reshape(-1, *t.shape[len(batch):])  # noqa: E731  [..., X] -> [prod(...), X]
    m, q, s, o, c, v, K = (flat(t) for t in (means, quats, scales, opacities, colors, viewmats, Ks))
    bg = flat(backgrounds.expand(*batch, *backgrounds.shape[-2:])) if backgrounds is not None else None
    outs = [rasterize_reference(m[i], q[i], s[i], o[i], c[i], v[i], K[i], width, height, sh_degree=sh_degree,
                                near=near, far=far, eps2d=eps2d, backgrounds=None if bg is None else bg[i])
            for i in range(m.shape[0])]
    render, alpha, depth = (torch.stack(t).reshape(*batch, *t[0].shape) for t in zip(*outs))
    return render, alpha, {"depth": depth}


def pick_rasterizer(device: torch.device | str) -> tuple[str, Callable]:
    """``(name, function)`` of the rasteriser for tensors on ``device`` (signature of SPEC §6)."""
    device = torch.device(device)
    choice = os.environ.get("FLASHAVATAR_RASTERIZER", "ops").strip().lower() or "ops"
    if choice not in _CHOICES:
        raise ValueError(f"FLASHAVATAR_RASTERIZER must be one of {', '.join(_CHOICES)}, got '{choice}'")
    if choice == "reference":
        return "reference", batched_reference
    _ext.require("rasterize_gaussians", device)
    from .ops import rasterize_gaussians

    return "ops", rasterize_gaussians
