"""The procedural head (FLAME file format) and the synthetic subject generator."""

import json
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from flashavatar.cli import main as cli_main
from flashavatar.model import FLAME, FlameCodes, boundary_loops
from flashavatar.model.flame import load_flame_pickle
from flashavatar.model.synthetic import (build_head, make_subject, rasterize_triangles, subject_codes,
                                         write_head_model)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_head_model(tmp_path_factory.mktemp("head"))


def test_pickle_has_the_flame_2020_structure(model_path):
    with pytest.raises(ModuleNotFoundError, match="chumpy"):  # shapedirs is a chumpy-typed object
        pickle.loads(model_path.read_bytes(), encoding="latin1")
    d = load_flame_pickle(model_path)
    V = d["v_template"].shape[0]
    assert 2000 < V < 6000
    assert d["f"].dtype == np.uint32 and d["f"].shape[1] == 3
    assert d["shapedirs"].shape == (V, 3, 400) and d["posedirs"].shape == (V, 3, 36)
    assert sp.issparse(d["J_regressor"]) and d["J_regressor"].shape == (5, V)
    assert d["weights"].shape == (V, 5)
    np.testing.assert_allclose(d["weights"].sum(1), 1.0)
    assert d["kintree_table"].tolist() == [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]
    for name in ("l_eyelid.npy", "r_eyelid.npy", "head_template.obj", "texture.png"):
        assert (model_path.parent / name).is_file()


def test_head_topology():
    head = build_head()
    loops = boundary_loops(head.faces)
    assert [len(lp) for lp in loops] == [64, 32]  # neck opening, lip ring; everything else closed
    assert set(loops[1]) == set(head.lip_ring.tolist())


def test_blendshapes_do_what_they_say(model_path):
    flame = FLAME(model_path).double()
    head = build_head()
    assert flame.mouth_faces.shape == (30, 3)  # the lip ring closed like FLAME's 32-vertex ring
    f = flame.faces.numpy()
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    assert len({tuple(e) for e in edges}) == len(edges)  # mouth faces oriented like the surface around them
    assert len(boundary_loops(f)) == 1  # only the neck stays open

    def pose(**kw):
        c = FlameCodes.neutral(1, dtype=torch.float64)
        for k, v in kw.items():
            getattr(c, k)[0, : len(v)] = torch.as_tensor(v, dtype=torch.float64)
        return flame.forward_codes(c)[0]

    rest = pose()
    upper, lower = head.lip_ring[1:16], head.lip_ring[17:][::-1].copy()  # inner lip vertices, matched columns
    gap_rest = (rest[upper, 1] - rest[lower, 1]).max()
    a = 0.3
    opened = pose(jaw=[1, 0, 0, 0, np.cos(a), -np.sin(a)])
    assert (opened[upper, 1] - opened[lower, 1]).max() > gap_rest + 0.015  # jaw opens the mouth
    smile = pose(expr=[2.0])
    corners = head.lip_ring[[0, 16]]
    assert (smile[corners, 1] - rest[corners, 1]).min() > 0.005  # corners go up
    brow = pose(expr=[0, 1.5])
    assert (brow - rest)[:, 1].max() > 0.005
    # a full blink puts skin in front of the pupil of that eye only
    c = FlameCodes.neutral(1, dtype=torch.float64)
    c.eyelids[0] = torch.tensor([0.0, 1.0])  # right eye (eyelids = [left, right])
    blink = flame.forward_codes(c)[0]
    right_pupil = blink[head.eye_vertices[0][0]]
    lid_moved = (blink - rest).norm(dim=-1) > 1e-3
    assert lid_moved.any() and (blink[lid_moved, 2].max() > right_pupil[2])
    assert (blink[lid_moved, 0] < 0).all()  # right eye is at -x
    # gaze turns the eyeball about its centre
    look = pose(eyes=[np.cos(0.3), 0, np.sin(0.3), 0, 1, 0] * 2)
    eye = torch.as_tensor(head.eye_vertices[0])
    centre = rest[eye].mean(0)
    torch.testing.assert_close((look[eye] - centre).norm(dim=-1), (rest[eye] - centre).norm(dim=-1))
    assert (look[eye[0]] - rest[eye[0]]).norm() > 0.002


def test_rasterizer_depth_order_and_coverage():
    # two overlapping squares at different depths: the nearer one wins; coverage matches the area
    sq = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.1
    near = np.concatenate((sq, np.full((4, 1), 1.0)), 1)
    far = np.concatenate((sq * 3, np.full((4, 1), 2.0)), 1)  # 1.5x larger on screen
    verts = np.concatenate((near, far))
    faces = np.array([[0, 2, 1], [0, 3, 2], [4, 6, 5], [4, 7, 6]])
    K = np.array([[100.0, 0, 32], [0, 100, 32], [0, 0, 1]])
    fid, bary, depth = rasterize_triangles(verts, faces, K, 64, 64)
    assert ((fid == 0) | (fid == 1)).sum() == 20 * 20  # the near square spans 20x20 pixels
    assert (fid >= 2).sum() == 30 * 30 - 20 * 20  # the far square shows only around the near one
    np.testing.assert_allclose(depth[(fid == 0) | (fid == 1)], 1.0, rtol=1e-6)
    np.testing.assert_allclose(depth[fid >= 2], 2.0, rtol=1e-6)
    np.testing.assert_allclose(bary[fid >= 0].sum(-1), 1.0, rtol=1e-6)


def test_subject_files_and_cli(tmp_path):
    s = make_subject(tmp_path / "a", "s1", n_frames=4, size=(40, 56), supersample=1)
    subj = tmp_path / "a" / "s1"
    for k in range(1, 5):
        for rel in (f"imgs/{k:05d}.jpg", f"alpha/{k:05d}.jpg", f"parsing/{k:05d}_neckhead.png",
                    f"parsing/{k:05d}_mouth.png"):
            assert (subj / rel).is_file(), rel
    meta = json.loads((subj / "subject.json").read_text())
    assert meta["n_frames"] == 4 and (meta["height"], meta["width"]) == (40, 56)
    frame = torch.load(s.tracker_root / "s1" / "checkpoint" / "00003.frame", weights_only=False)
    assert frame["flame"]["exp"].shape == (1, 100) and frame["flame"]["exp"].dtype == np.float32
    assert frame["flame"]["eyes"].shape == (1, 12) and frame["opencv"]["K"].shape == (1, 3, 3)
    assert frame["img_size"].tolist() == [40, 56] and frame["camera"]["R"].shape == (1, 6)
    assert cli_main(["synth", str(tmp_path / "b"), "--frames", "2", "--height", "24", "--width", "32",
                     "--supersample", "1"]) == 0
    assert (tmp_path / "b" / "tracker" / "synthetic" / "checkpoint" / "00001.frame").is_file()


def test_performance_covers_expressions():
    c = subject_codes(240)
    jaw_angle = np.arcsin(-c["jaw"][:, 5])
    assert jaw_angle.max() > 0.25 and jaw_angle.min() >= 0
    test = slice(200, 240)  # a tail split sees opening, smiling and blinking too
    assert jaw_angle[test].max() > 0.15 and c["expr"][test, 0].max() > 0.5 and c["eyelids"][test].max() == 1.0
