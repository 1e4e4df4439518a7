"""The FLAME head model (FLAME 2020 ``generic_model.pkl``) as a batched PyTorch layer.

The official pickle was written by Python 2 with chumpy objects inside (``shapedirs``); we read it without
chumpy through a restricted unpickler that turns chumpy objects into NumPy arrays and refuses any class
that is not NumPy, SciPy-sparse or chumpy, so loading a model file cannot run arbitrary code.

Joints: 0 global, 1 neck, 2 jaw, 3 and 4 eyes. The tracker has no global head pose (it moves the camera):
global = neck = identity; ``eyes[:, :6]`` drives joint 3 and ``eyes[:, 6:]`` joint 4 (right, then left).
Eyelid blendshapes are added after skinning (metrical-tracker convention: ``eyelids[:, 0]`` left, ``[:, 1]``
right). Units: metres.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .camera import identity_rot6d, rot6d_to_matrix

log = logging.getLogger(__name__)

__all__ = ["FLAME", "FlameCodes", "load_flame_pickle", "read_obj", "ObjMesh", "boundary_loops",
           "mouth_faces_from_loop", "FLAME_DOWNLOAD_HINT"]

FLAME_DOWNLOAD_HINT = (
    "FLAME is licensed and cannot be shipped: register at https://flame.is.tue.mpg.de, download "
    "'FLAME 2020' and point model_path at its generic_model.pkl (the matching template OBJ with UVs is in "
    "'FLAME texture space'). For a licence-free procedural head in the same format run `flashavatar synth`."
)


# ------------------------------------------------------------------------------------------ pickle loading
class _ChumpyStandIn:
    """Receives the state of a pickled chumpy object; only its ``x`` (the value array) is kept."""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def to_array(self, key: str) -> np.ndarray:
        state = self.state
        if isinstance(state, tuple):  # (dict, slots) form
            state = next((s for s in state if isinstance(s, dict) and "x" in s), {})
        state = state if isinstance(state, dict) else {}
        if "x" not in state:
            raise ValueError(f"chumpy object for '{key}' has no value array 'x' (state keys: {sorted(state)})")
        return np.asarray(state["x"])


class _FlameUnpickler(pickle.Unpickler):
    """Allows NumPy arrays, SciPy sparse matrices and (stand-ins for) chumpy objects; nothing else."""

    _SAFE_BUILTINS = {"object", "dict", "list", "tuple", "set", "frozenset", "slice", "complex", "bytes",
                      "bytearray", "str", "int", "float", "bool"}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "chumpy":
            return _ChumpyStandIn
        if module in ("copyreg", "copy_reg") and name in ("_reconstructor", "__newobj__"):
            return getattr(importlib.import_module("copyreg"), name)
        if module == "_codecs" and name == "encode":  # bytes in protocol-2 pickles written by Python 3
            return getattr(importlib.import_module("_codecs"), name)
        if module in ("builtins", "__builtin__") and name in self._SAFE_BUILTINS:
            return getattr(importlib.import_module("builtins"), name)
        if module == "numpy" or module.startswith("numpy."):
            if module.startswith("numpy.core"):  # NumPy 2 renamed numpy.core -> numpy._core
                module = "numpy._core" + module[len("numpy.core"):]
            return getattr(importlib.import_module(module), name)
        if module.startswith("scipy.sparse"):
            import scipy.sparse as sp
            if hasattr(sp, name):  # old private module paths (scipy.sparse.csc) -> public names
                return getattr(sp, name)
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' from a FLAME model file")


def load_flame_pickle(path: str | Path) -> dict:
    """Read a FLAME ``generic_model.pkl`` into a dict of NumPy arrays (``J_regressor`` stays scipy-sparse
    if it was). Raises ``FileNotFoundError`` with the download hint, ``ValueError`` naming the file if it is
    not a FLAME pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME model not found: {path}. {FLAME_DOWNLOAD_HINT}")
    try:
        with open(path, "rb") as fh:
            raw = _FlameUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a readable FLAME model pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        if isinstance(value, _ChumpyStandIn):
            value = value.to_array(key)
        out[key] = value
    return out


def _check(cond: bool, path, msg: str):
    if not cond:
        raise ValueError(f"{path}: {msg}")


# -------------------------------------------------------------------------------------------- OBJ + topology
@dataclass
class ObjMesh:
    vertices: np.ndarray    # [V, 3] float64
    faces: np.ndarray       # [F, 3] int64 (0-based vertex indices)
    uvs: np.ndarray | None  # [T, 2] float64 texture coordinates
    face_uvs: np.ndarray | None  # [F, 3] int64 indices into ``uvs``


def read_obj(path: str | Path) -> ObjMesh:
    """Minimal OBJ reader: ``v``, ``vt`` and triangular/polygonal ``f`` (``v``, ``v/vt``, ``v/vt/vn``, ``v//vn``).
    Polygons are fan-triangulated. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"template mesh not found: {path}")
    verts, uvs, faces, fuvs = [], [], [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                if parts[0] == "v":
                    verts.append([float(x) for x in parts[1:4]])
                elif parts[0] == "vt":
                    uvs.append([float(x) for x in parts[1:3]])
                elif parts[0] == "f":
                    idx = [p.split("/") for p in parts[1:]]
                    vi = [int(p[0]) for p in idx]
                    ti = [int(p[1]) if len(p) > 1 and p[1] else 0 for p in idx]
                    for k in range(1, len(vi) - 1):
                        faces.append([vi[0], vi[k], vi[k + 1]])
                        fuvs.append([ti[0], ti[k], ti[k + 1]])
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{lineno}: cannot parse '{line.strip()}' ({exc})") from exc
    if not verts or not faces:
        raise ValueError(f"{path}: no vertices or faces")
    V = np.asarray(verts, dtype=np.float64)
    Fv = np.asarray(faces, dtype=np.int64)
    Fv = np.where(Fv < 0, Fv + len(V), Fv - 1)  # OBJ is 1-based; negatives count from the end
    if Fv.min() < 0 or Fv.max() >= len(V):
        raise ValueError(f"{path}: face vertex index out of range (V={len(V)})")
    UV = FT = None
    FTr = np.asarray(fuvs, dtype=np.int64)
    if uvs and (FTr != 0).all():
        UV = np.asarray(uvs, dtype=np.float64)
        FT = np.where(FTr < 0, FTr + len(UV), FTr - 1)
        if FT.min() < 0 or FT.max() >= len(UV):
            raise ValueError(f"{path}: face texture index out of range (vt count {len(UV)})")
    return ObjMesh(V, Fv, UV, FT)


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed loops of boundary edges (edges used by one face), each as ordered vertex indices following
    the faces' orientation. Sorted by length, longest first."""
    f = np.asarray(faces, dtype=np.int64)
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    key = np.sort(edges, axis=1)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    boundary = edges[counts[inv.ravel()] == 1]
    nxt = {int(a): int(b) for a, b in boundary}
    loops, seen = [], set()
    for start in nxt:
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen and v in nxt:
            seen.add(v)
            loop.append(v)
            v = nxt[v]
        if v == start and len(loop) >= 3:
            loops.append(np.asarray(loop, dtype=np.int64))
    return sorted(loops, key=len, reverse=True)


def mouth_faces_from_loop(loop: np.ndarray) -> np.ndarray:
    """Close a boundary loop with a zig-zag strip of ``len(loop) - 2`` triangles joining its two sides
    (upper and lower lip for the mouth ring), oriented like the surrounding surface."""
    loop = np.asarray(loop, dtype=np.int64)
    n = len(loop)
    # the boundary loop runs along the faces' edges (a->b inside a face), so the filling faces go b->a
    ring = loop[::-1]
    tris, i, j = [], 0, n - 1
    while j - i >= 2:
        tris.append([ring[i], ring[i + 1], ring[j]])
        i += 1
        if j - i >= 2:
            tris.append([ring[i], ring[j - 1], ring[j]])
            j -= 1
    return np.asarray(tris, dtype=np.int64)


def _find_mouth_loop(loops: list[np.ndarray], vertices: np.ndarray) -> np.ndarray | None:
    """The mouth ring among the boundary loops: not the longest (the neck), lowest (y up) of the rest."""
    if len(loops) < 2:
        return None
    rest = loops[1:]
    return min(rest, key=lambda lp: vertices[lp, 1].mean())


# ----------------------------------------------------------------------------------------------- codes
@dataclass
class FlameCodes:
    """Per-frame FLAME parameters (tracker convention). All ``[B, ...]``; ``shape`` may be ``[1, n_shape]``."""

    shape: torch.Tensor    # [B, n_shape]
    expr: torch.Tensor     # [B, n_expr]
    jaw: torch.Tensor      # [B, 6]
    eyes: torch.Tensor     # [B, 12] (right, then left)
    eyelids: torch.Tensor  # [B, 2] (left, right)

    @classmethod
    def from_any(cls, codes) -> "FlameCodes":
        if isinstance(codes, FlameCodes):
            return codes
        if isinstance(codes, dict):
            missing = [f.name for f in fields(cls) if f.name not in codes and f.name != "eyelids"]
            if missing:
                raise KeyError(f"FLAME codes: missing {missing} (have {sorted(codes)})")
            expr = codes["expr"]
            eyelids = codes.get("eyelids")
            if eyelids is None:
                eyelids = expr.new_zeros(expr.shape[0], 2)
            return cls(codes["shape"], expr, codes["jaw"], codes["eyes"], eyelids)
        raise TypeError(f"FLAME codes: expected FlameCodes or dict, got {type(codes).__name__}")

    @property
    def batch_size(self) -> int:
        return self.expr.shape[0]

    def to(self, *args, **kwargs) -> "FlameCodes":
        return FlameCodes(*(getattr(self, f.name).to(*args, **kwargs) for f in fields(self)))

    def __getitem__(self, idx) -> "FlameCodes":
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        shape = vals["shape"] if vals["shape"].shape[0] == 1 else vals["shape"][idx]
        out = {k: v[idx] for k, v in vals.items() if k != "shape"}
        if out["expr"].dim() == 1:  # integer index: keep the batch dimension
            out = {k: v[None] for k, v in out.items()}
            shape = shape if shape.shape[0] == 1 else shape[None]
        return FlameCodes(shape=shape, **out)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def condition(self) -> torch.Tensor:
        """The avatar MLP's condition ``[B, n_expr + 20]`` = [expr, jaw 6, eyes 12, eyelids 2]."""
        return torch.cat((self.expr, self.jaw, self.eyes, self.eyelids), dim=-1)

    @staticmethod
    def neutral(batch: int, n_shape: int = 300, n_expr: int = 100, dtype=torch.float32, device=None):
        z = lambda n: torch.zeros(batch, n, dtype=dtype, device=device)  # noqa: E731
        eyes = torch.cat((identity_rot6d(batch, dtype=dtype, device=device),
                          identity_rot6d(batch, dtype=dtype, device=device)), -1)
        return FlameCodes(z(n_shape), z(n_expr), identity_rot6d(batch, dtype=dtype, device=device), eyes, z(2))


# ----------------------------------------------------------------------------------------------- the layer
def _load_optional_array(path: Path, expected_shape, what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from exc
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise ValueError(f"{path}: {what} has shape {tuple(arr.shape)}, expected {tuple(expected_shape)}")
    return arr


def kinematic_chain(rots: torch.Tensor, J: torch.Tensor, parents, parent_index: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """World rotations ``[B, K, 3, 3]`` and world joint positions ``[B, K, 3]`` of a kinematic tree.

    ``rots [B, K, 3, 3]`` are the local joint rotations, ``J [B, K, 3]`` the rest-pose joints, ``parents`` the
    parent of each joint (joint 0 is the root, parents come before children) and ``parent_index`` the same
    parents of joints 1.. as a device tensor (indexing with it needs no host copy).
    """
    rel_J = torch.cat((J[:, :1], J[:, 1:] - J[:, parent_index]), dim=1)
    world_R, world_t = [rots[:, 0]], [rel_J[:, 0]]
    for j in range(1, rots.shape[1]):
        p = parents[j]
        world_R.append(world_R[p] @ rots[:, j])
        world_t.append((world_R[p] @ rel_J[:, j, :, None])[..., 0] + world_t[p])
    return torch.stack(world_R, 1), torch.stack(world_t, 1)


class FLAME(nn.Module):
    """FLAME 2020 with the metrical-tracker parameterisation.

    Args:
        model_path: ``generic_model.pkl`` (FLAME 2020 or the procedural head of :mod:`.synthetic`).
        n_shape, n_expr: how many shape / expression components to use (≤ 300 / ≤ 100).
        eyelids_path: eyelid blendshapes: a folder with ``l_eyelid.npy`` and ``r_eyelid.npy`` (``[V, 3]``
            each), or an ``.npy`` of ``[2, V, 3]`` (left, right). Default: those files next to ``model_path``
            if present, else eyelids are ignored (with a warning when nonzero eyelids are passed).
        mouth_faces_path: ``[M, 3]`` int ``.npy`` of faces closing the mouth. Default: ``mouth_faces.npy``
            next to the model if present, else the mouth ring found among the mesh's boundary loops is
            closed with ``len(ring) - 2`` triangles (30 for FLAME's 32-vertex lip ring).
        neck_boundary_path: ``.npy`` of vertex indices on the neck boundary. Default ``neck_boundary.npy``
            next to the model, else the longest boundary loop.

    Attributes: ``faces [F + M, 3]`` long (mesh faces followed by the mouth faces), ``n_mesh_faces`` (F),
    ``mouth_faces [M, 3]``, ``neck_boundary [K]`` (buffers), ``v_template [V, 3]``.
    """

    def __init__(self, model_path, *, n_shape: int = 300, n_expr: int = 100, eyelids_path=None,
                 mouth_faces_path=None, neck_boundary_path=None):
        super().__init__()
        model_path = Path(model_path)
        data = load_flame_pickle(model_path)
        self.model_path = model_path
        need = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
        missing = [k for k in need if k not in data]
        _check(not missing, model_path, f"missing keys {missing} (have {sorted(data)})")

        v_template = np.asarray(data["v_template"], dtype=np.float64)
        _check(v_template.ndim == 2 and v_template.shape[1] == 3, model_path,
               f"v_template has shape {v_template.shape}, expected [V, 3]")
        V = v_template.shape[0]
        faces = np.asarray(data["f"]).astype(np.int64)
        _check(faces.ndim == 2 and faces.shape[1] == 3 and faces.min() >= 0 and faces.max() < V, model_path,
               f"f has shape {faces.shape} / indices outside [0, {V})")
        shapedirs = np.asarray(data["shapedirs"], dtype=np.float64)
        _check(shapedirs.ndim == 3 and shapedirs.shape[:2] == (V, 3) and shapedirs.shape[2] >= 300 + n_expr,
               model_path, f"shapedirs has shape {shapedirs.shape}, expected [{V}, 3, >= {300 + n_expr}]")
        _check(0 < n_shape <= 300 and 0 < n_expr <= shapedirs.shape[2] - 300, model_path,
               f"n_shape={n_shape} / n_expr={n_expr} outside the model's 300 / {shapedirs.shape[2] - 300}")
        posedirs = np.asarray(data["posedirs"], dtype=np.float64)
        kintree = np.asarray(data["kintree_table"]).astype(np.int64)
        _check(kintree.shape == (2, 5), model_path, f"kintree_table has shape {kintree.shape}, expected [2, 5]")
        J_reg = data["J_regressor"]
        J_reg = np.asarray(J_reg.toarray() if hasattr(J_reg, "toarray") else J_reg, dtype=np.float64)
        _check(J_reg.shape == (5, V), model_path, f"J_regressor has shape {J_reg.shape}, expected [5, {V}]")
        weights = np.asarray(data["weights"], dtype=np.float64)
        _check(weights.shape == (V, 5), model_path, f"weights has shape {weights.shape}, expected [{V}, 5]")
        _check(posedirs.shape == (V, 3, 36), model_path, f"posedirs has shape {posedirs.shape}, expected [{V}, 3, 36]")

        parents = kintree[0].copy()
        parents[0] = -1  # stored as 2**32 - 1
        _check(all(0 <= parents[j] < j for j in range(1, 5)), model_path,
               f"kintree_table parents {parents} not a chain")
        self.parents = [int(p) for p in parents]
        # parents of joints 1..4 as a device index (indexing with a list copies it from the host on every call)
        self.register_buffer("parent_index", torch.as_tensor(parents[1:], dtype=torch.long), persistent=False)
        self.n_shape, self.n_expr, self.n_vertices = n_shape, n_expr, V

        # model arrays: float32 buffers for float32 inputs and float64 twins (``*_f64``) for exact float64 results;
        # none is saved in state_dict (they come from the model file)
        def buf(name, arr):
            arr = np.ascontiguousarray(arr)
            self.register_buffer(name, torch.as_tensor(arr, dtype=torch.float32), persistent=False)
            self.register_buffer(name + "_f64", torch.as_tensor(arr, dtype=torch.float64), persistent=False)

        buf("v_template", v_template)  # [V, 3]
        dirs = np.concatenate((shapedirs[..., :n_shape], shapedirs[..., 300:300 + n_expr]), axis=-1)
        buf("shapedirs", dirs.reshape(V * 3, -1).T)  # [n_shape + n_expr, V*3]
        buf("posedirs", posedirs.reshape(V * 3, 36).T)  # [36, V*3]
        buf("J_regressor", J_reg)  # [5, V]
        buf("lbs_weights", weights)  # [V, 5]

        # eyelids (after LBS)
        eyelids = None
        if eyelids_path is None:
            if (model_path.parent / "l_eyelid.npy").is_file() and (model_path.parent / "r_eyelid.npy").is_file():
                eyelids_path = model_path.parent
        if eyelids_path is not None:
            eyelids_path = Path(eyelids_path)
            if eyelids_path.is_dir():
                eyelids = np.stack([_load_optional_array(eyelids_path / f"{s}_eyelid.npy", (V, 3), "eyelid blendshape")
                                    for s in ("l", "r")])
            elif eyelids_path.is_file():
                eyelids = _load_optional_array(eyelids_path, (2, V, 3), "eyelid blendshapes")
            else:
                raise FileNotFoundError(f"eyelid blendshapes not found: {eyelids_path}")
        self.has_eyelids = eyelids is not None
        lid_dirs = eyelids if eyelids is not None else np.zeros((2, V, 3))
        buf("eyelid_dirs", lid_dirs)  # [2 (left, right), V, 3]
        self._warned_eyelids = False
        self._eyelid_checks_left = 10  # GPU calls whose eyelid values are checked (see forward)

        # mouth-closing faces
        if mouth_faces_path is None and (model_path.parent / "mouth_faces.npy").is_file():
            mouth_faces_path = model_path.parent / "mouth_faces.npy"
        loops = None
        if mouth_faces_path is not None:
            mouth = _load_optional_array(Path(mouth_faces_path), None, "mouth faces").astype(np.int64)
            _check(mouth.ndim == 2 and mouth.shape[1] == 3 and mouth.min() >= 0 and mouth.max() < V,
                   mouth_faces_path, f"mouth faces: shape {mouth.shape} / indices outside [0, {V})")
        else:
            loops = boundary_loops(faces)
            ring = _find_mouth_loop(loops, v_template)
            mouth = mouth_faces_from_loop(ring) if ring is not None else np.zeros((0, 3), np.int64)
            if ring is None:
                log.warning("%s: no mouth ring among the mesh boundary loops; no mouth faces", model_path)
        self.n_mesh_faces = len(faces)
        self.register_buffer("mouth_faces", torch.as_tensor(mouth, dtype=torch.long), persistent=False)
        all_faces = torch.as_tensor(np.concatenate((faces, mouth)), dtype=torch.long)
        self.register_buffer("faces", all_faces, persistent=False)  # [F + M, 3]

        # neck boundary
        if neck_boundary_path is None and (model_path.parent / "neck_boundary.npy").is_file():
            neck_boundary_path = model_path.parent / "neck_boundary.npy"
        if neck_boundary_path is not None:
            neck = _load_optional_array(Path(neck_boundary_path), None, "neck boundary").astype(np.int64).ravel()
            _check(neck.size == 0 or (neck.min() >= 0 and neck.max() < V), neck_boundary_path,
                   f"neck boundary indices outside [0, {V})")
        else:
            loops = boundary_loops(faces) if loops is None else loops
            neck = loops[0] if loops else np.zeros(0, np.int64)
        self.register_buffer("neck_boundary", torch.as_tensor(neck, dtype=torch.long), persistent=False)

    def _model_array(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = getattr(self, name if dtype == torch.float32 else name + "_f64")
        return t if t.dtype == dtype else t.to(dtype)  # only after a .double() / .half() of the module

    # ------------------------------------------------------------------------------------------ forward
    def _check_input(self, name, x, width, B):
        if not torch.is_tensor(x):
            raise TypeError(f"FLAME.forward: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != width or (B is not None and x.shape[0] not in (B, 1)):
            want = f"[{B if B is not None else 'B'}, {width}]"
            raise ValueError(f"FLAME.forward: {name} has shape {tuple(x.shape)}, expected {want}")

    def forward(self, shape: torch.Tensor, expr: torch.Tensor, jaw: torch.Tensor, eyes: torch.Tensor,
                eyelids: torch.Tensor | None = None) -> torch.Tensor:
        """``shape [B|1, n_shape]``, ``expr [B, n_expr]``, ``jaw [B, 6]``, ``eyes [B, 12]``,
        ``eyelids [B, 2]`` -> ``vertices [B, V, 3]`` (float64 when the inputs are float64)."""
        if shape.dim() == 1:
            shape = shape[None]
        self._check_input("expr", expr, self.n_expr, None)
        B = expr.shape[0]
        self._check_input("shape", shape, self.n_shape, B)
        self._check_input("jaw", jaw, 6, B)
        self._check_input("eyes", eyes, 12, B)
        if eyelids is not None:
            self._check_input("eyelids", eyelids, 2, B)
        dtype = torch.float64 if expr.dtype == torch.float64 else torch.float32
        cast = lambda t: t if t.dtype == dtype else t.to(dtype)  # noqa: E731
        M = lambda name: self._model_array(name, dtype)  # noqa: E731
        shape, expr, jaw, eyes = (cast(t) for t in (shape, expr, jaw, eyes))
        V = self.n_vertices

        betas = torch.cat((shape.expand(B, -1), expr), dim=1)  # [B, n_shape + n_expr]
        v_shaped = M("v_template") + (betas @ M("shapedirs")).view(B, V, 3)
        J = torch.einsum("jv,bvc->bjc", M("J_regressor"), v_shaped)  # [B, 5, 3]

        eye3 = torch.eye(3, dtype=dtype, device=expr.device).expand(B, 2, 3, 3)
        posed = rot6d_to_matrix(torch.cat((jaw, eyes), dim=1).view(B, 3, 6))  # jaw, eye (joint 3), eye (joint 4)
        rots = torch.cat((eye3, posed), dim=1)  # [B, 5, 3, 3]
        pose_feature = (rots[:, 1:] - torch.eye(3, dtype=dtype, device=expr.device)).reshape(B, 36)
        v_posed = v_shaped + (pose_feature @ M("posedirs")).view(B, V, 3)

        # rigid chain: world transform of each joint, then remove the rest-pose joint location
        A_R, world_t = kinematic_chain(rots, J, self.parents, self.parent_index)
        A_t = world_t - (A_R @ J[..., None])[..., 0]  # [B, 5, 3]

        w = M("lbs_weights")
        T_R = torch.einsum("vj,bjmn->bvmn", w, A_R)  # [B, V, 3, 3]
        T_t = torch.einsum("vj,bjm->bvm", w, A_t)  # [B, V, 3]
        verts = (T_R @ v_posed[..., None])[..., 0] + T_t

        if eyelids is not None:
            if self.has_eyelids:
                lids = cast(eyelids)
                verts = verts + torch.einsum("bk,kvc->bvc", lids, M("eyelid_dirs"))
            elif not self._warned_eyelids and self._eyelid_checks_left > 0 and not torch.compiler.is_compiling() \
                    and not (eyelids.is_cuda and torch.cuda.is_current_stream_capturing()):
                # reading the values is a host sync on a GPU: only the first calls there are checked
                if eyelids.is_cuda:
                    self._eyelid_checks_left -= 1
                if bool((eyelids != 0).any()):
                    log.warning("FLAME: eyelid parameters given but no eyelid blendshapes loaded (%s); ignored",
                                self.model_path.parent)
                    self._warned_eyelids = True
        return verts

    def forward_codes(self, codes) -> torch.Tensor:
        """Same as :meth:`forward` for a :class:`FlameCodes` or dict."""
        c = FlameCodes.from_any(codes)
        return self(c.shape, c.expr, c.jaw, c.eyes, c.eyelids)

    def shaped_template(self, shape: torch.Tensor) -> torch.Tensor:
        """Neutral vertices ``[B, V, 3]`` for shape codes ``[B, n_shape]`` (zero expression, identity pose)."""
        if shape.dim() == 1:
            shape = shape[None]
        B = shape.shape[0]
        c = FlameCodes.neutral(B, self.n_shape, self.n_expr, dtype=shape.dtype, device=shape.device)
        return self(shape, c.expr, c.jaw, c.eyes, c.eyelids)
