"""Fused Gaussian assembly: the Gaussians of a mesh-attached avatar from the posed mesh and the MLP outputs.

Thin wrapper over ``torch.ops.flashavatar.gaussian_assembly`` (kernels in ``csrc/assembly/``): one thread per
(frame, Gaussian) computes what ``GaussianAvatar.forward`` computes with ~50 tensor ops (surface point, offset,
rotation delta, triangle-frame quaternion, products, scales). Autograd is attached with
``torch.library.register_autograd`` and shapes for ``torch.compile`` / fake tensors with ``register_fake``.
``flashavatar.ops.reference.gaussian_assembly_reference`` is the pure-torch version the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

__all__ = ["gaussian_assembly"]


if _ext.available():

    @torch.library.register_fake("flashavatar::gaussian_assembly")
    def _assembly_fake(verts, faces, barycentrics, rotation, log_scale, raw, offset_scale, parity):
        B, N = raw.shape[0], raw.shape[1]
        return (verts.new_empty(B, N, 3), verts.new_empty(B, N, 4), verts.new_empty(B, N, 3),
                verts.new_empty(B, N, 4))

    @torch.library.register_fake("flashavatar::gaussian_assembly_backward")
    def _assembly_backward_fake(grad_means, grad_quats, grad_scales, grad_local_quats, verts, faces, barycentrics,
                                rotation, log_scale, raw, offset_scale, parity, need_verts_grad):
        return (torch.empty_like(verts), torch.empty_like(rotation), torch.empty_like(log_scale),
                torch.empty_like(raw))

    def _assembly_setup(ctx, inputs, output):
        verts, faces, barycentrics, rotation, log_scale, raw, offset_scale, parity = inputs
        ctx.save_for_backward(verts, faces, barycentrics, rotation, log_scale, raw)
        ctx.offset_scale, ctx.parity = offset_scale, parity

    def _assembly_backward(ctx, grad_means, grad_quats, grad_scales, grad_local):
        verts, faces, barycentrics, rotation, log_scale, raw = ctx.saved_tensors
        B, N = raw.shape[0], raw.shape[1]

        def cotangent(g, width):  # an unused output has no cotangent
            return raw.new_zeros(B, N, width) if g is None else g.contiguous()

        g_verts, g_rot, g_log_scale, g_raw = torch.ops.flashavatar.gaussian_assembly_backward(
            cotangent(grad_means, 3), cotangent(grad_quats, 4), cotangent(grad_scales, 3), cotangent(grad_local, 4),
            verts, faces, barycentrics, rotation, log_scale, raw, ctx.offset_scale, ctx.parity,
            ctx.needs_input_grad[0])
        # faces and barycentrics are the avatar's fixed slots: no gradient
        return (g_verts if ctx.needs_input_grad[0] else None), None, None, g_rot, g_log_scale, g_raw, None, None

    torch.library.register_autograd("flashavatar::gaussian_assembly", _assembly_backward,
                                    setup_context=_assembly_setup)


def _check(op: str, name: str, t, shape: tuple) -> None:
    """``shape``: expected sizes, ``None`` for any."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flashavatar.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"flashavatar.{op}: {name} must have shape {want}, got {list(t.shape)}")


def gaussian_assembly(verts: Tensor, faces: Tensor, barycentrics: Tensor, rotation: Tensor, log_scale: Tensor,
                      raw: Tensor, *, offset_scale: float = 1.0, parity: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Means, rotations and scales of ``N`` mesh-attached Gaussians for ``B`` frames, in one kernel.

    Per Gaussian ``n`` of frame ``b`` (``v0, v1, v2`` = the posed corners of its triangle ``faces[n]``)::

        mean  = Σ_k barycentrics[n, k] v_k + offset_scale · raw[b, n, 0:3]
        q_loc = normalise(rotation[n]) ⊗ normalise(exp(raw[3]), raw[4], raw[5], raw[6])
        quat  = q_frame(v0, v1, v2) ⊗ q_loc,  scale = exp(log_scale[n] + raw[7:10])          (parity=False)
        quat  = q_loc,                         scale = exp(log_scale[n] · exp(raw[7:10]))     (parity=True)

    with ``q_frame`` the rotation of columns (edge v0→v1, normal × edge, normal): exactly
    ``GaussianAvatar.forward``.

    Args:
        verts: posed vertices ``[B, V, 3]``, float32 or float64 (every float input must share its dtype and
            device).
        faces: ``[N, 3]`` int32 or int64 vertex indices in ``[0, V)`` (a Gaussian with an index out of range gets
            NaN outputs; the indices are not checked on the host, which would synchronise).
        barycentrics: ``[N, 3]``; rotation: base quaternions ``[N, 4]`` (w, x, y, z; any norm);
        log_scale: ``[N, 3]``; raw: the MLP's tanh outputs ``[B, N, 10]``.
        offset_scale: metres per unit of ``raw[..., :3]``. parity: FlashAvatar's original rule (see above).

    Returns:
        ``(means [B, N, 3], quats [B, N, 4], scales [B, N, 3], local_quats [B, N, 4])``; ``local_quats`` is
        ``q_loc``, the rotation relative to the triangle (the avatar's residual state). Differentiable with
        respect to ``verts``, ``rotation``, ``log_scale`` and ``raw`` (not ``faces`` / ``barycentrics``).
    """
    op = "gaussian_assembly"
    _check(op, "verts", verts, (None, None, 3))
    _check(op, "faces", faces, (None, 3))
    N = faces.shape[0]
    _check(op, "barycentrics", barycentrics, (N, 3))
    _check(op, "rotation", rotation, (N, 4))
    _check(op, "log_scale", log_scale, (N, 3))
    _check(op, "raw", raw, (verts.shape[0], N, 10))
    if faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"flashavatar.{op}: faces must be int32 or int64, got {faces.dtype}")
    if verts.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"flashavatar.{op}: verts must be float32 or float64, got {verts.dtype}")
    for name, t in (("barycentrics", barycentrics), ("rotation", rotation), ("log_scale", log_scale), ("raw", raw)):
        if t.dtype != verts.dtype:
            raise ValueError(f"flashavatar.{op}: {name} is {t.dtype} but verts is {verts.dtype} (one float dtype)")
    for name, t in (("faces", faces), ("barycentrics", barycentrics), ("rotation", rotation),
                    ("log_scale", log_scale), ("raw", raw)):
        if t.device != verts.device:
            raise ValueError(f"flashavatar.{op}: {name} is on {t.device} but verts is on {verts.device}")
    if torch.is_grad_enabled() and barycentrics.requires_grad:
        raise ValueError(f"flashavatar.{op}: barycentrics {list(barycentrics.shape)} requires grad, but the op "
                         "treats them as constants (detach them)")
    _ext.require(op, verts.device)
    means, quats, scales, local = torch.ops.flashavatar.gaussian_assembly(
        verts, faces, barycentrics, rotation, log_scale, raw, float(offset_scale), bool(parity))
    return means, quats, scales, local
