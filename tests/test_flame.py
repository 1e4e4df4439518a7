"""FLAME loader and LBS against a straightforward NumPy implementation."""

import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from flashavatar.model import FLAME, FlameCodes
from flashavatar.model.camera import (matrix_to_quat, matrix_to_rot6d, quat_multiply, quat_to_matrix,
                                      rot6d_to_matrix)
from flashavatar.model.flame import boundary_loops, load_flame_pickle, mouth_faces_from_loop

V_SMALL = 40


class _StandInCh:
    """Stand-in for chumpy.ch.Ch: pickled as a state dict holding the value in 'x' (like chumpy)."""

    def __init__(self, x):
        self.x = x
        self._dirty_vars = set()


def _write_flame_like(path, rng, chumpy=True, extra=None):
    V = V_SMALL
    weights = rng.uniform(0, 1, (V, 5))
    weights /= weights.sum(1, keepdims=True)
    J_reg = np.zeros((5, V))
    for j in range(5):
        idx = rng.choice(V, 6, replace=False)
        J_reg[j, idx] = rng.uniform(0.1, 1, 6)
        J_reg[j] /= J_reg[j].sum()
    data = {
        "v_template": rng.normal(size=(V, 3)) * 0.1,
        "f": rng.integers(0, V, (60, 3)).astype(np.uint32),
        "shapedirs": rng.normal(size=(V, 3, 400)) * 1e-3,
        "posedirs": rng.normal(size=(V, 3, 36)) * 1e-2,
        "J_regressor": sp.csc_matrix(J_reg),
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "J": J_reg @ rng.normal(size=(V, 3)),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    data.update(extra or {})
    plain = dict(data)
    if chumpy:
        pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
        _StandInCh.__module__, _StandInCh.__qualname__ = "chumpy.ch", "Ch"
        mod.Ch = _StandInCh
        sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, mod
        try:
            data["shapedirs"] = _StandInCh(data["shapedirs"])
            data["posedirs"] = _StandInCh(data["posedirs"])
            blob = pickle.dumps(data, protocol=2)
        finally:
            del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    else:
        blob = pickle.dumps(data, protocol=2)
    path.write_bytes(blob)
    return plain


def _np_rot6d(d):
    a1, a2 = d[:3], d[3:]
    b1 = a1 / np.linalg.norm(a1)
    b2 = a2 - b1 @ a2 * b1
    b2 /= np.linalg.norm(b2)
    return np.stack((b1, b2, np.cross(b1, b2)))


def _np_flame(m, shape, expr, jaw, eyes, eyelids=None, lids=None, n_shape=300, n_expr=100):
    """Per-vertex, per-joint LBS written the obvious way."""
    sd = m["shapedirs"]
    v_shaped = m["v_template"] + sd[..., :n_shape] @ shape + sd[..., 300:300 + n_expr] @ expr
    J = m["J_regressor"].toarray() @ v_shaped
    Rs = [np.eye(3), np.eye(3), _np_rot6d(jaw), _np_rot6d(eyes[:6]), _np_rot6d(eyes[6:])]
    feat = np.concatenate([(Rs[j] - np.eye(3)).ravel() for j in range(1, 5)])
    v_posed = v_shaped + m["posedirs"] @ feat
    parents = [-1, 0, 1, 1, 1]
    G = []
    for j in range(5):
        T = np.eye(4)
        T[:3, :3] = Rs[j]
        T[:3, 3] = J[j] - (J[parents[j]] if j else 0)
        G.append(T if j == 0 else G[parents[j]] @ T)
    A = []
    for j in range(5):
        Gj = G[j].copy()
        Gj[:3, 3] -= Gj[:3, :3] @ J[j]
        A.append(Gj)
    out = np.zeros_like(v_posed)
    for v in range(len(v_posed)):
        T = sum(m["weights"][v, j] * A[j] for j in range(5))
        out[v] = (T @ np.append(v_posed[v], 1.0))[:3]
    if eyelids is not None:
        out = out + eyelids[0] * lids[0] + eyelids[1] * lids[1]
    return out


@pytest.fixture
def flame_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "generic_model.pkl"
    model = _write_flame_like(path, rng)
    return path, model


def test_chumpy_pickle_needs_no_chumpy(flame_file):
    path, model = flame_file
    with pytest.raises(ModuleNotFoundError):  # the file really references chumpy
        pickle.loads(path.read_bytes())
    data = load_flame_pickle(path)
    np.testing.assert_array_equal(data["shapedirs"], model["shapedirs"])
    assert sp.issparse(data["J_regressor"])
    assert data["f"].dtype == np.uint32


@pytest.mark.parametrize("n_shape,n_expr", [(300, 100), (100, 50)])
def test_lbs_matches_numpy(flame_file, n_shape, n_expr):
    path, model = flame_file
    flame = FLAME(path, n_shape=n_shape, n_expr=n_expr).double()
    rng = np.random.default_rng(1)
    B = 3
    shape = rng.normal(size=(B, n_shape))
    expr = rng.normal(size=(B, n_expr))
    jaw = rng.normal(size=(B, 6))  # unnormalised 6D: Gram–Schmidt inside
    eyes = rng.normal(size=(B, 12))
    T = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    out = flame(T(shape), T(expr), T(jaw), T(eyes)).numpy()
    assert out.shape == (B, V_SMALL, 3)
    for b in range(B):
        ref = _np_flame(model, shape[b], expr[b], jaw[b], eyes[b], n_shape=n_shape, n_expr=n_expr)
        np.testing.assert_allclose(out[b], ref, rtol=0, atol=1e-12)


def test_zero_pose_is_shaped_template(flame_file):
    path, model = flame_file
    flame = FLAME(path).double()
    shape = torch.randn(2, 300, dtype=torch.float64)
    c = FlameCodes.neutral(2, dtype=torch.float64)
    v = flame(shape, c.expr, c.jaw, c.eyes, c.eyelids)
    ref = model["v_template"] + np.einsum("vcl,bl->bvc", model["shapedirs"][..., :300], shape.numpy())
    np.testing.assert_allclose(v.numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(flame.shaped_template(shape).numpy(), ref, atol=1e-12)


def test_dtypes_and_shape_broadcast(flame_file):
    path, _ = flame_file
    flame = FLAME(path)
    c = FlameCodes.neutral(4)
    v32 = flame(c.shape[:1], c.expr, c.jaw, c.eyes, c.eyelids)  # one shape row for all frames
    assert v32.dtype == torch.float32 and v32.shape == (4, V_SMALL, 3)
    c64 = FlameCodes.neutral(4, dtype=torch.float64)
    assert flame(c64.shape, c64.expr, c64.jaw, c64.eyes).dtype == torch.float64


def test_eyelids_after_lbs(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "generic_model.pkl"
    model = _write_flame_like(path, rng)
    lids = rng.normal(size=(2, V_SMALL, 3)) * 1e-3
    np.save(tmp_path / "l_eyelid.npy", lids[0])
    np.save(tmp_path / "r_eyelid.npy", lids[1])
    flame = FLAME(path).double()
    assert flame.has_eyelids
    shape, expr, jaw, eyes = (rng.normal(size=n) for n in (300, 100, 6, 12))
    eyelids = np.array([0.7, 0.2])
    T = lambda a: torch.as_tensor(a, dtype=torch.float64)[None]  # noqa: E731
    out = flame(T(shape), T(expr), T(jaw), T(eyes), T(eyelids))[0].numpy()
    ref = _np_flame(model, shape, expr, jaw, eyes, eyelids, lids)
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_bad_inputs_and_files(tmp_path, flame_file):
    path, _ = flame_file
    with pytest.raises(FileNotFoundError, match="flame.is.tue.mpg.de"):
        FLAME(tmp_path / "nope" / "generic_model.pkl")
    flame = FLAME(path)
    c = FlameCodes.neutral(2)
    with pytest.raises(ValueError, match=r"jaw has shape \(2, 3\)"):
        flame(c.shape, c.expr, c.jaw[:, :3], c.eyes)
    with pytest.raises(ValueError, match="expr"):
        flame(c.shape, c.expr[:, :10], c.jaw, c.eyes)
    # a pickle that tries to call something else is refused (names the file)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(ValueError, match="evil.pkl.*refusing"):
        FLAME(evil)
    # wrong array shape names the file and the key
    bad = tmp_path / "bad" / "generic_model.pkl"
    bad.parent.mkdir()
    _write_flame_like(bad, np.random.default_rng(3), extra={"weights": np.ones((V_SMALL, 4))})
    with pytest.raises(ValueError, match="bad/generic_model.pkl: weights has shape"):
        FLAME(bad)


def test_rotation_helpers():
    torch.manual_seed(0)
    d6 = torch.randn(50, 6, dtype=torch.float64)
    R = rot6d_to_matrix(d6)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand(50, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(50, dtype=torch.float64))
    # first row of R is the normalised first 3 numbers: the "rows" convention
    torch.testing.assert_close(R[:, 0], d6[:, :3] / d6[:, :3].norm(dim=-1, keepdim=True))
    torch.testing.assert_close(rot6d_to_matrix(matrix_to_rot6d(R)), R)
    q = matrix_to_quat(R)
    torch.testing.assert_close(quat_to_matrix(q), R)
    # Hamilton product composes rotations: R(q ⊗ p) = R(q) R(p), with broadcasting
    p = matrix_to_quat(rot6d_to_matrix(torch.randn(4, 50, 6, dtype=torch.float64)))
    torch.testing.assert_close(quat_to_matrix(quat_multiply(q, p)), R @ quat_to_matrix(p))
    # 180-degree rotations (trace = -1) convert accurately
    flips = torch.diag_embed(torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64))
    torch.testing.assert_close(quat_to_matrix(matrix_to_quat(flips)), flips)


def test_mouth_ring_closing_faces():
    # a cylinder-like strip with one hole: ring of 8 vertices -> 6 faces, consistently oriented
    n = 8
    ring = np.arange(n)
    outer = np.arange(n, 2 * n)
    faces = []
    for k in range(n):
        a, b = ring[k], ring[(k + 1) % n]
        c, d = outer[k], outer[(k + 1) % n]
        faces += [[a, c, d], [a, d, b]]
    faces = np.array(faces)
    loops = boundary_loops(faces)
    assert sorted(len(lp) for lp in loops) == [n, n]
    inner = [lp for lp in loops if set(lp) == set(ring)][0]
    fill = mouth_faces_from_loop(inner)
    assert len(fill) == n - 2
    all_faces = np.concatenate((faces, fill))
    edges = np.concatenate([all_faces[:, [0, 1]], all_faces[:, [1, 2]], all_faces[:, [2, 0]]])
    # every directed edge appears once: the filled surface is consistently oriented
    assert len({tuple(e) for e in edges}) == len(edges)
    assert len(boundary_loops(all_faces)) == 1  # only the outer ring remains open
