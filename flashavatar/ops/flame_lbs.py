"""Posed FLAME vertices in three launches: ``torch.ops.flashavatar.flame_lbs`` (kernels in ``csrc/flame/``).

The per-frame FLAME of :class:`flashavatar.animate.Animator` (vertices restricted to the ones the Gaussians use,
the joint regressor folded into the blendshapes) for the tracker's flat kinematic chain: blendshape coefficients
(6D rotations -> pose features), one GEMM, then skinning and the eyelid blendshapes, one thread per vertex.
Inference only (no autograd); ``register_fake`` gives shapes to ``torch.compile`` and the meta device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

__all__ = ["flame_lbs"]

if _ext.available():

    @torch.library.register_fake("flashavatar::flame_lbs")
    def _flame_lbs_fake(shape, expr, jaw, eyes, eyelids, dirs, base, lbs_weights, eyelid_dirs, use_eyelids):
        return expr.new_empty(expr.shape[0], lbs_weights.shape[0], 3)


def flame_lbs(shape: Tensor, expr: Tensor, jaw: Tensor, eyes: Tensor, eyelids: Tensor, dirs: Tensor, base: Tensor,
              lbs_weights: Tensor, eyelid_dirs: Tensor, use_eyelids: bool = True) -> Tensor:
    """Posed vertices ``[B, U, 3]`` of FLAME's flat chain (global = neck = identity; jaw and eyes under them).

    Args:
        shape: ``[1 or B, S]``; expr: ``[B, E]``; jaw: ``[B, 6]``, eyes: ``[B, 12]`` (6D rotations: first two rows);
            eyelids: ``[B, 2]``.
        dirs: ``[S + E + 36, U*4 + 15]`` blendshapes of the homogeneous vertices and the rest-pose joints
            (shape, expression, then pose features (R - I) of joints 1..4); base: ``[U*4 + 15]``.
        lbs_weights: ``[U, 5]``; eyelid_dirs: ``[2, U*3]``; use_eyelids: add the eyelid blendshapes.
        Every tensor shares one float dtype (float32 or float64) and device.
    """
    op = "flame_lbs"
    tensors = {"shape": shape, "expr": expr, "jaw": jaw, "eyes": eyes, "eyelids": eyelids, "dirs": dirs,
               "base": base, "lbs_weights": lbs_weights, "eyelid_dirs": eyelid_dirs}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flashavatar.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != expr.dtype or t.device != expr.device:
            raise ValueError(f"flashavatar.{op}: {name} is {t.dtype} on {t.device}, expr is {expr.dtype} on "
                             f"{expr.device} (one float dtype and device)")
    if expr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"flashavatar.{op}: inputs must be float32 or float64, got {expr.dtype}")
    if expr.dim() != 2:
        raise ValueError(f"flashavatar.{op}: expr must have shape [B, E], got {list(expr.shape)}")
    B, E = expr.shape
    if shape.dim() != 2 or shape.shape[0] not in (1, B):
        raise ValueError(f"flashavatar.{op}: shape must have shape [1 or {B}, S], got {list(shape.shape)}")
    S = shape.shape[1]
    if lbs_weights.dim() != 2 or lbs_weights.shape[1] != 5:
        raise ValueError(f"flashavatar.{op}: lbs_weights must have shape [U, 5], got {list(lbs_weights.shape)}")
    U = lbs_weights.shape[0]
    for name, t, want in (("jaw", jaw, (B, 6)), ("eyes", eyes, (B, 12)), ("eyelids", eyelids, (B, 2)),
                          ("dirs", dirs, (S + E + 36, 4 * U + 15)), ("base", base, (4 * U + 15,)),
                          ("eyelid_dirs", eyelid_dirs, (2, 3 * U))):
        if tuple(t.shape) != want:
            raise ValueError(f"flashavatar.{op}: {name} must have shape {list(want)}, got {list(t.shape)}")
    _ext.require(op, expr.device)
    return torch.ops.flashavatar.flame_lbs(shape, expr, jaw, eyes, eyelids, dirs, base, lbs_weights, eyelid_dirs,
                                           bool(use_eyelids))
