"""Dataset reader on a synthetic subject: pairing, split, cameras, masks, composition, bad files."""

import shutil

import numpy as np
import pytest
import torch

from flashavatar.data import (AdjacentPairs, FlashAvatarDataset, collate_frames, collate_pairs, compose_gt,
                              load_tracker_frame, read_image)
from flashavatar.model import FLAME, FlameCodes
from flashavatar.model.camera import opencv_from_pytorch3d, project_points, pytorch3d_from_opencv
from flashavatar.model.synthetic import build_head, make_subject

H, W, T = 48, 64, 12  # non-square on purpose


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return make_subject(tmp_path_factory.mktemp("subj"), "subj", n_frames=T, size=(H, W), supersample=1)


@pytest.fixture
def subject_copy(subject, tmp_path):
    shutil.copytree(subject.data_root, tmp_path / "root")
    root = tmp_path / "root"
    return root, root / "tracker"


def _ds(root, tracker, split="train", **kw):
    kw.setdefault("n_test", 4)
    return FlashAvatarDataset(root, tracker, "subj", split, **kw)


def test_split_pairing_and_items(subject):
    train = _ds(subject.data_root, subject.tracker_root)
    test = _ds(subject.data_root, subject.tracker_root, "test")
    assert train.frame_indices == list(range(8)) and test.frame_indices == list(range(8, 12))
    assert len(_ds(subject.data_root, subject.tracker_root, max_train=5)) == 5
    item = test[1]
    assert item["frame_index"] == 9 and item["image_index"] == 10
    ref = read_image(subject.data_root / "subj" / "imgs" / "00010.jpg", "rgb")
    assert torch.equal(item["image"], torch.from_numpy(ref))
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (H, W, 3)
    assert item["alpha"].shape == (H, W) and item["head_mask"].dtype == torch.bool
    assert (item["width"], item["height"]) == (W, H)
    assert item["expr"].shape == (100,) and item["eyes"].shape == (12,) and item["eyelids"].shape == (2,)
    short = _ds(subject.data_root, subject.tracker_root, n_shape=100, n_expr=50)  # fewer components: truncated
    assert short[0]["shape"].shape == (100,) and short[0]["expr"].shape == (50,)
    torch.testing.assert_close(short[0]["expr"], train[0]["expr"][:50])
    with pytest.raises(ValueError, match="n_test=12 leaves no training frames"):
        _ds(subject.data_root, subject.tracker_root, n_test=12)


def test_cameras_project_known_points(subject):
    ds = _ds(subject.data_root, subject.tracker_root, "all")
    flame = FLAME(subject.model_path)
    head = build_head()
    verts = flame.forward_codes(ds.codes).detach()  # [T, V, 3]
    for i in range(len(ds)):
        item = ds[i]
        # the cameras look at (0, -0.035, 0): it lands on the principal point (full K, not the image centre)
        px, depth = project_points(torch.tensor([[0.0, -0.035, 0.0]]), item["viewmat"], item["K"])
        torch.testing.assert_close(px[0], item["K"][:2, 2], atol=1e-3, rtol=0)
        assert item["K"][0, 2] != W / 2 and depth[0] > 0.5
        # the nose tip and the pupils project inside the head mask, the nose outside the mouth
        nose = verts[i, torch.argmax(verts[i, : head.n_head_vertices, 2])]
        pupils = verts[i, [ids[0] for ids in head.eye_vertices]]  # front poles of the eyeballs
        for p in torch.cat((nose[None], pupils)):
            uv, _ = project_points(p[None], item["viewmat"], item["K"])
            x, y = int(uv[0, 0]), int(uv[0, 1])  # pixel (i, j) covers [i, i+1) x [j, j+1)
            assert 0 <= x < W and 0 <= y < H
            assert item["head_mask"][y, x] and item["alpha"][y, x] > 200
    # the mouth centre is in the mouth mask on the frame with the widest-open jaw
    jaw_open = torch.stack([ds.codes.jaw[i, 5].abs() for i in range(len(ds))])  # sin(angle) entry
    i = int(jaw_open.argmax())
    item = ds[i]
    mouth = verts[i, head.lip_ring].mean(0)
    uv, _ = project_points(mouth[None], item["viewmat"], item["K"])
    x, y = int(uv[0, 0]), int(uv[0, 1])
    assert item["mouth_mask"][y - 1:y + 2, x - 1:x + 2].any()


def test_pytorch3d_camera_conversion(subject, tmp_path):
    fr = load_tracker_frame(subject.tracker_root / "subj" / "checkpoint" / "00003.frame")
    Rp, Tp, fl, pp = pytorch3d_from_opencv(fr.R[None], fr.t[None], fr.K[None], [[H, W]])
    R, t, K = opencv_from_pytorch3d(Rp, Tp, fl, pp, [[H, W]])
    np.testing.assert_allclose(R[0].numpy(), fr.R, atol=1e-12)
    np.testing.assert_allclose(t[0].numpy(), fr.t, atol=1e-12)
    np.testing.assert_allclose(K[0].numpy(), fr.K, atol=1e-9)
    # independent check of the PyTorch3D convention: X_cam = X_world R + T (row vectors), NDC x left / y up,
    # the shorter image side spans [-1, 1]; pixel u = w/2 - s x_ndc, v = h/2 - s y_ndc with s = min(h, w)/2
    X = torch.tensor([[0.01, -0.03, 0.05], [-0.04, 0.02, 0.0]], dtype=torch.float64)
    cam = X @ Rp[0] + Tp[0]
    ndc = fl[0] * cam[:, :2] / cam[:, 2:] + pp[0]
    s = min(H, W) / 2
    pix_p3d = torch.stack((W / 2 - s * ndc[:, 0], H / 2 - s * ndc[:, 1]), -1)
    pix_cv, _ = project_points(X, torch.as_tensor(fr.viewmat), torch.as_tensor(fr.K))
    torch.testing.assert_close(pix_p3d, pix_cv)
    # a file with only the PyTorch3D camera (as some tracker versions write) gives the same OpenCV camera
    d = torch.load(fr.path, weights_only=False)
    del d["opencv"]
    p = tmp_path / "00003.frame"
    torch.save(d, p)
    fr2 = load_tracker_frame(p)
    np.testing.assert_allclose(fr2.R, fr.R, atol=1e-5)
    np.testing.assert_allclose(fr2.t, fr.t, atol=1e-5)
    np.testing.assert_allclose(fr2.K, fr.K, atol=1e-3)


@pytest.mark.parametrize("background", [(0.0, 1.0, 0.0), "white"])
def test_ground_truth_composition(subject, background):
    ds = _ds(subject.data_root, subject.tracker_root, return_gt=True, background=background)
    bg = torch.tensor((0.0, 1.0, 0.0) if background != "white" else (1.0, 1.0, 1.0))
    item = ds[2]
    gt, img, a, m = item["gt"], item["image"].float() / 255, item["alpha"].float() / 255, item["head_mask"]
    assert gt.dtype == torch.float32 and gt.shape == (H, W, 3)
    assert torch.equal(gt[~m], bg.expand(int((~m).sum()), 3))  # outside the head mask: background only
    inside = m & (item["alpha"] == 255)
    torch.testing.assert_close(gt[inside], img[inside])
    soft = m & (item["alpha"] > 0) & (item["alpha"] < 255)
    torch.testing.assert_close(gt[soft], img[soft] * a[soft, None] + bg * (1 - a[soft, None]))
    # the torso is in alpha but not in the head mask: it becomes background
    torso = (item["alpha"] > 250) & ~m
    assert torso.sum() > 20 and torch.equal(gt[torso], bg.expand(int(torso.sum()), 3))
    # mouth ⊂ head
    assert not (item["mouth_mask"] & ~m).any()
    # batched and on request
    b = collate_frames([ds[0], ds[1]])
    torch.testing.assert_close(ds.gt(b), torch.stack((ds[0]["gt"], ds[1]["gt"])))
    torch.testing.assert_close(compose_gt(b["image"], b["alpha"], b["head_mask"], bg), b["gt"])


def test_pairs_and_collate(subject):
    ds = _ds(subject.data_root, subject.tracker_root)
    pairs = AdjacentPairs(ds)
    assert len(pairs) == 7
    prev, cur = pairs[3]
    assert cur["frame_index"] == prev["frame_index"] + 1
    batch = collate_pairs([pairs[0], pairs[5]])
    assert batch["prev"]["image"].shape == (2, H, W, 3)
    assert batch["cur"]["frame_index"].tolist() == [1, 6]
    codes = FlameCodes.from_any(batch["cur"])
    assert codes.expr.shape == (2, 100) and codes.batch_size == 2


def test_missing_and_corrupt_files_are_named(subject_copy):
    root, tracker = subject_copy
    (root / "subj" / "imgs" / "00004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="imgs/00004.jpg"):
        _ds(root, tracker)
    ds = _ds(root, tracker, check_files=False)
    with pytest.raises(FileNotFoundError, match="imgs/00004.jpg"):
        ds[3]
    (root / "subj" / "alpha" / "00002.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="alpha/00002.jpg: cannot read image"):
        ds[1]
    problems = ds.check_all()
    assert len(problems) == 2 and any("00004.jpg" in p for p in problems)


def test_wrong_sizes_and_counts_are_named(subject_copy):
    import imageio.v3 as iio

    root, tracker = subject_copy
    ck = tracker / "subj" / "checkpoint"
    # a tracker frame without an image (counts do not match)
    shutil.copy(ck / "00011.frame", ck / "00012.frame")
    with pytest.raises(FileNotFoundError, match="imgs/00013.jpg"):
        _ds(root, tracker)
    (ck / "00012.frame").unlink()
    # an image of the wrong size
    iio.imwrite(root / "subj" / "parsing" / "00003_mouth.png", np.zeros((H, W + 2), np.uint8))
    ds = _ds(root, tracker)
    with pytest.raises(ValueError, match=r"00003_mouth.png: image is 48x66"):
        ds[2]
    # a tracker frame with wrong code shapes, a corrupt one
    d = torch.load(ck / "00005.frame", weights_only=False)
    d["flame"]["exp"] = np.zeros((1, 50), np.float32)
    torch.save(d, ck / "00005.frame")
    with pytest.raises(ValueError, match=r"00005.frame: 'flame.exp' has shape \(1, 50\)"):
        _ds(root, tracker)
    (ck / "00005.frame").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="00005.frame: cannot read tracker frame"):
        _ds(root, tracker)
    # wrong offset: the first image does not exist
    (ck / "00005.frame").unlink()
    with pytest.raises(FileNotFoundError, match="00000.jpg"):
        _ds(root, tracker, frame_offset=0)
