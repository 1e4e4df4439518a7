"""Losses and metrics: Huber, PSNR, SSIM, the W2 temporal term, the EMD term, configs."""

import itertools
import math

import numpy as np
import pytest
import torch

from flashavatar import config as config_mod
from flashavatar import losses, metrics, ops


def test_huber_matches_definition_and_mask_semantics():
    torch.manual_seed(0)
    pred, gt = torch.rand(2, 8, 9, 3), torch.rand(2, 8, 9, 3)
    d = (pred - gt).abs()
    ref = torch.where(d < 0.1, 0.5 * d**2, 0.1 * (d - 0.05)).mean()
    assert torch.allclose(losses.huber(pred, gt, 0.1), ref)
    mask = torch.zeros(2, 8, 9)
    mask[:, 2:4, 3:6] = 1
    ref_m = (torch.where(d < 0.1, 0.5 * d**2, 0.1 * (d - 0.05)) * mask[..., None]).mean()  # mean over the image
    assert torch.allclose(losses.huber(pred, gt, 0.1, mask=mask), ref_m)
    assert losses.huber(pred, gt, 0.1, mask=torch.zeros(2, 8, 9)) == 0


def test_psnr_known_value_and_mask():
    gt = torch.zeros(1, 4, 4, 3)
    pred = torch.full((1, 4, 4, 3), 0.1)
    assert metrics.psnr(pred, gt).item() == pytest.approx(20.0, abs=1e-4)
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = 1
    pred2 = gt.clone()
    pred2[0, 1:, :] = 1.0  # errors only outside the mask
    assert metrics.psnr(pred2, gt, mask).item() > 100
    with pytest.raises(ValueError, match="mask"):
        metrics.psnr(pred, gt, torch.ones(1, 5, 4))


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Direct per-pixel SSIM with an explicit 11x11 Gaussian window over the reflect-padded image."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    xp, yp = np.pad(x, 5, mode="reflect"), np.pad(y, 5, mode="reflect")
    h, wd = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(wd):
            a, b = xp[i:i + 11, j:j + 11], yp[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
            cov = (w * a * b).sum() - ma * mb
            c1, c2 = 0.01**2, 0.03**2
            out[i, j] = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return out.mean()


@pytest.mark.parametrize("blur", metrics.SSIM_BLURS)
def test_ssim_against_direct_reference(blur):
    torch.manual_seed(1)
    x = torch.rand(1, 20, 17, 1, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ours = metrics.ssim(x, y, blur=blur).item()
    assert ours == pytest.approx(_ssim_reference(x[0, ..., 0].numpy(), y[0, ..., 0].numpy()), abs=1e-6)
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-9)
    assert metrics.ssim(x, y).item() < 0.99


@pytest.mark.parametrize("size", [(20, 17), (6, 4)])  # reflect padding; replicate (image smaller than the window)
def test_ssim_blurs_agree_in_values_and_gradients(size):
    """The banded-matrix blur equals the two 1-D convolutions: values and gradients, float64 and float32."""
    torch.manual_seed(2)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x = torch.rand(2, *size, 3, dtype=dtype, requires_grad=True)
        y = torch.rand(2, *size, 3, dtype=dtype)
        cot = torch.randn(2, *size, dtype=dtype)
        maps = [metrics.ssim_map(x, y, blur=b) for b in ("conv", "matmul64")]
        assert maps[1].dtype == dtype
        torch.testing.assert_close(maps[1], maps[0], rtol=0, atol=tol)
        grads = [torch.autograd.grad((m * cot).sum(), x)[0] for m in maps]
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=tol * 10)
    with pytest.raises(ValueError, match="blur"):
        metrics.ssim_map(x, y, blur="fft")
    with pytest.raises(ValueError, match="ssim_blur"):
        config_mod.make_config("cpu", overrides={"loss": {"ssim_blur": "fft"}})


def _random_quats(*shape):
    return torch.nn.functional.normalize(torch.randn(*shape, 4, dtype=torch.float64), dim=-1)


def test_w2_zero_for_identical_and_finite_grads_on_isotropic():
    mu = torch.zeros(4, 3, requires_grad=True)
    s = torch.full((4, 3), 2.0, requires_grad=True)  # isotropic: equal eigenvalues
    q = _random_quats(4).float().requires_grad_()
    w2 = ops.gaussian_w2_from_scales_quats(mu, s, q, mu.detach() + 0.0, s.detach(), q.detach())
    assert torch.allclose(w2, torch.zeros(4), atol=1e-4)
    w2 = ops.gaussian_w2_from_scales_quats(mu, s, q, mu.detach() + 1.0, s.detach() * 1.5, q.detach())
    w2.sum().backward()
    for t in (mu, s, q):
        assert torch.isfinite(t.grad).all()
    # W2 of isotropic Gaussians is |dmu|^2 + 3 (s0 - s1)^2
    assert torch.allclose(w2, torch.full((4,), 3.0 + 3 * 1.0**2), atol=1e-4)


def test_wasserstein_temporal_millimetre_units_give_gradient():
    """In metres the Bures term of mm-sized Gaussians is ~1e-9; the mm scaling keeps it well resolved."""
    torch.manual_seed(3)
    s0 = (torch.rand(1, 50, 3) * 2e-3 + 1e-3).requires_grad_()
    q = _random_quats(1, 50).float()
    st0 = {"means": torch.zeros(1, 50, 3), "scales": s0, "quats": q}
    st1 = {"means": torch.zeros(1, 50, 3), "scales": s0.detach() * 1.1, "quats": q}
    loss = losses.wasserstein_temporal(st0, st1, unit_scale=1000.0)
    loss.backward()
    assert loss.item() > 1e-3
    assert s0.grad.abs().max() > 0


def test_emd_term_matches_brute_force():
    torch.manual_seed(4)
    x, y = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    ours = losses.emd(x, y)
    for b in range(2):
        best = min(((x[b] - y[b, list(p)]) ** 2).sum(-1).mean().item() for p in itertools.permutations(range(6)))
        assert ours[b].item() == pytest.approx(best, rel=1e-5)
    xg = x.clone().requires_grad_()
    losses.emd(xg, y).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_config_layers_and_errors(tmp_path):
    cfg = config_mod.make_config("cpu")
    assert cfg.train.iterations == config_mod.PRESETS["cpu"]["train"]["iterations"]
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  iterations: 77\nloss:\n  w2_weight: 0.05\n")
    cfg = config_mod.make_config("gpu", f, config_mod.parse_set(["train.batch_size=3", "model.parity=true"]))
    assert (cfg.train.iterations, cfg.loss.w2_weight, cfg.train.batch_size, cfg.model.parity) == (77, 0.05, 3, True)
    j = tmp_path / "c.json"
    j.write_text('{"model": {"uv_size": 64}}')
    assert config_mod.make_config(None, j).model.uv_size == 64
    config_mod.save(cfg, tmp_path / "saved.yaml")
    assert config_mod.load(tmp_path / "saved.yaml") == cfg
    with pytest.raises(ValueError, match="unknown key 'train.iteratons'"):
        config_mod.make_config("cpu", None, {"train": {"iteratons": 5}})
    with pytest.raises(ValueError, match="train.iterations. must be of type int"):
        config_mod.make_config("cpu", None, config_mod.parse_set(["train.iterations=abc"]))
    with pytest.raises(ValueError, match="unknown preset"):
        config_mod.make_config("tpu")
    with pytest.raises(ValueError, match="key=value"):
        config_mod.parse_set(["train.iterations"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        config_mod.make_config("cpu", tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        config_mod.make_config("cpu", None, {"train": {"batch_size": 0}})
    assert not math.isnan(cfg.loss.w2_unit_scale)
