"""Pure-PyTorch reference implementations that the tests (and readers) trust.

Simple and slow on purpose: they use general linear algebra (eigendecompositions, dense cost matrices) where
the compiled kernels use closed forms and specialised solvers.
"""

from __future__ import annotations

import torch

# ---- emd reference ----


def gaussian_w2_reference(mu0: torch.Tensor, cov0: torch.Tensor, mu1: torch.Tensor, cov1: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance via symmetric eigendecompositions (float64).

    ``|mu0 - mu1|^2 + tr cov0 + tr cov1 - 2 tr (cov0^1/2 cov1 cov0^1/2)^1/2``.
    mu ``[..., 3]``, cov ``[..., 3, 3]`` -> ``[...]``. Forward only: eigenvector gradients are unstable at
    repeated eigenvalues, which is why the kernel does not use this formula.
    """
    mu0, cov0, mu1, cov1 = (t.double() for t in (mu0, cov0, mu1, cov1))
    cov0 = 0.5 * (cov0 + cov0.transpose(-1, -2))
    cov1 = 0.5 * (cov1 + cov1.transpose(-1, -2))
    lam0, vec0 = torch.linalg.eigh(cov0)
    root0 = vec0 @ torch.diag_embed(lam0.clamp_min(0).sqrt()) @ vec0.transpose(-1, -2)
    middle = root0 @ cov1 @ root0
    middle = 0.5 * (middle + middle.transpose(-1, -2))
    bures = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum(-1)
    tr = torch.diagonal(cov0, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1)
    return ((mu0 - mu1) ** 2).sum(-1) + (tr - 2 * bures).clamp_min(0)


def quat_to_rotmat_reference(quats: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (w, x, y, z), any norm -> rotation matrices ``[..., 3, 3]``."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(*quats.shape[:-1], 3, 3)


def covariance_from_scales_quats_reference(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """``cov = R diag(scales^2) R^T``; scales ``[..., 3]`` (std-devs), quats ``[..., 4]`` -> ``[..., 3, 3]``."""
    rot = quat_to_rotmat_reference(quats)
    return rot @ torch.diag_embed(scales * scales) @ rot.transpose(-1, -2)


def emd_cost_reference(x: torch.Tensor, y: torch.Tensor, plan: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``sum_ij plan_ij |x_i - y_j|^p`` in float64; x ``[N, d]``, y ``[M, d]``, plan ``[N, M]`` -> scalar."""
    dist = (x.double()[:, None, :] - y.double()[None, :, :]).norm(dim=-1)  # [N, M], not cdist's mm form
    return (plan.double() * dist**p).sum()


def emd_bruteforce_reference(x: torch.Tensor, y: torch.Tensor, p: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact uniform-weight EMD by enumerating every permutation (N = M <= 8): cost, assignment ``[N]``.

    ``min_sigma (1/N) sum_i |x_i - y_sigma(i)|^p``; x, y ``[N, d]``.
    """
    import itertools

    n = x.shape[0]
    if y.shape[0] != n or n > 8:
        raise ValueError(f"emd_bruteforce_reference: needs N = M <= 8, got x {list(x.shape)}, y {list(y.shape)}")
    cost = (x.double()[:, None, :] - y.double()[None, :, :]).norm(dim=-1) ** p
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)  # [N!, N]
    totals = cost[torch.arange(n), perms].sum(-1)  # [N!]
    best = int(totals.argmin())
    return totals[best] / n, perms[best]
