"""3DGS-standard PLY files (the layout of the original 3D Gaussian Splatting code, read by common viewers).

One vertex element with float32 properties, in this order::

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3*(K-1)-1)  opacity  scale_0..2  rot_0..3

``f_dc`` is the SH band-0 colour, ``f_rest`` the higher bands stored channel-major (all red coefficients,
then green, then blue), ``opacity`` is a logit, ``scale`` the log of the std-devs, ``rot`` a unit quaternion
(w, x, y, z). Normals are zero (viewers ignore them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .io_utils import atomic_write_with


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def write_gaussians_ply(path: str | os.PathLike, means, quats, scales, opacities, sh) -> int:
    """Write N Gaussians; returns N.

    means [N, 3], quats [N, 4] (wxyz, any norm), scales [N, 3] std-devs (> 0), opacities [N] in (0, 1),
    sh [N, K, 3] with K in {1, 4, 9, 16} (a degree-3 file always has 45 ``f_rest``; lower degrees are
    zero-padded so every viewer reads it).
    """
    means, quats, scales, opacities, sh = (_np(t) for t in (means, quats, scales, opacities, sh))
    n = means.shape[0]
    if means.shape != (n, 3):
        raise ValueError(f"write_gaussians_ply: means must be [N, 3], got {means.shape}")
    if quats.shape != (n, 4) or scales.shape != (n, 3) or opacities.shape != (n,):
        raise ValueError(f"write_gaussians_ply: quats [N, 4], scales [N, 3], opacities [N] with N={n}; got "
                         f"{quats.shape}, {scales.shape}, {opacities.shape}")
    if sh.ndim != 3 or sh.shape[0] != n or sh.shape[2] != 3 or sh.shape[1] not in (1, 4, 9, 16):
        raise ValueError(f"write_gaussians_ply: sh must be [N, K, 3] with K in 1, 4, 9, 16; got {sh.shape}")
    if not (np.isfinite(means).all() and np.isfinite(scales).all() and np.isfinite(sh).all()):
        raise ValueError("write_gaussians_ply: non-finite values in the Gaussians")
    sh16 = np.zeros((n, 16, 3), dtype=np.float32)
    sh16[:, : sh.shape[1]] = sh
    f_dc = sh16[:, 0, :]  # [N, 3]
    f_rest = sh16[:, 1:, :].transpose(0, 2, 1).reshape(n, 45)  # channel-major, as 3DGS stores it
    eps = 1e-6
    op = np.clip(opacities, eps, 1 - eps)
    opacity_logit = np.log(op / (1 - op))
    log_scales = np.log(np.maximum(scales, 1e-12))
    rot = quats / np.maximum(np.linalg.norm(quats, axis=1, keepdims=True), 1e-12)

    names = (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)]
             + [f"f_rest_{i}" for i in range(45)] + ["opacity"] + [f"scale_{i}" for i in range(3)]
             + [f"rot_{i}" for i in range(4)])
    columns = np.concatenate([means, np.zeros_like(means), f_dc, f_rest, opacity_logit[:, None], log_scales,
                              rot], axis=1).astype(np.float32)
    data = np.empty(n, dtype=[(name, "f4") for name in names])
    for i, name in enumerate(names):
        data[name] = columns[:, i]

    from plyfile import PlyData, PlyElement

    ply = PlyData([PlyElement.describe(data, "vertex")])
    atomic_write_with(path, lambda tmp: ply.write(str(tmp)))
    return n


def read_gaussians_ply(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY back: means, quats, scales (std-devs), opacities (in [0, 1]), sh [N, 16, 3]."""
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PLY not found: {path}")
    v = PlyData.read(str(path))["vertex"]
    n = v.count

    def cols(names):
        return np.stack([np.asarray(v[name], dtype=np.float32) for name in names], axis=1)

    rest_names = sorted((p.name for p in v.properties if p.name.startswith("f_rest_")),
                        key=lambda s: int(s.split("_")[-1]))
    k_rest = len(rest_names) // 3
    sh = np.zeros((n, 1 + k_rest, 3), dtype=np.float32)
    sh[:, 0] = cols([f"f_dc_{i}" for i in range(3)])
    if k_rest:
        sh[:, 1:] = cols(rest_names).reshape(n, 3, k_rest).transpose(0, 2, 1)
    return {
        "means": cols(["x", "y", "z"]),
        "quats": cols([f"rot_{i}" for i in range(4)]),
        "scales": np.exp(cols([f"scale_{i}" for i in range(3)])),
        "opacities": 1.0 / (1.0 + np.exp(-np.asarray(v["opacity"], dtype=np.float32))),
        "sh": sh,
        "property_names": [p.name for p in v.properties],
    }
