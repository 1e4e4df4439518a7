"""metrical-tracker checkpoint files (``<tracker_root>/<id>/checkpoint/NNNNN.frame``).

A ``.frame`` file is a torch-pickled dict (numpy float32, batch 1): ``flame.{exp, shape, jaw, eyes, eyelids,
tex, sh}``, ``opencv.{R, t, K}`` (world→camera, OpenCV), ``camera.{R, t, fl, pp}`` (PyTorch3D NDC camera),
``img_size`` = [h, w], ``frame_id``, ``global_step``. Keys may be nested dicts (as the tracker writes them)
or flat dotted keys.

**Security:** these files are Python pickles and are read with ``torch.load(weights_only=False)``, which can
run code stored in the file. Only read tracker folders you produced or trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.camera import opencv_from_pytorch3d

__all__ = ["TrackerFrame", "load_tracker_frame", "list_tracker_frames", "FLAME_KEYS"]

# code name -> (tracker key, width)
FLAME_KEYS = {"shape": ("flame.shape", 300), "expr": ("flame.exp", 100), "jaw": ("flame.jaw", 6),
              "eyes": ("flame.eyes", 12), "eyelids": ("flame.eyelids", 2)}


@dataclass
class TrackerFrame:
    path: Path
    frame_index: int          # k of NNNNN.frame
    shape: np.ndarray         # [300]
    expr: np.ndarray          # [100]
    jaw: np.ndarray           # [6]
    eyes: np.ndarray          # [12]
    eyelids: np.ndarray       # [2]
    R: np.ndarray             # [3, 3] world→camera (OpenCV)
    t: np.ndarray             # [3]
    K: np.ndarray             # [3, 3]
    height: int
    width: int

    @property
    def viewmat(self) -> np.ndarray:
        V = np.eye(4)
        V[:3, :3], V[:3, 3] = self.R, self.t
        return V


def _get(d: dict, dotted: str):
    if dotted in d:
        return d[dotted]
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _array(d, key, path, width=None, shape=None):
    try:
        raw = _get(d, key)
    except KeyError:
        raise ValueError(f"{path}: missing key '{key}'") from None
    a = np.asarray(raw.detach().cpu().numpy() if torch.is_tensor(raw) else raw, dtype=np.float64)
    if width is not None:  # codes: (1, >= width) or (>= width,); extra components are dropped
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 1 or a.shape[0] < width:
            raise ValueError(f"{path}: '{key}' has shape {np.shape(raw)}, expected (1, {width})")
        return a[:width]
    if a.size != int(np.prod(shape)):
        raise ValueError(f"{path}: '{key}' has shape {a.shape}, expected (1, {', '.join(map(str, shape))})")
    a = a.reshape(shape)
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: '{key}' contains NaN or inf")
    return a


def load_tracker_frame(path, *, n_shape: int = 300, n_expr: int = 100) -> TrackerFrame:
    """Read and validate one ``.frame`` file (see the module docstring about trust). Errors name the file.
    The first ``n_shape`` / ``n_expr`` components are kept (files with fewer are an error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tracker frame not found: {path}")
    try:
        d = torch.load(path, map_location="cpu", weights_only=False)  # trusted input only (module docstring)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad file
        raise ValueError(f"{path}: cannot read tracker frame ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}")
    widths = {"shape": n_shape, "expr": n_expr, "jaw": 6, "eyes": 12, "eyelids": 2}
    codes = {}
    for name, (key, _) in FLAME_KEYS.items():
        if name == "eyelids":
            try:
                _get(d, key)
            except KeyError:
                codes[name] = np.zeros(2)
                continue
        codes[name] = _array(d, key, path, widths[name])
        if not np.isfinite(codes[name]).all():
            raise ValueError(f"{path}: '{key}' contains NaN or inf")
    try:
        hw = np.asarray(_get(d, "img_size")).reshape(-1)
    except KeyError:
        raise ValueError(f"{path}: missing key 'img_size'") from None
    if hw.size != 2 or (hw <= 0).any():
        raise ValueError(f"{path}: 'img_size' is {hw.tolist()}, expected [h, w]")
    height, width = int(hw[0]), int(hw[1])
    try:
        _get(d, "opencv.R")
        has_cv = True
    except KeyError:
        has_cv = False
    if has_cv:
        R = _array(d, "opencv.R", path, shape=(3, 3))
        t = _array(d, "opencv.t", path, shape=(3,))
        K = _array(d, "opencv.K", path, shape=(3, 3))
    else:  # PyTorch3D-style camera only
        try:
            Rp = np.asarray(_get(d, "camera.R"), dtype=np.float64)
            Tp = _array(d, "camera.t", path, shape=(3,))
            fl = np.asarray(_get(d, "camera.fl"), dtype=np.float64)
            pp = np.asarray(_get(d, "camera.pp"), dtype=np.float64)
        except KeyError as exc:
            raise ValueError(f"{path}: no 'opencv.*' camera and no complete 'camera.*' camera ({exc})") from None
        if Rp.size not in (6, 9) or fl.size not in (1, 2) or pp.size != 2:
            raise ValueError(f"{path}: PyTorch3D camera has shapes R {Rp.shape}, fl {fl.shape}, pp {pp.shape}")
        R, t, K = (x[0].numpy() for x in opencv_from_pytorch3d(Rp.reshape(1, -1), Tp[None], fl.reshape(1, -1),
                                                                 pp.reshape(1, 2), [[height, width]]))
    if abs(np.linalg.det(R) - 1) > 1e-3:
        raise ValueError(f"{path}: camera rotation has determinant {np.linalg.det(R):.4f}, expected 1")
    try:
        k = int(path.stem)
    except ValueError:
        k = -1
    return TrackerFrame(path, k, codes["shape"], codes["expr"], codes["jaw"], codes["eyes"], codes["eyelids"],
                        R, t, K, height, width)


def list_tracker_frames(checkpoint_dir) -> list[tuple[int, Path]]:
    """``(k, path)`` of every ``NNNNN.frame`` in a checkpoint folder, sorted by k."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"tracker checkpoint folder not found: {d}")
    out = []
    for p in d.glob("*.frame"):
        try:
            out.append((int(p.stem), p))
        except ValueError:
            raise ValueError(f"{p}: tracker frame names must be zero-padded integers (00000.frame)") from None
    if not out:
        raise FileNotFoundError(f"no .frame files in {d}")
    return sorted(out)
