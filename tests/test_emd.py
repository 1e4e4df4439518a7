"""emd against POT's exact ot.emd2 (the oracle) on the CPU path (the same auction code as the CUDA kernel)."""

import numpy as np
import ot
import pytest
import torch
from op_checks import assert_op_raises

import flashavatar.ops as ops
from flashavatar.ops.reference import emd_bruteforce_reference, emd_cost_reference

pytestmark = pytest.mark.skipif(not ops.available(), reason="flashavatar._C not built")


def pot_emd(x, y, a=None, b=None, p=2):
    """POT's exact cost and plan for one item (numItermax raised: POT silently stops early otherwise)."""
    xn, yn = x.double().numpy(), y.double().numpy()
    n, m = len(xn), len(yn)
    a = np.full(n, 1.0 / n) if a is None else a.double().numpy()
    b = np.full(m, 1.0 / m) if b is None else b.double().numpy()
    # exact pairwise distances: ot.dist's expanded form gives ~1e-8 instead of 0 between duplicates (p = 1)
    cost = (pairwise_dist(x.double(), y.double()) ** p).numpy()
    plan = ot.emd(a, b, cost, numItermax=10**7)
    return float((plan * cost).sum()), torch.from_numpy(plan)


def pairwise_dist(x, y):
    """Exact |x_i - y_j| (torch.cdist's matrix-product form loses digits far from the origin)."""
    return (x[:, None, :] - y[None, :, :]).norm(dim=-1)


def point_sets(kind, b, n, m, d, gen, dtype=torch.float64):
    if kind == "random":
        x, y = torch.rand(b, n, d, generator=gen, dtype=dtype), torch.rand(b, m, d, generator=gen, dtype=dtype)
    elif kind == "clustered":
        centres = 10 * torch.randn(b, 4, d, generator=gen, dtype=dtype)
        lab_x, lab_y = torch.randint(0, 4, (b, n), generator=gen), torch.randint(0, 4, (b, m), generator=gen)
        x = torch.gather(centres, 1, lab_x[..., None].expand(-1, -1, d)) + 0.1 * torch.randn(b, n, d, generator=gen, dtype=dtype)
        y = torch.gather(centres, 1, lab_y[..., None].expand(-1, -1, d)) + 0.1 * torch.randn(b, m, d, generator=gen, dtype=dtype)
    elif kind == "duplicated":  # many exact duplicates on both sides, shared points across the sets
        base = torch.rand(b, 6, d, generator=gen, dtype=dtype)
        x = torch.gather(base, 1, torch.randint(0, 6, (b, n, 1), generator=gen).expand(-1, -1, d))
        y = torch.gather(base, 1, torch.randint(0, 6, (b, m, 1), generator=gen).expand(-1, -1, d))
    elif kind == "scales":  # a tight mm cluster against a spread of metres, far from the origin
        x = 1000.0 + 1e-3 * torch.randn(b, n, d, generator=gen, dtype=dtype)
        y = 1000.0 + 5.0 * torch.randn(b, m, d, generator=gen, dtype=dtype)
        y[:, : m // 4] = 1000.0 + 1e-3 * torch.randn(b, m // 4, d, generator=gen, dtype=dtype)
    else:
        raise ValueError(kind)
    return x, y


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicated", "scales"])
@pytest.mark.parametrize("d,p", [(2, 2), (3, 2), (8, 2), (3, 1)])
def test_assignment_matches_pot(kind, d, p):
    gen = torch.Generator().manual_seed(hash((kind, d, p)) % 2**31)
    x, y = point_sets(kind, 2, 64, 64, d, gen)
    tol = 1e-6
    res = ops.emd(x, y, p=p, tol=tol, return_assignment=True)
    assert res.converged.all()
    for bi in range(2):
        expected, _ = pot_emd(x[bi], y[bi], p=p)
        got = res.cost[bi].item()
        assert abs(got - expected) <= tol * expected + 1e-12, (got, expected)
        assert got >= expected * (1 - 1e-12)  # a feasible plan never beats the optimum
        # the certificate bounds the true error
        assert got - expected <= res.gap[bi].item() * (1 + 1e-9) + 1e-15
        # assignment is a permutation and the cost is its cost
        assert torch.equal(res.assignment[bi].sort().values, torch.arange(64))
        direct = (pairwise_dist(x[bi], y[bi]) ** p)[torch.arange(64), res.assignment[bi]].mean()
        assert got == pytest.approx(direct.item(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicated", "scales"])
@pytest.mark.parametrize("d,p", [(2, 2), (3, 2), (3, 1)])
def test_float_prefilter_changes_nothing(kind, d, p):
    # float32 inputs with d <= 3 scan through the float32 pre-filter; padding the points with zero coordinates
    # (d = 4) gives the same float costs through the plain float64 scan. Same rounds, so bit-identical results.
    gen = torch.Generator().manual_seed(hash((kind, d, p, "filter")) % 2**31)
    x, y = point_sets(kind, 2, 150, 150, d, gen, dtype=torch.float32)
    filtered = ops.emd(x, y, p=p, tol=1e-6, return_assignment=True)
    pad = lambda t: torch.nn.functional.pad(t, (0, 4 - d))  # noqa: E731
    plain = ops.emd(pad(x), pad(y), p=p, tol=1e-6, return_assignment=True)
    assert filtered.converged.all()
    assert torch.equal(filtered.assignment, plain.assignment)
    assert torch.equal(filtered.iterations, plain.iterations)
    assert torch.equal(filtered.cost, plain.cost) and torch.equal(filtered.gap, plain.gap)


@pytest.mark.parametrize("kind,d,p,n", [("random", 3, 2, 1500), ("clustered", 3, 1, 1500), ("random", 2, 1, 1500),
                                         ("scales", 3, 2, 400)])
def test_pruned_scans_change_nothing_at_larger_n(kind, d, p, n):
    # At n = 1,500 (47 blocks of 32 objects) the pruned scans skip most blocks for most bids and certificates
    # (the scales problem takes ~100x more rounds, hence its smaller n).
    # The d = 4 padding takes the plain scan over every object: the same rounds, so bit-identical results.
    gen = torch.Generator().manual_seed(hash((kind, d, p, "pruned")) % 2**31)
    x, y = point_sets(kind, 1, n, n, d, gen, dtype=torch.float32)
    pruned = ops.emd(x, y, p=p, return_assignment=True)
    pad = lambda t: torch.nn.functional.pad(t, (0, 4 - d))  # noqa: E731
    plain = ops.emd(pad(x), pad(y), p=p, return_assignment=True)
    assert pruned.converged.all()
    assert torch.equal(pruned.assignment, plain.assignment)
    assert torch.equal(pruned.iterations, plain.iterations)
    assert torch.equal(pruned.cost, plain.cost) and torch.equal(pruned.gap, plain.gap)
    assert torch.equal(pruned.g, plain.g)
    # both solved on the objects in kd order: the potentials must be back in the caller's order, dual feasible
    # and tight on the assignment
    cost = pairwise_dist(x[0].double(), y[0].double()) ** p  # [n, n]
    slack = cost - pruned.f[0][:, None] - pruned.g[0][None, :]
    scale = cost.max().item()
    assert slack.min().item() >= -1e-6 * scale
    assert slack[torch.arange(n), pruned.assignment[0]].abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("scale", [0.0, 1e-20, 3e18])
def test_float_prefilter_extreme_scales(scale):
    # the filter's proof at its edges: all costs 0 (threshold from w = 0), subnormal float costs (its absolute
    # margin) and costs near 1e37 whose prices pass 1e37 (no threshold: every object takes the float64 path).
    gen = torch.Generator().manual_seed(31)
    x = scale * torch.rand(1, 320, 3, generator=gen)  # 10 blocks for the pruned scans
    y = scale * torch.rand(1, 320, 3, generator=gen)
    y[0, :30] = x[0, :30]  # exact zero costs next to the rest
    filtered = ops.emd(x, y, tol=1e-6, max_iter=200_000, return_assignment=True)
    plain = ops.emd(torch.nn.functional.pad(x, (0, 1)), torch.nn.functional.pad(y, (0, 1)), tol=1e-6,
                    max_iter=200_000, return_assignment=True)
    assert torch.equal(filtered.assignment, plain.assignment)
    assert torch.equal(filtered.iterations, plain.iterations)
    assert torch.equal(filtered.cost, plain.cost) and torch.equal(filtered.gap, plain.gap)


@pytest.mark.parametrize("n", [1, 2, 7, 200])
def test_sizes_and_default_tolerance(n):
    gen = torch.Generator().manual_seed(n)
    x, y = point_sets("random", 1, n, n, 3, gen)
    cost = ops.emd(x, y)
    expected, _ = pot_emd(x[0], y[0])
    assert cost.shape == (1,) and cost.dtype == torch.float64
    assert abs(cost.item() - expected) <= 1e-6 * expected + 1e-15
    if n <= 7:
        brute, _ = emd_bruteforce_reference(x[0], y[0])
        assert cost.item() == pytest.approx(brute.item(), rel=1e-6, abs=1e-15)


def test_float32_and_unbatched():
    gen = torch.Generator().manual_seed(11)
    x, y = point_sets("random", 1, 100, 100, 3, gen, dtype=torch.float32)
    expected, _ = pot_emd(x[0], y[0])
    cost = ops.emd(x[0], y[0])
    assert cost.dim() == 0 and cost.dtype == torch.float32
    assert abs(cost.item() - expected) <= 2e-6 * expected
    res = ops.emd(x[0], y[0], return_plan=True)
    assert res.plan_index.shape == (199, 2) and res.converged.dim() == 0


def test_tolerance_is_honoured_and_user_settable():
    gen = torch.Generator().manual_seed(12)
    x, y = point_sets("random", 3, 150, 150, 2, gen)
    for tol in (1e-2, 1e-4, 1e-8):
        res = ops.emd(x, y, tol=tol, return_info=True)
        assert res.converged.all()
        for bi in range(3):
            expected, _ = pot_emd(x[bi], y[bi])
            assert res.cost[bi].item() - expected <= tol * expected + 1e-15
            assert res.gap[bi].item() <= tol * res.cost[bi].item() * (1 + 1e-12)
    loose = ops.emd(x, y, tol=1e-2, return_info=True)
    tight = ops.emd(x, y, tol=1e-8, return_info=True)
    assert (loose.iterations <= tight.iterations).all()


def test_max_iter_flags_unconverged_items_with_a_valid_plan():
    gen = torch.Generator().manual_seed(13)
    x, y = point_sets("random", 2, 80, 80, 3, gen)
    with pytest.warns(RuntimeWarning, match="stopped before the requested tolerance"):
        res = ops.emd(x, y, max_iter=3, return_assignment=True)
    assert not res.converged.any()
    assert (res.iterations == 3).all()
    for bi in range(2):
        assert torch.equal(res.assignment[bi].sort().values, torch.arange(80))
        expected, _ = pot_emd(x[bi], y[bi])
        assert res.cost[bi].item() >= expected * (1 - 1e-12)
        assert res.cost[bi].item() - expected <= res.gap[bi].item() * (1 + 1e-9)


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicated", "scales"])
def test_transport_unequal_sizes_and_weights_match_pot(kind):
    gen = torch.Generator().manual_seed(hash(kind) % 2**31)
    x, y = point_sets(kind, 2, 40, 70, 3, gen)
    a = torch.rand(2, 40, generator=gen, dtype=torch.float64) + 0.05
    b = torch.rand(2, 70, generator=gen, dtype=torch.float64) + 0.05
    a, b = a / a.sum(-1, keepdim=True), 2.0 * b / b.sum(-1, keepdim=True) / 2.0
    for weights in ((None, None), (a, b)):
        res = ops.emd(x, y, *weights, return_plan=True)
        assert res.converged.all() and res.assignment is None
        plan = res.dense_plan()
        for bi in range(2):
            wa = None if weights[0] is None else a[bi]
            wb = None if weights[1] is None else b[bi]
            expected, _ = pot_emd(x[bi], y[bi], wa, wb)
            assert res.cost[bi].item() == pytest.approx(expected, rel=1e-9, abs=1e-14)
            # plan validity: non-negative, marginals, a forest (<= N + M - 1 non-zeros), cost = <P, C>
            mass_a = torch.full((40,), 1 / 40, dtype=torch.float64) if wa is None else wa
            mass_b = torch.full((70,), 1 / 70, dtype=torch.float64) if wb is None else wb
            assert (plan[bi] >= 0).all()
            torch.testing.assert_close(plan[bi].sum(1), mass_a, rtol=0, atol=1e-12)
            torch.testing.assert_close(plan[bi].sum(0), mass_b, rtol=0, atol=1e-12)
            assert (plan[bi] > 0).sum() <= 40 + 70 - 1
            assert emd_cost_reference(x[bi], y[bi], plan[bi]).item() == pytest.approx(res.cost[bi].item(), rel=1e-12)
            # dual feasibility and zero duality gap
            c = pairwise_dist(x[bi], y[bi]) ** 2
            assert (res.f[bi][:, None] + res.g[bi][None, :] <= c + 1e-9 * c.max()).all()
            dual = (mass_a * res.f[bi]).sum() + (mass_b * res.g[bi]).sum()
            assert dual.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_ragged_sets_by_zero_weight_padding():
    gen = torch.Generator().manual_seed(14)
    x, y = point_sets("random", 1, 30, 30, 2, gen)
    a = torch.full((1, 30), 1 / 20, dtype=torch.float64)
    a[:, 20:] = 0  # only the first 20 points of x are real
    b = torch.full((1, 30), 1 / 30, dtype=torch.float64)
    padded = ops.emd(x, y, a, b)
    direct = ops.emd(x[:, :20], y)
    assert padded.item() == pytest.approx(direct.item(), rel=1e-10)


def test_uniform_weights_given_explicitly_use_the_assignment_solver():
    gen = torch.Generator().manual_seed(15)
    x, y = point_sets("random", 2, 50, 50, 3, gen)
    w = torch.full((2, 50), 0.02, dtype=torch.float64)
    res = ops.emd(x, y, w, w, return_info=True)
    assert res.assignment is not None
    torch.testing.assert_close(res.cost, ops.emd(x, y), rtol=1e-12, atol=0)


def _plan_is_unique_points(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, n, d, generator=gen, dtype=torch.float64), torch.rand(2, n, d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_assignment(p, seed):
    x, y = _plan_is_unique_points(6, 3, seed)
    x.requires_grad_(True)
    y.requires_grad_(True)
    # tol = 0 would never certify with rounding; 1e-10 makes the plan the optimal one for these distinct points
    fn = lambda x_, y_: ops.emd(x_, y_, p=p, tol=1e-10)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-7, atol=1e-6)
    # non-contiguous inputs
    xt = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (xt, y), eps=1e-7, atol=1e-6)


def test_gradcheck_transport_points():
    gen = torch.Generator().manual_seed(21)
    x = torch.rand(1, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 7, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.rand(1, 5, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(1, 7, generator=gen, dtype=torch.float64) + 0.1
    b = b * a.sum() / b.sum()
    assert torch.autograd.gradcheck(lambda x_, y_: ops.emd(x_, y_, a, b), (x, y), eps=1e-7, atol=1e-6)


def test_vjp_matches_envelope_formula_from_pot_plan():
    gen = torch.Generator().manual_seed(22)
    x, y = point_sets("random", 2, 60, 60, 3, gen)
    a = torch.rand(2, 60, generator=gen, dtype=torch.float64) + 0.1
    a = a / a.sum(-1, keepdim=True)
    for weights, p in (((None, None), 2), ((None, None), 1), ((a, a.flip(-1)), 2)):
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        cot = torch.randn(2, generator=gen, dtype=torch.float64)
        (ops.emd(xr, yr, *weights, p=p, tol=1e-10) * cot).sum().backward()
        for bi in range(2):
            wa = None if weights[0] is None else weights[0][bi]
            wb = None if weights[1] is None else weights[1][bi]
            _, plan = pot_emd(x[bi], y[bi], wa, wb, p=p)
            diff = x[bi][:, None, :] - y[bi][None, :, :]  # [N, M, d]
            if p == 2:
                dc = 2 * diff
            else:
                dc = diff / diff.norm(dim=-1, keepdim=True)
            gx = cot[bi] * (plan[..., None] * dc).sum(1)
            gy = -cot[bi] * (plan[..., None] * dc).sum(0)
            torch.testing.assert_close(xr.grad[bi], gx, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(yr.grad[bi], gy, rtol=1e-6, atol=1e-9)


def test_weight_gradient_is_the_centred_dual_potential():
    gen = torch.Generator().manual_seed(23)
    x, y = point_sets("random", 1, 12, 9, 2, gen)
    a = torch.rand(1, 12, generator=gen, dtype=torch.float64) + 0.2
    b = torch.rand(1, 9, generator=gen, dtype=torch.float64) + 0.2
    a, b = a / a.sum(), b / b.sum()
    ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ops.emd(x, y, ar, br).sum().backward()
    assert ar.grad.sum().abs().item() < 1e-12 and br.grad.sum().abs().item() < 1e-12
    # directional derivatives along mass-preserving directions, by central differences
    h = 1e-6
    for _ in range(3):
        da = torch.randn(1, 12, generator=gen, dtype=torch.float64)
        da -= da.mean()
        fd = (ops.emd(x, y, a + h * da, b) - ops.emd(x, y, a - h * da, b)) / (2 * h)
        assert fd.item() == pytest.approx((ar.grad * da).sum().item(), rel=1e-4, abs=1e-8)
        db = torch.randn(1, 9, generator=gen, dtype=torch.float64)
        db -= db.mean()
        fd = (ops.emd(x, y, a, b + h * db) - ops.emd(x, y, a, b - h * db)) / (2 * h)
        assert fd.item() == pytest.approx((br.grad * db).sum().item(), rel=1e-4, abs=1e-8)


def test_identical_sets_cost_zero():
    gen = torch.Generator().manual_seed(24)
    x = torch.rand(1, 40, 3, generator=gen, dtype=torch.float64)
    res = ops.emd(x, x[:, torch.randperm(40, generator=gen)], return_info=True)
    assert res.cost.item() == 0.0 and res.converged.all()


def test_opcheck():
    gen = torch.Generator().manual_seed(25)
    x, y = point_sets("random", 2, 8, 8, 3, gen)
    torch.library.opcheck(torch.ops.flashavatar.emd_forward.default, (x, y, None, None, 2, 1e-9, 100000))
    x2, y2 = point_sets("random", 1, 5, 7, 3, gen)
    a, b = torch.full((1, 5), 0.2, dtype=torch.float64), torch.full((1, 7), 1 / 7, dtype=torch.float64)
    torch.library.opcheck(torch.ops.flashavatar.emd_forward.default, (x2, y2, a, b, 1, 1e-9, 100000))


def test_bad_input_errors():
    x = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match=r"x \[2, 5, 3\] contains NaN or inf"):
        ops.emd(x.clone().index_fill_(1, torch.tensor([2]), float("nan")), x)
    with pytest.raises(ValueError, match=r"y \[2, 5, 3\] contains NaN or inf"):
        ops.emd(x, x.clone().index_fill_(1, torch.tensor([0]), float("inf")))
    with pytest.raises(ValueError, match="equal total mass"):
        ops.emd(x, x, torch.full((2, 5), 0.2), torch.full((2, 5), 0.3))
    with pytest.raises(ValueError, match="negative weights"):
        ops.emd(x, x, torch.tensor([[0.5, 0.5, 0.2, -0.2, 0.0]] * 2), torch.full((2, 5), 0.2))
    with pytest.raises(ValueError, match=r"b must have shape \[2, 5\]"):
        ops.emd(x, x, torch.full((2, 5), 0.2), torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="empty point set"):
        ops.emd(torch.rand(2, 0, 3), x)
    with pytest.raises(ValueError, match=r"y must have shape \[B, M, d\] = \[2, M, 3\]"):
        ops.emd(x, torch.rand(2, 5, 2))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.emd(torch.ones(2, 5, 3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        ops.emd(x, x, p=3)
    with pytest.raises(ValueError, match="return_assignment needs N == M"):
        ops.emd(x, torch.rand(2, 6, 3), return_assignment=True)
    with pytest.raises(ValueError, match="give both weights"):
        ops.emd(x, x, torch.full((2, 5), 0.2))
    assert_op_raises("torch.ops.flashavatar.emd_forward(torch.rand(2, 5, 3), torch.rand(3, 5, 3), None, None, 2, 1e-6, 10)",
                     "flashavatar::emd_forward: y must have shape")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="y is on cuda"):
            ops.emd(x, x.cuda())


def test_all_points_equal_and_unvalidated_nan_terminate():
    x = torch.zeros(1, 20, 3, dtype=torch.float64)
    res = ops.emd(x, x.clone(), return_assignment=True)
    assert res.cost.item() == 0.0 and res.converged.all()
    assert torch.equal(res.assignment[0].sort().values, torch.arange(20))
    # NaN with validate=False: no crash, no endless loop; reported as not converged
    bad = torch.rand(1, 20, 3, dtype=torch.float64)
    bad[0, 3, 1] = float("nan")
    res = ops.emd(bad, torch.rand(1, 20, 3, dtype=torch.float64), validate=False, max_iter=10_000, return_info=True)
    assert not res.converged.any()
