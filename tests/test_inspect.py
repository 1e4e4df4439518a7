"""``flashavatar inspect``: OBJ/PLY/overlay files whose contents match FLAME and the avatar."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flashavatar import cli
from flashavatar import inspect_cmd as I
from flashavatar.data import masks as M

SIZE = (48, 64)  # (h, w): non-square, principal point off-centre, so swapped axes or ignored cx/cy show
UV_SIZE = 32


def camera(h, w, distance=1.0):
    """A camera on the +z axis looking at the head (OpenCV: x right, y down, z forward)."""
    R = np.diag([1.0, -1.0, -1.0])[None].astype(np.float32)  # world y up -> image y down; looks along -z
    t = np.array([[0.0, 0.0, distance]], np.float32)
    K = np.array([[[200.0, 0.0, w / 2 + 3.0], [0.0, 200.0, h / 2 - 2.0], [0.0, 0.0, 1.0]]], np.float32)
    return R, t, K


def tracker_frame(k, jaw_angle=0.0, size=SIZE):
    h, w = size
    R, t, K = camera(h, w)
    c, s = np.cos(jaw_angle), np.sin(jaw_angle)
    jaw = np.array([[1, 0, 0, 0, c, -s]], np.float32)  # rows of a rotation about x
    return {"flame": {"exp": np.zeros((1, 100), np.float32), "shape": np.zeros((1, 300), np.float32),
                      "jaw": jaw, "eyes": np.tile(np.array([[1, 0, 0, 0, 1, 0]], np.float32), (1, 2)),
                      "eyelids": np.zeros((1, 2), np.float32)},
            "opencv": {"R": R, "t": t, "K": K}, "img_size": np.array([h, w]), "frame_id": k, "global_step": 0}


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from flashavatar.model.synthetic import write_head_model

    root = tmp_path_factory.mktemp("inspect")
    head_model = write_head_model(root / "flame")
    h, w = SIZE
    gradient = np.zeros((h, w, 3), np.uint8)
    gradient[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    gradient[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    for k in (1, 2, 3):
        M.write_jpg(root / "data" / "s" / "imgs" / f"{k:05d}.jpg", gradient, quality=100)
        path = root / "tracker" / "s" / "checkpoint" / f"{k - 1:05d}.frame"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tracker_frame(k - 1, jaw_angle=0.15 * (k - 1)), path)
    return root, head_model, gradient


def read_obj(path):
    vertices, faces = [], []
    for line in path.read_text().splitlines():
        if line.startswith("v "):
            vertices.append([float(v) for v in line.split()[1:]])
        elif line.startswith("f "):
            faces.append([int(v) for v in line.split()[1:]])
    return np.array(vertices), np.array(faces)


def test_inspect_writes_obj_ply_overlay_matching_the_model(subject, tmp_path):
    from plyfile import PlyData

    from flashavatar.model import FLAME

    root, head_model, gradient = subject
    out = tmp_path / "out"
    argv = ["inspect", str(root / "data"), str(root / "tracker"), "--id", "s", "--head-model", str(head_model),
            "--frames", "1,3", "--uv-size", str(UV_SIZE), "--out", str(out)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "00001_gaussians.ply", "00001_mesh.obj", "00001_overlay.png",
        "00003_gaussians.ply", "00003_mesh.obj", "00003_overlay.png"]

    flame = FLAME(head_model)
    frame = I.load_frame(root / "data", root / "tracker", "s", 3)
    avatar = I.fresh_avatar(flame, I.find_template(head_model), frame.codes["shape"], uv_size=UV_SIZE)
    with torch.no_grad():
        expected = avatar({k: v[:, :300] if k == "shape" else v for k, v in frame.codes.items()})

    vertices, faces = read_obj(out / "00003_mesh.obj")
    assert vertices.shape == (flame.n_vertices, 3) and faces.shape == (flame.n_mesh_faces, 3)
    np.testing.assert_allclose(vertices, expected["vertices"][0].numpy(), atol=2e-6)
    np.testing.assert_array_equal(faces - 1, flame.faces[: flame.n_mesh_faces].numpy())
    # the jaw opens between frames 1 and 3: the meshes differ
    assert np.abs(read_obj(out / "00001_mesh.obj")[0] - vertices).max() > 1e-3

    ply = PlyData.read(str(out / "00003_gaussians.ply"))
    points = ply["vertex"]
    assert points.count == avatar.n_gaussians
    xyz = np.stack([points["x"], points["y"], points["z"]], axis=1)
    np.testing.assert_allclose(xyz, expected["means"][0].numpy(), atol=1e-6)
    # image colours: every point in front of the camera takes the pixel under its projection
    pixels, depth = I.project(torch.as_tensor(xyz), frame.viewmat, frame.K)
    col, row = np.floor(pixels[:, 0]).astype(int), np.floor(pixels[:, 1]).astype(int)
    inside = (depth > 0) & (col >= 0) & (col < SIZE[1]) & (row >= 0) & (row < SIZE[0])
    assert inside.sum() > 0.5 * len(xyz)
    image = np.asarray(Image.open(root / "data" / "s" / "imgs" / "00003.jpg"))
    np.testing.assert_array_equal(points["red"][inside], image[row[inside], col[inside], 0])

    overlay = np.asarray(Image.open(out / "00003_overlay.png")).astype(int)
    assert overlay.shape == (*SIZE, 3)
    # changed exactly where the projected mesh lies (within a pixel of the vertex hull), unchanged elsewhere
    vpix, _ = I.project(torch.as_tensor(vertices), frame.viewmat, frame.K)
    x0, y0 = np.floor(vpix.min(0)).astype(int) - 1
    x1, y1 = np.ceil(vpix.max(0)).astype(int) + 1
    changed = np.abs(overlay - image).max(-1) > 2
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 50
    assert rows.min() >= y0 and rows.max() <= y1 and cols.min() >= x0 and cols.max() <= x1
    cy, cx = int(round(vpix[:, 1].mean())), int(round(vpix[:, 0].mean()))
    assert changed[cy, cx]


def test_inspect_colour_modes_and_mouth_faces(subject, tmp_path):
    from plyfile import PlyData

    from flashavatar.model import FLAME

    root, head_model, _ = subject
    flame = FLAME(head_model)
    frames = [I.load_frame(root / "data", root / "tracker", "s", 2)]
    avatar = I.fresh_avatar(flame, I.find_template(head_model), frames[0].codes["shape"], uv_size=UV_SIZE)
    results = I.inspect_frames(flame, avatar, frames, tmp_path, colour="region", mouth_faces=True)
    assert results[0]["faces"] == flame.faces.shape[0] > flame.n_mesh_faces
    assert read_obj(tmp_path / "00002_mesh.obj")[1].shape[0] == flame.faces.shape[0]
    points = PlyData.read(str(tmp_path / "00002_gaussians.ply"))["vertex"]
    is_mouth = avatar.is_mouth.numpy()
    assert is_mouth.any()
    assert np.all(points["red"][is_mouth] == 220) and np.all(points["red"][~is_mouth] == 180)
    I.inspect_frames(flame, avatar, frames, tmp_path, colour="avatar")
    points = PlyData.read(str(tmp_path / "00002_gaussians.ply"))["vertex"]
    assert np.all(points["green"] == 128)  # untrained SH DC = 0 -> grey 0.5


def test_inspect_errors_name_the_file(subject, tmp_path, capsys):
    root, head_model, _ = subject
    base = ["inspect", str(root / "data"), str(root / "tracker"), "--id", "s", "--head-model", str(head_model),
            "--uv-size", str(UV_SIZE), "--out", str(tmp_path)]
    assert cli.main(base + ["--frames", "7"]) == 2
    assert "no image 00007.jpg" in capsys.readouterr().err
    broken = tracker_frame(0)
    del broken["opencv"]["K"]
    torch.save(broken, tmp_path / "00000.frame")
    bad_root = tmp_path / "tracker_bad"
    (bad_root / "s" / "checkpoint").mkdir(parents=True)
    (tmp_path / "00000.frame").rename(bad_root / "s" / "checkpoint" / "00000.frame")
    assert cli.main(["inspect", str(root / "data"), str(bad_root), "--id", "s", "--head-model", str(head_model),
                     "--frames", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "00000.frame" in err and "missing key 'opencv.K'" in err
    assert I.parse_frames("2-3,1", [1, 2, 3]) == [2, 3, 1]
    assert I.parse_frames(None, [1, 2, 3, 4, 5]) == [1, 3, 5]


def test_inspect_a_trained_run_uses_its_avatar(subject, tmp_path):
    """--run: FLAME, avatar weights and data paths come from a run folder (config.yaml + checkpoint)."""
    from plyfile import PlyData

    from flashavatar import config as config_mod
    from flashavatar.io_utils import save_checkpoint
    from flashavatar.session import AvatarSession

    root, head_model, _ = subject
    cfg = config_mod.from_dict({"data": {"data_root": str(root / "data"), "tracker_root": str(root / "tracker"),
                                         "subject": "s", "n_test": 1},
                                "model": {"head_model": str(head_model), "uv_size": UV_SIZE},
                                "train": {"device": "cpu"}})
    run = tmp_path / "run"
    config_mod.save(cfg, run / "config.yaml")
    session = AvatarSession.build(cfg, torch.device("cpu"), load_frames=False)
    avatar = session.avatar
    with torch.no_grad():  # "trained" colours and offsets
        avatar.features_dc.copy_(torch.rand(avatar.features_dc.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        avatar.mlp_out.bias.copy_(torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0]))  # Δx = +0.46 m in x
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": avatar.state_dict()})

    out = tmp_path / "out"
    assert cli.main(["inspect", "--run", str(run), "--frames", "2", "--out", str(out)]) == 0
    points = PlyData.read(str(out / "00002_gaussians.ply"))["vertex"]
    assert points.count == avatar.n_gaussians
    expected = np.round(np.clip(0.5 + I.SH_C0 * avatar.features_dc[:, 0].detach().numpy(), 0, 1) * 255)
    np.testing.assert_array_equal(np.stack([points["red"], points["green"], points["blue"]], 1), expected)
    frame = I.load_frame(root / "data", root / "tracker", "s", 2)
    with torch.no_grad():
        means = avatar(frame.codes)["means"][0].numpy()
    np.testing.assert_allclose(np.stack([points["x"], points["y"], points["z"]], 1), means, atol=1e-6)
    assert means[:, 0].mean() > 0.3  # the trained offset is there
