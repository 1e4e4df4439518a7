"""Head-like Gaussian scenes and cameras shared by the rasteriser tests and benchmarks."""

from __future__ import annotations

import math

import torch


def look_at_viewmat(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0), dtype=torch.float64) -> torch.Tensor:
    """World->camera 4x4 (OpenCV: x right, y down, z forward) for a camera at ``eye`` looking at ``target``."""
    eye, target, up = (torch.tensor(v, dtype=dtype) for v in (eye, target, up))
    z = torch.nn.functional.normalize(target - eye, dim=0)
    x = torch.nn.functional.normalize(torch.linalg.cross(up, z), dim=0)  # right
    y = torch.linalg.cross(z, x)  # down
    R = torch.stack([x, y, z], 0)
    vm = torch.eye(4, dtype=dtype)
    vm[:3, :3] = R
    vm[:3, 3] = -R @ eye
    return vm


def cameras(n_cams: int, width: int, height: int, *, distance=0.6, generator=None, dtype=torch.float64):
    """``n_cams`` cameras on an arc in front of the head. Returns viewmats [C,4,4], Ks [C,3,3]."""
    vms, ks = [], []
    for i in range(n_cams):
        yaw = (i - (n_cams - 1) / 2) * 0.35
        pitch = 0.1 * math.sin(1.7 * i)
        eye = (distance * math.sin(yaw) * math.cos(pitch), distance * math.sin(pitch),
               -distance * math.cos(yaw) * math.cos(pitch))
        vms.append(look_at_viewmat(eye, dtype=dtype))
        f = 1.1 * max(width, height) * (1 + 0.05 * i)
        ks.append(torch.tensor([[f, 0, width / 2 + 0.3 * i], [0, f * 1.02, height / 2 - 0.2 * i], [0, 0, 1]],
                               dtype=dtype))
    return torch.stack(vms), torch.stack(ks)


def head_scene(n: int, *, d: int = 3, sh_degree: int | None = None, seed: int = 0, scale=0.012,
               dtype=torch.float64):
    """``n`` Gaussians on and inside a head-sized ellipsoid (about 0.1 m), random shapes and opacities.

    Returns (means [N,3], quats [N,4], scales [N,3], opacities [N], colors [N,D] or SH [N,K,D]).
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=dtype), dim=-1)
    radius = 0.75 + 0.25 * torch.rand(n, 1, generator=g, dtype=dtype) ** 0.3
    means = dirs * radius * torch.tensor([0.08, 0.1, 0.09], dtype=dtype)
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = scale * torch.exp(0.6 * torch.randn(n, 3, generator=g, dtype=dtype))
    opacities = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=dtype)
    if sh_degree is None:
        colors = torch.rand(n, d, generator=g, dtype=dtype)
    else:
        colors = 0.3 * torch.randn(n, (sh_degree + 1) ** 2, d, generator=g, dtype=dtype)
    return means, quats, scales, opacities, colors
