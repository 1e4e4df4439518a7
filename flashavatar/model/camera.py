"""Rotations and cameras.

Conventions used throughout flashavatar:

* **6D rotation** = the first two *rows* of the rotation matrix (metrical-tracker / PyTorch3D files),
  completed by Gram–Schmidt; inputs need not be normalised.
* **Quaternions** are ``(w, x, y, z)``, Hamilton product, ``q ⊗ p`` applies ``p`` first.
* **Cameras** are OpenCV world→camera: ``x_cam = R x_world + t`` with x right, y down, z forward, and a
  pixel intrinsic matrix ``K``. Pixel ``(i, j)`` covers ``[i, i+1) × [j, j+1)`` in K's image coordinates, so its
  centre is at ``(i + 0.5, j + 0.5)`` (the gsplat / PyTorch3D convention the rasteriser uses).
* Image sizes from tracker files are ``[h, w]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "rot6d_to_matrix", "matrix_to_rot6d", "identity_rot6d", "axis_angle_to_matrix",
    "quat_multiply", "quat_to_matrix", "matrix_to_quat", "quat_normalize",
    "viewmat_from_Rt", "look_at_opencv", "intrinsics", "project_points",
    "opencv_from_pytorch3d", "pytorch3d_from_opencv",
]


# ----------------------------------------------------------------------------------------------- rotations
def rot6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """6D rotation ``[..., 6]`` (first two rows of R) -> rotation matrices ``[..., 3, 3]``."""
    if d6.shape[-1] != 6:
        raise ValueError(f"rot6d_to_matrix: expected [..., 6], got {tuple(d6.shape)}")
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-2)  # rows


def matrix_to_rot6d(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> 6D ``[..., 6]`` (first two rows)."""
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_rot6d: expected [..., 3, 3], got {tuple(R.shape)}")
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def identity_rot6d(*batch: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The identity rotation in 6D form, ``[*batch, 6]``."""
    eye = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=dtype, device=device)
    return eye.expand(*batch, 6).clone()


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues: axis-angle ``[..., 3]`` -> ``[..., 3, 3]``."""
    theta = aa.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = aa / theta
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    Kx = torch.stack((zero, -kz, ky, kz, zero, -kx, -ky, kx, zero), -1).reshape(*aa.shape[:-1], 3, 3)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(Kx)
    return eye + s * Kx + (1 - c) * (Kx @ Kx)


def quat_normalize(q: torch.Tensor) -> torch.Tensor:
    return F.normalize(q, dim=-1)


def quat_multiply(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``q ⊗ p`` of ``[..., 4]`` (w, x, y, z) quaternions (broadcasting).

    Written as ``L(q) p`` with the 4×4 left-multiplication matrix: a handful of kernels instead of ~30.
    """
    w, x, y, z = q.unbind(-1)
    L = torch.stack((w, -x, -y, -z,
                     x, w, -z, y,
                     y, z, w, -x,
                     z, -y, x, w), dim=-1).reshape(*q.shape[:-1], 4, 4)
    return (L @ p.unsqueeze(-1)).squeeze(-1)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternions ``[..., 4]`` (w, x, y, z; normalised here) -> ``[..., 3, 3]``."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack((
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ), dim=-1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` with w >= 0.

    Picks, per matrix, the best-conditioned of the four classic formulas (largest |component|), so it is
    accurate for 180° rotations too and its gradient stays finite.
    """
    m = R
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    four_sq = torch.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                           1 - m00 + m11 - m22, 1 - m00 - m11 + m22), -1)  # 4·(w², x², y², z²)
    s = torch.sqrt(four_sq.clamp_min(1e-12))  # [..., 4] = 2|component|
    cands = torch.stack((
        torch.stack((four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01), -1),
        torch.stack((m21 - m12, four_sq[..., 1], m01 + m10, m02 + m20), -1),
        torch.stack((m02 - m20, m01 + m10, four_sq[..., 2], m12 + m21), -1),
        torch.stack((m10 - m01, m02 + m20, m12 + m21, four_sq[..., 3]), -1),
    ), -2) / (2 * s[..., None])  # [..., 4 candidates, 4]
    best = four_sq.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


# ------------------------------------------------------------------------------------------------- cameras
def viewmat_from_Rt(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """OpenCV world→camera ``R [..., 3, 3]``, ``t [..., 3]`` -> ``viewmat [..., 4, 4]``."""
    V = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    V[..., :3, :3] = R
    V[..., :3, 3] = t
    V[..., 3, 3] = 1
    return V


def look_at_opencv(eye, target, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """World→camera ``[4, 4]`` (OpenCV: z toward ``target``, y down on screen, ``up`` up on screen)."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)  # camera x (right) = forward × up for a y-down camera
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack((x, y, z))  # rows = camera axes in world coordinates
    V = np.eye(4)
    V[:3, :3] = R
    V[:3, 3] = -R @ eye
    return V


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def project_points(points: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor):
    """Project world points ``[..., N, 3]`` with ``viewmat [..., 4, 4]`` and ``K [..., 3, 3]``.

    Returns ``(pixels [..., N, 2], depth [..., N])`` in K's image coordinates (pixel (i, j) has its centre at
    (i + 0.5, j + 0.5)).
    """
    cam = points @ viewmat[..., :3, :3].transpose(-1, -2) + viewmat[..., None, :3, 3]
    depth = cam[..., 2]
    uvw = cam @ K.transpose(-1, -2)
    return uvw[..., :2] / uvw[..., 2:3], depth


def _as_tensor(x, dtype=torch.float64):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def opencv_from_pytorch3d(R, T, focal_length, principal_point, img_size_hw):
    """Convert a PyTorch3D-style NDC ``PerspectiveCameras`` (as stored under ``camera.*`` by metrical-tracker)
    into OpenCV ``(R [B,3,3], t [B,3], K [B,3,3])``.

    ``R`` is ``[B, 3, 3]`` or 6D ``[B, 6]`` (PyTorch3D row-vector convention, x_cam = x_world R + T),
    ``T [B, 3]``, ``focal_length [B, 1|2]`` and ``principal_point [B, 2]`` in NDC, ``img_size_hw [B|1, 2]``.
    PyTorch3D's camera has +x left, +y up; OpenCV flips both, and its NDC unit is half the shorter side.
    """
    R = _as_tensor(R)
    if R.shape[-1] == 6:
        R = rot6d_to_matrix(R)
    R = R.reshape(-1, 3, 3)
    T = _as_tensor(T).reshape(-1, 3)
    fl = _as_tensor(focal_length).reshape(R.shape[0], -1).expand(R.shape[0], 2)
    pp = _as_tensor(principal_point).reshape(-1, 2).expand(R.shape[0], 2)
    hw = _as_tensor(img_size_hw).reshape(-1, 2).expand(R.shape[0], 2)
    wh = hw.flip(-1)
    scale = wh.min(-1, keepdim=True).values / 2.0
    flip = torch.tensor([-1.0, -1.0, 1.0], dtype=R.dtype)
    R_cv = (R * flip[None, None, :]).transpose(-1, -2)  # flip camera x, y columns, then row-vector → column
    t_cv = T * flip
    f = fl * scale
    c = -pp * scale + wh / 2.0
    K = torch.zeros(R.shape[0], 3, 3, dtype=R.dtype)
    K[:, 0, 0], K[:, 1, 1] = f[:, 0], f[:, 1]
    K[:, 0, 2], K[:, 1, 2] = c[:, 0], c[:, 1]
    K[:, 2, 2] = 1
    return R_cv, t_cv, K


def pytorch3d_from_opencv(R, t, K, img_size_hw):
    """Inverse of :func:`opencv_from_pytorch3d`: returns ``(R [B,3,3], T [B,3], focal [B,2], pp [B,2])``."""
    R = _as_tensor(R).reshape(-1, 3, 3)
    t = _as_tensor(t).reshape(-1, 3)
    K = _as_tensor(K).reshape(-1, 3, 3)
    hw = _as_tensor(img_size_hw).reshape(-1, 2).expand(R.shape[0], 2)
    wh = hw.flip(-1)
    scale = wh.min(-1, keepdim=True).values / 2.0
    flip = torch.tensor([-1.0, -1.0, 1.0], dtype=R.dtype)
    R_p3d = R.transpose(-1, -2) * flip[None, None, :]
    T_p3d = t * flip
    focal = torch.stack((K[:, 0, 0], K[:, 1, 1]), -1) / scale
    pp = -(torch.stack((K[:, 0, 2], K[:, 1, 2]), -1) - wh / 2.0) / scale
    return R_p3d, T_p3d, focal, pp


def fov_focal(fov_deg: float, size_px: float) -> float:
    """Focal length in pixels for a field of view across ``size_px`` pixels."""
    return 0.5 * size_px / math.tan(math.radians(fov_deg) / 2)
