"""CUDA kernels of emd and gaussian_w2 against their CPU twins (and POT for larger N). Skipped without a GPU."""

import numpy as np
import ot
import pytest
import torch

import flashavatar.ops as ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not ops.cuda_compiled(), reason="built without CUDA kernels")]


def pot_cost(x, y, p=2):
    xn, yn = x.double().cpu(), y.double().cpu()
    cost = ((xn[:, None, :] - yn[None, :, :]).norm(dim=-1) ** p).numpy()
    n, m = cost.shape
    return float(ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost, numItermax=10**8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_w2_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    n = 5000
    mu0, mu1 = torch.randn(n, 3, generator=gen, dtype=dtype), torch.randn(n, 3, generator=gen, dtype=dtype)
    s0, s1 = 1e-3 * (0.1 + torch.rand(n, 3, generator=gen, dtype=dtype)), 1e-3 * (0.1 + torch.rand(n, 3, generator=gen, dtype=dtype))
    q0, q1 = torch.randn(n, 4, generator=gen, dtype=dtype), torch.randn(n, 4, generator=gen, dtype=dtype)
    s1[:100] = s0[:100]  # isotropic / identical pairs too
    q1[:100] = q0[:100]
    args = [mu0, s0, q0, mu1, s1, q1]
    cpu = [t.clone().requires_grad_() for t in args]
    gpu = [t.cuda().requires_grad_() for t in args]
    w_cpu = ops.gaussian_w2_from_scales_quats(*cpu)
    w_gpu = ops.gaussian_w2_from_scales_quats(*gpu)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=rtol, atol=1e-14)
    cot = torch.randn(n, generator=gen, dtype=dtype)
    w_cpu.backward(cot)
    w_gpu.backward(cot.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.isfinite(b.grad).all()
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=rtol * 10, atol=1e-6 if dtype == torch.float32 else 1e-9)
    # covariance form
    cov0 = torch.randn(n, 3, 3, generator=gen, dtype=dtype)
    cov0 = cov0 @ cov0.mT
    cov1 = cov0.flip(0) + 0.1 * torch.eye(3, dtype=dtype)
    torch.testing.assert_close(ops.gaussian_w2(mu0.cuda(), cov0.cuda(), mu1.cuda(), cov1.cuda()).cpu(),
                               ops.gaussian_w2(mu0, cov0, mu1, cov1), rtol=rtol, atol=1e-10)
    torch.library.opcheck(torch.ops.flashavatar.gaussian_w2.default, (mu0[:8].cuda(), cov0[:8].cuda(), mu1[:8].cuda(), cov1[:8].cuda()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,p", [(2, 2), (3, 2), (3, 1), (5, 2)])
def test_emd_cuda_matches_cpu(dtype, d, p):
    gen = torch.Generator().manual_seed(d * 10 + p)
    x = torch.rand(3, 300, d, generator=gen, dtype=dtype)
    y = torch.rand(3, 300, d, generator=gen, dtype=dtype)
    y[1] = x[1][torch.randperm(300, generator=gen)]  # zero cost item
    y[2, :100] = y[2, 100:200]  # duplicates
    tol = 1e-6
    cpu = ops.emd(x, y, p=p, tol=tol, return_assignment=True)
    gpu = ops.emd(x.cuda(), y.cuda(), p=p, tol=tol, return_assignment=True)
    assert gpu.cost.device.type == "cuda" and gpu.converged.all()
    # same algorithm, same rounds; only rounding (FMA contraction) can change tie-breaks, so compare costs
    torch.testing.assert_close(gpu.cost.cpu().double(), cpu.cost.double(), rtol=2 * tol, atol=1e-7 if dtype == torch.float32 else 1e-12)
    for bi in range(3):
        assert torch.equal(gpu.assignment[bi].cpu().sort().values, torch.arange(300))
        expected = pot_cost(x[bi], y[bi], p)
        assert gpu.cost[bi].item() - expected <= (tol + (1e-6 if dtype == torch.float32 else 0)) * expected + 1e-12
        assert gpu.cost[bi].item() >= expected * (1 - (1e-6 if dtype == torch.float32 else 1e-12)) - 1e-12


@pytest.mark.parametrize("n", [1, 2, 33, 1024, 2048])
def test_emd_cuda_larger_n_vs_pot(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.rand(2, n, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(2, n, 3, generator=gen, dtype=torch.float64)
    res = ops.emd(x.cuda(), y.cuda(), tol=1e-7, return_assignment=True)
    assert res.converged.all()
    for bi in range(2):
        expected = pot_cost(x[bi], y[bi])
        assert abs(res.cost[bi].item() - expected) <= 1e-7 * expected + 1e-15
        assert torch.equal(res.assignment[bi].cpu().sort().values, torch.arange(n))


def test_emd_cuda_global_memory_path_matches_cpu():
    # 10k objects do not fit in shared memory (24 B each): the kernel keeps prices/bids in global memory.
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, 10000, 3, generator=gen)
    y = torch.rand(1, 10000, 3, generator=gen)
    gpu = ops.emd(x.cuda(), y.cuda(), tol=1e-5, return_info=True)
    cpu = ops.emd(x, y, tol=1e-5, return_info=True)
    assert gpu.converged.all() and cpu.converged.all()
    torch.testing.assert_close(gpu.cost.cpu(), cpu.cost, rtol=2e-5, atol=0)


@pytest.mark.parametrize("n", [300, 4096, 6000])
def test_emd_cuda_prefilter_matches_plain_scan(n):
    # float32, d = 3: records + float32 pre-filter (at 4096 the records, prices and owners sit in shared memory
    # and the bidder lists in global memory; at 6000 part of the per-object state is global too). Padding a zero
    # coordinate (d = 4) gives the same costs through the plain scan: same rounds up to FMA contraction.
    gen = torch.Generator().manual_seed(n + 7)
    x = torch.rand(1, n, 3, generator=gen)
    y = torch.rand(1, n, 3, generator=gen)
    y[0, : n // 10] = x[0, : n // 10] + 1e-4  # near-ties next to the bulk
    pad = lambda t: torch.nn.functional.pad(t, (0, 1)).cuda()  # noqa: E731
    filtered = ops.emd(x.cuda(), y.cuda(), tol=1e-6, return_info=True)
    plain = ops.emd(pad(x), pad(y), tol=1e-6, return_info=True)
    assert filtered.converged.all() and plain.converged.all()
    torch.testing.assert_close(filtered.cost.cpu(), plain.cost.cpu(), rtol=2e-6, atol=0)
    assert (filtered.gap <= 1e-6 * filtered.cost).all()
    if n <= 4096:
        expected = pot_cost(x[0], y[0])
        assert abs(filtered.cost[0].item() - expected) <= 2e-6 * expected
        # the potentials come back in the caller's object order: dual feasible, tight on the assignment
        # (the solver worked on the objects in kd order)
        cost = torch.cdist(x[0].double(), y[0].double()) ** 2  # [n, n]
        f, g = filtered.f[0].cpu(), filtered.g[0].cpu()
        assert (f[:, None] + g[None, :] - cost).max().item() <= 1e-6
        tight = f + g[filtered.assignment[0].cpu()] - cost[torch.arange(n), filtered.assignment[0].cpu()]
        assert tight.abs().max().item() <= 1e-4


def _pair(seed=6):
    gen = torch.Generator().manual_seed(seed)
    return gen, torch.rand(2, 64, 3, generator=gen, dtype=torch.float64), torch.rand(2, 64, 3, generator=gen, dtype=torch.float64)


def test_emd_cuda_gradients_match_cpu():
    gen, x, y = _pair()
    grads = []
    for dev in ("cpu", "cuda"):
        xr, yr = x.detach().clone().to(dev).requires_grad_(), y.detach().clone().to(dev).requires_grad_()
        ops.emd(xr, yr, tol=1e-10).sum().backward()
        grads.append((xr.grad.cpu(), yr.grad.cpu()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)


def test_emd_cuda_max_iter():
    gen, x, y = _pair()
    with pytest.warns(RuntimeWarning):
        res = ops.emd(x.cuda(), y.cuda(), max_iter=2, return_assignment=True)
    assert not res.converged.any() and (res.iterations == 2).all()
    assert torch.equal(res.assignment[0].cpu().sort().values, torch.arange(64))


def test_emd_cuda_max_iter_stops_eviction_chains():
    # float32, d = 3: one-bidder rounds run as eviction chains inside one warp, several rounds per pass of the
    # round loop; a chain must stop at max_iter exactly, and the assignment is completed from the free objects.
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(1, 300, 3, generator=gen)
    y = torch.rand(1, 300, 3, generator=gen)
    full = ops.emd(x.cuda(), y.cuda(), tol=1e-6, return_info=True)
    total = int(full.iterations.item())
    assert full.converged.all() and total > 100
    for k in sorted({1, 2, total // 3, total // 2, 3 * total // 4}):
        with pytest.warns(RuntimeWarning):
            res = ops.emd(x.cuda(), y.cuda(), tol=1e-6, max_iter=k, return_assignment=True)
        assert not res.converged.any() and res.iterations.item() == k
        assert torch.equal(res.assignment[0].cpu().sort().values, torch.arange(300))
        assert res.cost.item() >= full.cost.item() * (1 - 1e-6)


def test_emd_cuda_transport_fallback_and_opcheck():
    gen, x, y = _pair()
    # N != M with weights: solved on a host copy, results on the GPU
    a = torch.rand(2, 64, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(2, 40, generator=gen, dtype=torch.float64) + 0.1
    b = b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)
    xr = x.cuda().requires_grad_()
    cost = ops.emd(xr, y[:, :40].cuda(), a.cuda(), b.cuda())
    assert cost.device.type == "cuda"
    torch.testing.assert_close(cost.cpu(), ops.emd(x, y[:, :40], a, b), rtol=1e-12, atol=0)
    cost.sum().backward()
    assert xr.grad.device.type == "cuda" and torch.isfinite(xr.grad).all()
    torch.library.opcheck(torch.ops.flashavatar.emd_forward.default,
                          (x[:, :8].contiguous().cuda(), y[:, :8].contiguous().cuda(), None, None, 2, 1e-9, 100000))
