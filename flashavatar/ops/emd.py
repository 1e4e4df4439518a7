"""Optimal transport ops: batched exact Earth Mover's distance and the Gaussian 2-Wasserstein distance.

Thin autograd wrappers over the dispatcher ops ``torch.ops.flashavatar.*`` registered by ``csrc/bindings.cpp``
(kernels in ``csrc/emd/``). Autograd is attached with ``torch.library.register_autograd`` and shapes for
``torch.compile`` with ``torch.library.register_fake``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import _ext

__all__ = ["emd", "EMDResult", "gaussian_w2", "gaussian_w2_from_scales_quats"]


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16/int inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_device(op: str, names: list[str], tensors: list[torch.Tensor]) -> torch.device:
    device = tensors[0].device
    for name, t in zip(names, tensors):
        if t.device != device:
            raise ValueError(f"flashavatar.{op}: {name} is on {t.device} but {names[0]} is on {device}")
    return device


# ---------------------------------------------------------------------------------------------------------
# Gaussian 2-Wasserstein
# ---------------------------------------------------------------------------------------------------------
if _ext.available():

    @torch.library.register_fake("flashavatar::gaussian_w2")
    def _w2_fake(mu0, cov0, mu1, cov1):
        return mu0.new_empty(mu0.shape[:1])

    @torch.library.register_fake("flashavatar::gaussian_w2_backward")
    def _w2_backward_fake(grad, mu0, cov0, mu1, cov1):
        return torch.empty_like(mu0), torch.empty_like(cov0), torch.empty_like(mu1), torch.empty_like(cov1)

    def _w2_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _w2_backward(ctx, grad):
        return torch.ops.flashavatar.gaussian_w2_backward(grad.contiguous(), *ctx.saved_tensors)

    torch.library.register_autograd("flashavatar::gaussian_w2", _w2_backward, setup_context=_w2_setup)

    @torch.library.register_fake("flashavatar::gaussian_w2_sq")
    def _w2_sq_fake(mu0, scales0, quats0, mu1, scales1, quats1):
        return mu0.new_empty(mu0.shape[:1])

    @torch.library.register_fake("flashavatar::gaussian_w2_sq_backward")
    def _w2_sq_backward_fake(grad, mu0, scales0, quats0, mu1, scales1, quats1):
        return tuple(torch.empty_like(t) for t in (mu0, scales0, quats0, mu1, scales1, quats1))

    def _w2_sq_backward(ctx, grad):
        return torch.ops.flashavatar.gaussian_w2_sq_backward(grad.contiguous(), *ctx.saved_tensors)

    torch.library.register_autograd("flashavatar::gaussian_w2_sq", _w2_sq_backward, setup_context=_w2_setup)


def gaussian_w2(mu0: torch.Tensor, cov0: torch.Tensor, mu1: torch.Tensor, cov1: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance between Gaussians N(mu0, cov0) and N(mu1, cov1).

    ``W2^2 = |mu0 - mu1|^2 + tr cov0 + tr cov1 - 2 tr (cov0^1/2 cov1 cov0^1/2)^1/2``, in closed form for 3x3
    SPD matrices, without eigenvectors (finite gradients at isotropic / repeated-eigenvalue inputs) and without
    absolute floors (scale invariant: mm-sized Gaussians in metre units keep their signal). Computed in float64
    inside the kernel whatever the input dtype; the result has the input dtype (float32, or float64).

    Args:
        mu0, mu1: means ``[..., 3]``.
        cov0, cov1: covariances ``[..., 3, 3]`` (symmetric positive semi-definite; symmetrised inside, so the
            gradient is symmetric).
        Leading dims broadcast against each other.

    Returns:
        ``[...]`` squared W2 distances (clamped at 0 against rounding).
    """
    op = "gaussian_w2"
    for name, t, tail in (("mu0", mu0, (3,)), ("cov0", cov0, (3, 3)), ("mu1", mu1, (3,)), ("cov1", cov1, (3, 3))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flashavatar.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape[t.dim() - len(tail):]) != tail or t.dim() < len(tail):
            shape = "[..., " + ", ".join(map(str, tail)) + "]"
            raise ValueError(f"flashavatar.{op}: {name} must have shape {shape}, got {list(t.shape)}")
    device = _check_device(op, ["mu0", "cov0", "mu1", "cov1"], [mu0, cov0, mu1, cov1])
    _ext.require(op, device)
    dtype = _float_dtype(mu0, cov0, mu1, cov1)
    try:
        batch = torch.broadcast_shapes(mu0.shape[:-1], cov0.shape[:-2], mu1.shape[:-1], cov1.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"flashavatar.{op}: leading dims do not broadcast: mu0 {list(mu0.shape)}, cov0 {list(cov0.shape)}, "
            f"mu1 {list(mu1.shape)}, cov1 {list(cov1.shape)}"
        ) from exc
    flat = [
        t.to(dtype).expand(*batch, *t.shape[t.dim() - n:]).reshape(-1, *t.shape[t.dim() - n:]).contiguous()
        for t, n in ((mu0, 1), (cov0, 2), (mu1, 1), (cov1, 2))
    ]
    return torch.ops.flashavatar.gaussian_w2(*flat).reshape(batch)


def gaussian_w2_from_scales_quats(
    mu0: torch.Tensor,
    scales0: torch.Tensor,
    quats0: torch.Tensor,
    mu1: torch.Tensor,
    scales1: torch.Tensor,
    quats1: torch.Tensor,
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between Gaussians given as means, scales and rotations.

    ``cov = R diag(scales^2) R^T`` with ``R`` from the quaternion ``(w, x, y, z)`` (normalised inside, so
    the gradient is tangent to the sphere); ``scales`` are standard deviations, as in gsplat.

    Args:
        mu0, mu1: ``[..., 3]``; scales0, scales1: ``[..., 3]``; quats0, quats1: ``[..., 4]``; leading dims
            broadcast.

    Returns:
        ``[...]`` squared W2 distances, same math as :func:`gaussian_w2`.
    """
    op = "gaussian_w2_from_scales_quats"
    names = ["mu0", "scales0", "quats0", "mu1", "scales1", "quats1"]
    tensors = [mu0, scales0, quats0, mu1, scales1, quats1]
    tails = [3, 3, 4, 3, 3, 4]
    for name, t, n in zip(names, tensors, tails):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flashavatar.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[-1] != n:
            raise ValueError(f"flashavatar.{op}: {name} must have shape [..., {n}], got {list(t.shape)}")
    device = _check_device(op, names, tensors)
    _ext.require(op, device)
    dtype = _float_dtype(*tensors)
    try:
        batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    except RuntimeError as exc:
        shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, tensors))
        raise ValueError(f"flashavatar.{op}: leading dims do not broadcast: {shapes}") from exc
    flat = [t.to(dtype).expand(*batch, t.shape[-1]).reshape(-1, t.shape[-1]).contiguous() for t in tensors]
    return torch.ops.flashavatar.gaussian_w2_sq(*flat).reshape(batch)


# ---------------------------------------------------------------------------------------------------------
# Earth Mover's distance
# ---------------------------------------------------------------------------------------------------------
STATUS_CONVERGED, STATUS_MAX_ITER, STATUS_EPS_UNDERFLOW = 1, 2, 3


class EMDResult(NamedTuple):
    """Everything :func:`emd` knows about its solution; batch dims first (``[B]`` or none when unbatched).

    Attributes:
        cost: ``[B]`` optimal-transport cost ``sum_ij P_ij |x_i - y_j|^p`` (input dtype; summed in float64).
        converged: ``[B]`` bool, True where the optimality certificate met ``tol`` (see :func:`emd`).
        gap: ``[B]`` float64, certified bound ``cost - OPT <= gap`` (primal minus dual objective).
        iterations: ``[B]`` int64, bidding rounds (auction) or augmentations (transport solver).
        plan_index: ``[B, K, 2]`` int64 ``(i, j)`` of the plan's non-zeros, ``K = N + M - 1``.
        plan_weight: ``[B, K]`` float64 masses ``P_ij`` (0 in unused slots).
        assignment: ``[B, N]`` int64 ``j`` matched to each ``i`` (N = M, uniform weights), else None.
        f: ``[B, N]``, g: ``[B, M]`` float64 dual potentials, ``f_i + g_j <= c_ij``, tight on the plan.
    """

    cost: torch.Tensor
    converged: torch.Tensor
    gap: torch.Tensor
    iterations: torch.Tensor
    plan_index: torch.Tensor
    plan_weight: torch.Tensor
    assignment: torch.Tensor | None
    f: torch.Tensor
    g: torch.Tensor

    def dense_plan(self, n: int | None = None, m: int | None = None) -> torch.Tensor:
        """The plan as a dense ``[B, N, M]`` float64 tensor (sizes default to those of the duals)."""
        n = self.f.shape[-1] if n is None else n
        m = self.g.shape[-1] if m is None else m
        idx, w = self.plan_index, self.plan_weight
        batched = idx.dim() == 3
        if not batched:
            idx, w = idx.unsqueeze(0), w.unsqueeze(0)
        plan = w.new_zeros(idx.shape[0], n * m)
        plan.scatter_add_(1, idx[..., 0] * m + idx[..., 1], w)
        plan = plan.reshape(-1, n, m)
        return plan if batched else plan[0]


if _ext.available():

    @torch.library.register_fake("flashavatar::emd_forward")
    def _emd_fake(x, y, a, b, p, tol, max_iter):
        nb, n, m = x.shape[0], x.shape[1], y.shape[1]
        k = n + m - 1
        f64 = dict(dtype=torch.float64, device=x.device)
        return (
            x.new_empty(nb, **f64),
            x.new_empty(nb, k, 2, dtype=torch.int64),
            x.new_empty(nb, k, **f64),
            x.new_empty(nb, n, **f64),
            x.new_empty(nb, m, **f64),
            x.new_empty(nb, dtype=torch.int32),
            x.new_empty(nb, **f64),
            x.new_empty(nb, dtype=torch.int64),
        )

    def _emd_setup(ctx, inputs, output):
        x, y, a, b, p, tol, max_iter = inputs
        _, plan_index, plan_weight, f, g, status, gap, iterations = output
        ctx.mark_non_differentiable(plan_index, plan_weight, f, g, status, gap, iterations)
        ctx.p = p
        ctx.has_weights = a is not None
        ctx.save_for_backward(x, y, plan_index, plan_weight, f, g)

    def _emd_backward(ctx, grad_cost, *unused):
        """Envelope theorem: the gradient of the optimal cost is that of sum P_ij c_ij at the optimal plan P
        (x, y), and the dual potentials (a, b), centred to zero mean so they lie in the simplex's tangent space."""
        x, y, plan_index, plan_weight, f, g = ctx.saved_tensors
        grad_x = grad_y = grad_a = grad_b = None
        if grad_cost is None:
            return None, None, None, None, None, None, None
        grad_cost = grad_cost.to(torch.float64)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d = x.shape[-1]
            i = plan_index[..., 0].unsqueeze(-1).expand(-1, -1, d)  # [B, K, d]
            j = plan_index[..., 1].unsqueeze(-1).expand(-1, -1, d)
            diff = torch.gather(x, 1, i) - torch.gather(y, 1, j)  # [B, K, d]
            if ctx.p == 2:
                dcost = 2 * diff
            else:  # p = 1: unit vector, 0 where the points coincide (a subgradient)
                norm = diff.norm(dim=-1, keepdim=True)
                dcost = torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(diff.dtype).tiny), torch.zeros_like(diff))
            weight = (plan_weight * grad_cost.unsqueeze(-1)).to(x.dtype).unsqueeze(-1)  # [B, K, 1]
            contrib = weight * dcost
            if ctx.needs_input_grad[0]:
                grad_x = torch.zeros_like(x).scatter_add_(1, i, contrib)
            if ctx.needs_input_grad[1]:
                grad_y = torch.zeros_like(y).scatter_add_(1, j, -contrib)
        if ctx.has_weights:
            grad_a = (f - f.mean(-1, keepdim=True)) * grad_cost.unsqueeze(-1)
            grad_b = (g - g.mean(-1, keepdim=True)) * grad_cost.unsqueeze(-1)
        return grad_x, grad_y, grad_a, grad_b, None, None, None

    torch.library.register_autograd("flashavatar::emd_forward", _emd_backward, setup_context=_emd_setup)


def _as_points(op: str, name: str, t, dims: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flashavatar.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"flashavatar.{op}: {name} must have shape {dims} or without the batch dim, got {list(t.shape)}")
    if not (t.is_floating_point()):
        raise TypeError(f"flashavatar.{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def emd(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    p: int = 2,
    tol: float = 1e-6,
    max_iter: int = 1_000_000,
    return_plan: bool = False,
    return_assignment: bool = False,
    return_info: bool = False,
    validate: bool = True,
) -> torch.Tensor | EMDResult:
    """Exact Earth Mover's distance (optimal-transport cost) between point sets, batched.

    ``cost[b] = min_P sum_ij P_ij |x_bi - y_bj|^p`` over plans P with row sums ``a`` and column sums ``b``
    (uniform ``1/N``, ``1/M`` by default).

    Solvers:
        * ``N == M`` and no weights: epsilon-scaling Jacobi auction (Bertsekas), on the GPU one thread block per
          batch item in a single launch; on the CPU the same rounds serially. It stops when its duality
          certificate proves ``cost - OPT <= tol * cost`` (the primal-dual gap from the auction prices), so the
          relative error is at most ``tol`` in exact arithmetic. Costs are evaluated in the input precision and
          summed in float64: float32 inputs limit the meaningful ``tol`` to about 1e-6. For float32 inputs with
          d = 2 or 3 a bid does not scan every point of y: the points are put in kd-tree order, and a block of 32
          whose bounding box and price bound prove it cannot hold the best or second best value is skipped
          (a proof, so the results are those of the full scan; ties between equal values break by that order).
        * otherwise (weights, ``N != M``, ragged sets given as zero-weight padding): successive shortest paths
          on the transportation network, exact up to float64 rounding; CPU only (a CUDA input is solved on a
          host copy and the results copied back). Time O((N + M) N M) worst case, memory O(N M).

    Args:
        x: ``[B, N, d]`` or ``[N, d]`` source points. y: ``[B, M, d]`` or ``[M, d]`` target points.
        a: ``[B, N]`` / ``[N]`` non-negative source weights; b: ``[B, M]`` / ``[M]`` target weights with the
            same total mass per item (checked; then b is rescaled to a's mass exactly). Give both or neither.
        p: ground cost exponent, 1 or 2.
        tol: relative tolerance of the auction's certificate (default 1e-6).
        max_iter: bidding rounds (auction) or augmentations (transport solver) per item before giving up;
            an item that stops early has ``converged = False`` and a still-valid (suboptimal) plan.
        return_plan, return_assignment, return_info: return an :class:`EMDResult` instead of the cost.
            ``assignment`` needs ``N == M`` and no weights.
        validate: check inputs for NaN/inf, negative weights and mass mismatch, and warn when an item did not
            converge. These checks synchronise with the device; pass False inside CUDA graphs.

    Returns:
        ``cost [B]`` (or a scalar for unbatched inputs), in x's dtype, differentiable in x and y (envelope
        theorem, gradient of ``sum P_ij c_ij`` at the returned plan: for p = 2, ``2 sum_j P_ij (x_i - y_j)``)
        and in a and b (the dual potentials, centred to zero mean: a gradient on the simplex). The gradient is
        the true one where the optimal plan is unique (distinct points in general position).
    """
    op = "emd"
    x = _as_points(op, "x", x, "[B, N, d]")
    y = _as_points(op, "y", y, "[B, M, d]")
    batched = x.dim() == 3
    if y.dim() != x.dim():
        raise ValueError(f"flashavatar.{op}: x {list(x.shape)} and y {list(y.shape)} must both be batched or both not")
    if not batched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
        a = a.unsqueeze(0) if isinstance(a, torch.Tensor) else a
        b = b.unsqueeze(0) if isinstance(b, torch.Tensor) else b
    if y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
        raise ValueError(f"flashavatar.{op}: y must have shape [B, M, d] = [{x.shape[0]}, M, {x.shape[2]}] to match x {list(x.shape)}, got {list(y.shape)}")
    if x.shape[1] == 0 or y.shape[1] == 0:
        raise ValueError(f"flashavatar.{op}: empty point set: x {list(x.shape)}, y {list(y.shape)}; each item needs at least one point")
    if x.shape[2] == 0:
        raise ValueError(f"flashavatar.{op}: points need at least one coordinate, got x {list(x.shape)}")
    if p not in (1, 2):
        raise ValueError(f"flashavatar.{op}: p must be 1 or 2, got {p}")
    if not (tol >= 0):
        raise ValueError(f"flashavatar.{op}: tol must be >= 0, got {tol}")
    if int(max_iter) <= 0:
        raise ValueError(f"flashavatar.{op}: max_iter must be positive, got {max_iter}")
    device = _check_device(op, ["x", "y"], [x, y])
    _ext.require(op, device)
    dtype = _float_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    nb, n, m = x.shape[0], x.shape[1], y.shape[1]
    if validate:
        for name, t in (("x", x), ("y", y)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"flashavatar.{op}: {name} {list(t.shape)} contains NaN or inf")
    if (a is None) != (b is None):
        raise ValueError(f"flashavatar.{op}: give both weights a and b or neither")
    if a is not None:
        for name, t, size in (("a", a, n), ("b", b, m)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"flashavatar.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (nb, size):
                raise ValueError(f"flashavatar.{op}: {name} must have shape [{nb}, {size}] (batch, points), got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"flashavatar.{op}: {name} is on {t.device} but x is on {device}")
        low_precision = a.dtype != torch.float64 or b.dtype != torch.float64
        a, b = a.to(torch.float64), b.to(torch.float64)
        mass_a, mass_b = a.sum(-1), b.sum(-1)
        if validate:
            for name, t in (("a", a), ("b", b)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"flashavatar.{op}: {name} {list(t.shape)} contains NaN or inf")
                if bool((t < 0).any()):
                    raise ValueError(f"flashavatar.{op}: {name} {list(t.shape)} has negative weights")
            if not bool((mass_a > 0).all()):
                raise ValueError(f"flashavatar.{op}: a {list(a.shape)} has an item with zero total mass")
            rtol = 1e-5 if low_precision else 1e-9
            mismatch = (mass_a - mass_b).abs() > rtol * torch.maximum(mass_a, mass_b)
            if bool(mismatch.any()):
                item = int(mismatch.nonzero()[0, 0])
                raise ValueError(
                    f"flashavatar.{op}: a and b must have equal total mass per item; item {item}: "
                    f"sum(a) = {mass_a[item].item():.9g}, sum(b) = {mass_b[item].item():.9g}"
                )
            # Uniform weights on equal sizes: the (faster, GPU) assignment solver gives the same problem.
            if n == m and bool((a == a[:, :1]).all()) and bool((b == b[:, :1]).all()) and bool((mass_a == mass_b).all()):
                if not (a.requires_grad or b.requires_grad):
                    a = b = None
        if a is not None:
            b = b * (mass_a / mass_b).detach().unsqueeze(-1)  # rounding clean-up, not part of the math
    if return_assignment and not (a is None and n == m):
        raise ValueError(f"flashavatar.{op}: return_assignment needs N == M and uniform weights, got N = {n}, M = {m}"
                         f"{' with weights' if a is not None else ''}")
    cost, plan_index, plan_weight, f, g, status, gap, iterations = torch.ops.flashavatar.emd_forward(
        x.contiguous(), y.contiguous(), a, b, int(p), float(tol), int(max_iter)
    )
    cost = cost.to(dtype)
    converged = status == STATUS_CONVERGED
    if validate and not bool(converged.all()):
        bad = (~converged).nonzero()[:, 0].tolist()
        warnings.warn(
            f"flashavatar.emd: items {bad[:10]} stopped before the requested tolerance (status "
            f"{status[bad[0]].item()}: 2 = max_iter reached, 3 = float64 resolution); their plans are valid but "
            f"suboptimal by at most `gap`",
            RuntimeWarning,
            stacklevel=2,
        )
    if not (return_plan or return_assignment or return_info):
        return cost if batched else cost[0]
    assignment = plan_index[:, :n, 1] if (a is None and n == m) else None
    result = EMDResult(cost, converged, gap, iterations, plan_index, plan_weight, assignment, f, g)
    if not batched:
        result = EMDResult(*(t[0] if t is not None else None for t in result))
    return result
