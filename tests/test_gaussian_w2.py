"""gaussian_w2 against scipy's sqrtm (float64), gradcheck at random / isotropic / nearly flat inputs."""

import numpy as np
import pytest
import scipy.linalg
import torch
from op_checks import assert_op_raises

import flashavatar.ops as ops
from flashavatar.ops.reference import covariance_from_scales_quats_reference, gaussian_w2_reference

pytestmark = pytest.mark.skipif(not ops.available(), reason="flashavatar._C not built")


def random_spd(n, generator, scale=1.0, dtype=torch.float64):
    a = torch.randn(n, 3, 3, generator=generator, dtype=dtype)
    return scale * (a @ a.mT + 0.05 * torch.eye(3, dtype=dtype))


def random_rotations(n, generator, dtype=torch.float64):
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    return q / q.norm(dim=-1, keepdim=True)


def scipy_w2(mu0, cov0, mu1, cov1):
    out = []
    for m0, c0, m1, c1 in zip(mu0.numpy(), cov0.numpy(), mu1.numpy(), cov1.numpy()):
        r0 = scipy.linalg.sqrtm(c0).real
        bures = np.trace(scipy.linalg.sqrtm(r0 @ c1 @ r0).real)
        out.append(np.sum((m0 - m1) ** 2) + np.trace(c0) + np.trace(c1) - 2 * bures)
    return torch.tensor(out, dtype=torch.float64)


def flat_cov(n, generator, ratio):
    """Covariances with std-devs (1, 1, ratio) under random rotations."""
    scales = torch.tensor([1.0, 0.7, ratio], dtype=torch.float64).expand(n, 3)
    return covariance_from_scales_quats_reference(scales, random_rotations(n, generator))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_spd_matches_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    mu0, mu1 = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    cov0, cov1 = random_spd(64, g), random_spd(64, g)
    got = ops.gaussian_w2(mu0, cov0, mu1, cov1)
    torch.testing.assert_close(got, scipy_w2(mu0, cov0, mu1, cov1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got, gaussian_w2_reference(mu0, cov0, mu1, cov1), rtol=1e-9, atol=1e-12)


def test_equal_eigenvalues_and_identical():
    eye = torch.eye(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    aniso = random_spd(4, g)
    cov0 = torch.stack([eye, 2 * eye, eye, aniso[0], aniso[1]])
    cov1 = torch.stack([eye, 5 * eye, aniso[2], aniso[0], 3 * eye])
    mu = torch.zeros(5, 3, dtype=torch.float64)
    got = ops.gaussian_w2(mu, cov0, mu, cov1)
    torch.testing.assert_close(got, scipy_w2(mu, cov0, mu, cov1), rtol=1e-9, atol=1e-12)
    # Isotropic pairs in closed form: 3 (sqrt a - sqrt b)^2; identical -> 0.
    assert got[0].item() == pytest.approx(0.0, abs=1e-14)
    assert got[1].item() == pytest.approx(3 * (2**0.5 - 5**0.5) ** 2, rel=1e-12)
    assert got[3].item() == pytest.approx(0.0, abs=1e-12)


def test_nearly_flat_matches_scipy():
    g = torch.Generator().manual_seed(4)
    cov0, cov1 = flat_cov(32, g, 1e-3), flat_cov(32, g, 1e-2)
    mu = torch.zeros(32, 3, dtype=torch.float64)
    torch.testing.assert_close(ops.gaussian_w2(mu, cov0, mu, cov1), scipy_w2(mu, cov0, mu, cov1), rtol=1e-7, atol=1e-12)


def test_millimetre_gaussians_in_metres_keep_their_signal():
    # 1-3 mm std-devs in metre units: covariances ~1e-6, Bures term ~1e-7..1e-9; float32 inputs.
    g = torch.Generator().manual_seed(5)
    s0 = 1e-3 * (1 + 2 * torch.rand(256, 3, generator=g, dtype=torch.float64))
    s1 = s0 * (1 + 0.05 * torch.randn(256, 3, generator=g, dtype=torch.float64))
    q0 = random_rotations(256, g)
    q1 = q0 + 0.02 * torch.randn(256, 4, generator=g, dtype=torch.float64)
    cov0 = covariance_from_scales_quats_reference(s0, q0)
    cov1 = covariance_from_scales_quats_reference(s1, q1)
    mu = torch.zeros(256, 3, dtype=torch.float64)
    expected = scipy_w2(mu, cov0, mu, cov1)
    assert (expected > 1e-12).all()
    got64 = ops.gaussian_w2(mu, cov0, mu, cov1)
    torch.testing.assert_close(got64, expected, rtol=1e-6, atol=0)
    # float32 inputs round the covariances (relative 6e-8 of ~1e-6) -> W2 error small relative to the term itself.
    got32 = ops.gaussian_w2(mu.float(), cov0.float(), mu.float(), cov1.float())
    assert got32.dtype == torch.float32
    expected32 = scipy_w2(mu, cov0.float().double(), mu, cov1.float().double())
    torch.testing.assert_close(got32.double(), expected32, rtol=1e-4, atol=0)
    # The scales/quats form agrees and has a non-zero gradient at this scale.
    s0_ = s0.float().requires_grad_()
    w = ops.gaussian_w2_from_scales_quats(mu.float(), s0_, q0.float(), mu.float(), s1.float(), q1.float())
    torch.testing.assert_close(w.double(), expected, rtol=1e-3, atol=0)
    w.sum().backward()
    assert torch.isfinite(s0_.grad).all() and (s0_.grad.abs().sum(-1) > 0).all()


def _gradcheck_inputs(kind, seed):
    g = torch.Generator().manual_seed(seed)
    n = 6
    mu0, mu1 = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    if kind == "random":
        cov0, cov1 = random_spd(n, g), random_spd(n, g)
    elif kind == "isotropic":
        cov0, cov1 = 0.5 * eye.clone(), torch.cat([0.5 * eye[:2], 2.0 * eye[2:4], random_spd(2, g)])
    else:  # nearly flat
        cov0, cov1 = flat_cov(n, g, 1e-2), flat_cov(n, g, 3e-2)
    return mu0, cov0, mu1, cov1


@pytest.mark.parametrize("kind", ["random", "isotropic", "flat"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_cov_form(kind, seed):
    mu0, cov0, mu1, cov1 = _gradcheck_inputs(kind, seed)
    # non-contiguous covariance input (transposed view of a symmetric matrix)
    cov0 = cov0.mT.contiguous().mT
    args = [t.clone().requires_grad_() for t in (mu0, cov0, mu1, cov1)]
    assert torch.autograd.gradcheck(ops.gaussian_w2, args)


@pytest.mark.parametrize("kind", ["random", "isotropic", "flat"])
def test_gradcheck_scales_quats_form(kind):
    g = torch.Generator().manual_seed(7)
    n = 5
    mu0, mu1 = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    if kind == "random":
        s0, s1 = 0.5 + torch.rand(n, 3, generator=g, dtype=torch.float64), 0.5 + torch.rand(n, 3, generator=g, dtype=torch.float64)
    elif kind == "isotropic":
        s0, s1 = torch.full((n, 3), 0.3, dtype=torch.float64), torch.full((n, 3), 0.3, dtype=torch.float64)
    else:
        s0 = torch.tensor([1.0, 0.8, 0.01], dtype=torch.float64).repeat(n, 1)
        s1 = torch.tensor([0.9, 0.7, 0.02], dtype=torch.float64).repeat(n, 1)
    q0, q1 = 1.5 * random_rotations(n, g), random_rotations(n, g)
    args = [t.clone().requires_grad_() for t in (mu0, s0, q0, mu1, s1, q1)]
    assert torch.autograd.gradcheck(ops.gaussian_w2_from_scales_quats, args)


def test_gradient_finite_at_identical_isotropic():
    eye = torch.eye(3, dtype=torch.float64).expand(4, 3, 3).clone()
    cov0 = eye.clone().requires_grad_()
    mu = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    w = ops.gaussian_w2(mu, cov0, mu.detach(), eye)
    w.sum().backward()
    assert torch.isfinite(cov0.grad).all() and torch.isfinite(mu.grad).all()
    # at cov0 = cov1 the Bures term is at its minimum: zero gradient
    torch.testing.assert_close(cov0.grad, torch.zeros_like(cov0.grad), atol=1e-10, rtol=0)
    # isotropic scales/quats, identical: finite zero gradients too
    s = torch.full((4, 3), 2e-3, dtype=torch.float32, requires_grad=True)
    q = torch.tensor([[1.0, 0, 0, 0]]).expand(4, 4).clone().requires_grad_()
    mu32 = torch.zeros(4, 3)
    ops.gaussian_w2_from_scales_quats(mu32, s, q, mu32, s.detach(), q.detach()).sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(q.grad).all()


def test_scales_quats_form_matches_cov_form_and_broadcasts():
    g = torch.Generator().manual_seed(8)
    s0 = 0.1 + torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    q0 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    s1 = 0.1 + torch.rand(5, 3, generator=g, dtype=torch.float64)
    q1 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    mu0 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    mu1 = torch.randn(3, generator=g, dtype=torch.float64)
    got = ops.gaussian_w2_from_scales_quats(mu0, s0, q0, mu1, s1, q1)
    assert got.shape == (2, 5)
    expected = gaussian_w2_reference(
        mu0, covariance_from_scales_quats_reference(s0, q0), mu1.expand(2, 5, 3),
        covariance_from_scales_quats_reference(s1, q1).expand(2, 5, 3, 3),
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # gradient of a broadcast argument is reduced to its shape
    mu1_ = mu1.clone().requires_grad_()
    ops.gaussian_w2_from_scales_quats(mu0, s0, q0, mu1_, s1, q1).sum().backward()
    assert mu1_.grad.shape == (3,)


def test_empty_and_opcheck():
    empty = ops.gaussian_w2(torch.zeros(0, 3), torch.zeros(0, 3, 3), torch.zeros(0, 3), torch.zeros(0, 3, 3))
    assert empty.shape == (0,)
    g = torch.Generator().manual_seed(9)
    mu0, cov0, mu1, cov1 = _gradcheck_inputs("random", 9)
    torch.library.opcheck(torch.ops.flashavatar.gaussian_w2.default, (mu0, cov0, mu1, cov1))
    s = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1
    q = torch.randn(4, 4, generator=g, dtype=torch.float64)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.flashavatar.gaussian_w2_sq.default, (mu, s, q, mu, s.flip(0), q.flip(0)))


def test_bad_input_errors_name_the_argument():
    mu, cov = torch.zeros(4, 3), torch.eye(3).expand(4, 3, 3)
    with pytest.raises(ValueError, match=r"cov1 must have shape \[\.\.\., 3, 3\], got \[4, 3\]"):
        ops.gaussian_w2(mu, cov, mu, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="mu0 must have shape"):
        ops.gaussian_w2(torch.zeros(4, 2), cov, mu, cov)
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.gaussian_w2(mu, cov, torch.zeros(5, 3), cov)
    with pytest.raises(ValueError, match="quats1 must have shape"):
        ops.gaussian_w2_from_scales_quats(mu, mu, torch.ones(4, 4), mu, mu, torch.ones(4, 3))
    assert_op_raises("mu = torch.zeros(4, 3); torch.ops.flashavatar.gaussian_w2(mu, torch.zeros(4, 3, 2), mu, torch.zeros(4, 3, 2))",
                     "flashavatar::gaussian_w2: cov0 must have shape")
