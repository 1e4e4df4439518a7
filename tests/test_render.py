"""Rendering side: the pure-torch rasteriser stand-in, PLY files, video/frames/metrics of a trained run."""

import json
import math

import numpy as np
import pytest
import torch

from flashavatar import ply
from flashavatar.ops import rasterize_gaussians
from flashavatar.rasterizer_choice import batched_reference


# The compiled op and the dense reference must both reproduce these hand-computed images.
RASTERIZERS = [pytest.param(rasterize_gaussians, id="ops"), pytest.param(batched_reference, id="reference")]


@pytest.mark.parametrize("rasterize", RASTERIZERS)
def test_single_gaussian_matches_closed_form(rasterize):
    means = torch.tensor([[0.0, 0.0, 2.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]])
    scales = torch.full((1, 3), 0.02)
    colors = torch.tensor([[0.2, 0.4, 0.6]])
    K = torch.tensor([[[100.0, 0, 16], [0, 100.0, 16], [0, 0, 1]]])
    r, a, meta = rasterize(means, quats, scales, torch.tensor([0.7]), colors, torch.eye(4)[None], K, 32, 32,
                           backgrounds=torch.tensor([[0.0, 1.0, 0.0]]))
    var = (100.0 * 0.02 / 2.0) ** 2 + 0.3  # EWA variance in pixels + the low-pass
    for (py, px) in ((16, 16), (16, 18), (13, 15)):
        dx, dy = px + 0.5 - 16, py + 0.5 - 16
        alpha = min(0.99, 0.7 * math.exp(-0.5 * (dx * dx + dy * dy) / var))
        alpha = alpha if alpha >= 1 / 255 else 0.0
        assert a[0, py, px, 0].item() == pytest.approx(alpha, abs=1e-5)
        want = torch.tensor([0.2, 0.4, 0.6]) * alpha + torch.tensor([0.0, 1.0, 0.0]) * (1 - alpha)
        assert torch.allclose(r[0, py, px], want, atol=1e-5)
    # expected depth sum_i w_i z_i is not normalised by alpha
    assert (meta["depth"][0, 16, 16, 0] / a[0, 16, 16, 0]).item() == pytest.approx(2.0, abs=1e-4)
    # far corner: below 1/255, nothing
    assert a[0, 0, 0, 0].item() == 0.0


@pytest.mark.parametrize("rasterize", RASTERIZERS)
def test_near_culling_and_front_to_back_order(rasterize):
    K = torch.tensor([[[50.0, 0, 8.5], [0, 50.0, 8.5], [0, 0, 1]]])  # pixel (8, 8) centre on the axis
    means = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.005]])  # the last is before the near plane
    colors = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    quats, scales = torch.tensor([[1.0, 0, 0, 0]] * 3), torch.full((3, 3), 0.5)
    r, a, meta = rasterize(means, quats, scales, torch.tensor([0.99, 0.9, 0.99]), colors, torch.eye(4)[None],
                           K, 16, 16)
    # the near one is culled; red (z=1) in front of blue: 0.99 red, 0.9 * 0.01 blue
    assert torch.allclose(r[0, 8, 8], torch.tensor([0.99, 0.0, 0.009]), atol=1e-5)
    if "radii" in meta:  # the reference returns no radii
        assert meta["radii"][0, 2].item() == 0
    # blue at 0.99 would bring T to 1e-4: the pixel stops before it
    r, a, meta = rasterize(means, quats, scales, torch.tensor([0.99, 0.99, 0.99]), colors, torch.eye(4)[None],
                           K, 16, 16)
    assert torch.allclose(r[0, 8, 8], torch.tensor([0.99, 0.0, 0.0]), atol=1e-6)


def test_ply_round_trip(tmp_path):
    n = 37
    g = torch.Generator().manual_seed(0)
    means = torch.randn(n, 3, generator=g)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.01 + 1e-4
    opac = torch.rand(n, generator=g) * 0.98 + 0.01
    sh = torch.randn(n, 9, 3, generator=g)  # degree 2: padded to 45 f_rest
    path = tmp_path / "g.ply"
    assert ply.write_gaussians_ply(path, means, quats, scales, opac, sh) == n
    back = ply.read_gaussians_ply(path)
    names = back["property_names"]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert names[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert back["means"].shape == (n, 3)
    np.testing.assert_allclose(back["means"], means.numpy(), rtol=1e-6)
    np.testing.assert_allclose(back["scales"], scales.numpy(), rtol=1e-5)
    np.testing.assert_allclose(back["opacities"], opac.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(back["quats"], quats.numpy(), atol=1e-6)
    np.testing.assert_allclose(back["sh"][:, :9], sh.numpy(), rtol=1e-6)
    assert np.all(back["sh"][:, 9:] == 0)
    with pytest.raises(ValueError, match="sh must be"):
        ply.write_gaussians_ply(tmp_path / "bad.ply", means, quats, scales, opac, torch.zeros(n, 5, 3))
    with pytest.raises(ValueError, match="non-finite"):
        ply.write_gaussians_ply(tmp_path / "bad.ply", means * float("nan"), quats, scales, opac, sh)
    assert not (tmp_path / "bad.ply").exists()


# ------------------------------------------------------------------------- a trained run, end to end
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from flashavatar import config as config_mod
    from flashavatar.model.synthetic import make_subject
    from flashavatar.train import Trainer

    root = tmp_path_factory.mktemp("render")
    make_subject(root / "data", "synthetic", n_frames=10, size=48)
    cfg = config_mod.make_config(None, None, {
        "data": {"data_root": str(root / "data"), "n_test": 3},
        "model": {"uv_size": 16, "sh_degree": 1, "mlp_hidden": 32, "mlp_layers": 2},
        "train": {"iterations": 10, "batch_size": 2, "progress": False, "tensorboard": False, "preview_every": 5,
                  "checkpoint_every": 0, "eval_frames": 2},
    })
    trainer = Trainer(cfg, root / "run", device="cpu")
    trainer.run()
    return root, trainer


@pytest.mark.video
def test_render_writes_frames_video_and_metrics(trained_run, tmp_path):
    import imageio.v3 as iio

    from flashavatar.render import render_and_report
    from flashavatar.session import load_run

    root, trainer = trained_run
    assert sorted(p.name for p in (root / "run" / "previews").glob("*.png")) == ["000005.png", "000010.png"]
    session, ckpt = load_run(root / "run", "cpu")
    assert ckpt["iteration"] == 10
    result = render_and_report(session, tmp_path, robust_stds=[0.001, 0.005], flicker=True, progress=False)
    frames = sorted((tmp_path / "frames").glob("*.png"))
    assert [p.name for p in frames] == ["00007.png", "00008.png", "00009.png"]  # the last 3 tracker frames
    assert iio.imread(frames[0]).shape == (48, 48, 3)
    video = iio.imread(tmp_path / "test_side_by_side.mp4", index=None)
    assert video.shape[0] == 3 and video.shape[1:3] == (48, 96)  # ground truth | render
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["frames"] == 3 and "masking" in saved
    m = saved["mean"]
    for key in ("psnr_full", "psnr_head", "ssim_full", "ssim_head"):
        assert math.isfinite(m[key])
    assert 0 < m["ssim_full"] <= 1 and m["psnr_full"] > 5
    assert [r["noise_std"] for r in saved["robustness"]] == [0.001, 0.005]
    assert math.isfinite(saved["flicker"]["excess"])
    # metrics agree with a direct computation on the written frame (PNG quantisation aside)
    from flashavatar import metrics

    gt = session.test_frames.batch(torch.tensor([0]), session.device)["gt"]
    pred = torch.from_numpy(iio.imread(frames[0])).float()[None] / 255
    assert metrics.psnr(pred, gt).item() == pytest.approx(saved["per_frame"]["psnr_full"][0], abs=0.2)


@pytest.mark.video
def test_export_and_reenact_produce_valid_files(trained_run, tmp_path):
    import imageio.v3 as iio

    from flashavatar.data_adapter import load_tracker_sequence
    from flashavatar.export import export_frame
    from flashavatar.reenact import reenact, transfer_codes
    from flashavatar.session import load_run

    root, trainer = trained_run
    session, _ = load_run(root / "run", "cpu")
    n = export_frame(session, tmp_path / "f.ply", frame_id=8, split="test")
    back = ply.read_gaussians_ply(tmp_path / "f.ply")
    assert n == session.num_gaussians == back["means"].shape[0]
    assert len(back["property_names"]) == 62 and back["property_names"][-1] == "rot_3"
    g = session.gaussians({k: v for k, v in session.test_frames.codes_at(torch.tensor([1])).items()})
    np.testing.assert_allclose(back["means"], g["means"][0].detach().numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="--frame 999"):
        export_frame(session, tmp_path / "x.ply", frame_id=999)

    driver = load_tracker_sequence(root / "data" / "tracker", "synthetic")
    summary = reenact(session, driver, tmp_path / "re", max_frames=4, camera="driver")
    assert summary["frames"] == 4
    assert len(list((tmp_path / "re" / "frames").glob("*.png"))) == 4
    assert iio.imread(tmp_path / "re" / "reenactment.mp4", index=None).shape[0] == 4
    # driving A with its own sequence relative to the same neutral frame reproduces A's own codes
    src = session.train_frames
    own = {k: v for k, v in src.codes_at(torch.arange(len(src))).items()}
    n0 = {k: v[:1] for k, v in own.items()}
    moved = transfer_codes(n0, own, n0)
    for k in ("expr", "eyelids"):
        assert torch.allclose(moved[k], own[k], atol=1e-6)
    from flashavatar.model.camera import rot6d_to_matrix

    assert torch.allclose(rot6d_to_matrix(moved["jaw"]), rot6d_to_matrix(own["jaw"]), atol=1e-5)
