"""From a config to frames in memory and a built avatar (the glue between the data layout and training).

Reads the layout of SPEC 1 directly::

    <data_root>/<subject>/imgs/00001.jpg  alpha/00001.jpg  parsing/00001_neckhead.png  parsing/00001_mouth.png
    <tracker_root>/<subject>/checkpoint/00000.frame        (tracker file k pairs with image k + frame_offset)

Tracker files are torch pickles and are read with ``weights_only=False``: use only files you trust.
Every bad or missing file is reported by name. The default head model is ``<data_root>/flame/
generic_model.pkl`` with ``head_template.obj`` beside it (the layout `flashavatar synth` writes); the
default tracker root is ``<data_root>/tracker`` when it exists, else ``<data_root>``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, background_color
from .session import FrameSet

log = logging.getLogger("flashavatar.data")

TEMPLATE_NAMES = ("head_template.obj", "head_template_mesh.obj")


def tracker_root_of(cfg: Config) -> Path:
    if cfg.data.tracker_root:
        return Path(cfg.data.tracker_root)
    root = Path(cfg.data.data_root)
    return root / "tracker" if (root / "tracker" / cfg.data.subject).is_dir() else root


def head_model_of(cfg: Config) -> tuple[Path, Path]:
    """(generic_model.pkl, template OBJ with UVs)."""
    pkl = Path(cfg.model.head_model) if cfg.model.head_model else Path(cfg.data.data_root) / "flame" / "generic_model.pkl"
    if not pkl.is_file():
        from .model.flame import FLAME_DOWNLOAD_HINT

        raise FileNotFoundError(f"head model not found: {pkl} (set --head-model / model.head_model). "
                                f"{FLAME_DOWNLOAD_HINT}")
    if getattr(cfg.model, "template", None):
        obj = Path(cfg.model.template)
    else:
        obj = next((pkl.parent / n for n in TEMPLATE_NAMES if (pkl.parent / n).is_file()), pkl.parent / TEMPLATE_NAMES[0])
    if not obj.is_file():
        raise FileNotFoundError(f"template mesh with UVs not found: {obj} (put it beside {pkl.name} or set "
                                "model.template)")
    return pkl, obj


def _get(frame: dict, path: str, file: Path):
    """``frame['flame']['exp']`` or ``frame['flame.exp']``."""
    if path in frame:
        return frame[path]
    node: Any = frame
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{file}: tracker file has no '{path}'")
        node = node[part]
    return node


def _arr(x, shape_tail: tuple, name: str, file: Path) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    a = a.reshape(-1, *shape_tail) if a.size == int(np.prod(shape_tail)) else a
    if a.shape[1:] != shape_tail or a.shape[0] != 1:
        raise ValueError(f"{file}: '{name}' has shape {a.shape}, expected (1, {', '.join(map(str, shape_tail))})")
    return a[0]


@dataclass
class TrackerFrame:
    index: int
    shape: np.ndarray
    expr: np.ndarray
    jaw: np.ndarray
    eyes: np.ndarray
    eyelids: np.ndarray
    viewmat: np.ndarray  # [4, 4]
    K: np.ndarray  # [3, 3]
    img_hw: tuple[int, int]


def read_tracker_frame(file: Path) -> TrackerFrame:
    try:
        frame = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{file}: cannot read tracker file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(frame, dict):
        raise ValueError(f"{file}: tracker file must hold a dict, got {type(frame).__name__}")
    exp = np.asarray(_get(frame, "flame.exp", file), dtype=np.float32).reshape(1, -1)
    shape = np.asarray(_get(frame, "flame.shape", file), dtype=np.float32).reshape(1, -1)
    jaw = _arr(_get(frame, "flame.jaw", file), (6,), "flame.jaw", file)
    eyes = _arr(_get(frame, "flame.eyes", file), (12,), "flame.eyes", file)
    try:
        eyelids = _arr(_get(frame, "flame.eyelids", file), (2,), "flame.eyelids", file)
    except KeyError:
        eyelids = np.zeros(2, np.float32)
    R = _arr(_get(frame, "opencv.R", file), (3, 3), "opencv.R", file)
    t = _arr(_get(frame, "opencv.t", file), (3,), "opencv.t", file)
    K = _arr(_get(frame, "opencv.K", file), (3, 3), "opencv.K", file)
    hw = np.asarray(_get(frame, "img_size", file)).reshape(-1)
    if hw.size != 2:
        raise ValueError(f"{file}: 'img_size' must be [h, w], got {hw}")
    view = np.eye(4, dtype=np.float32)
    view[:3, :3], view[:3, 3] = R, t
    return TrackerFrame(int(file.stem), shape[0], exp[0], jaw, eyes, eyelids, view, K, (int(hw[0]), int(hw[1])))


def tracker_files(tracker_root: Path, subject: str) -> list[Path]:
    folder = Path(tracker_root) / subject / "checkpoint"
    if not folder.is_dir():
        raise FileNotFoundError(f"tracker folder not found: {folder} (expected <tracker_root>/<subject>/checkpoint/"
                                "*.frame)")
    files = sorted(folder.glob("*.frame"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
    bad = [p.name for p in files if not p.stem.isdigit()]
    if bad:
        raise ValueError(f"{folder}: tracker files must be named NNNNN.frame, found {bad[:3]}")
    if not files:
        raise FileNotFoundError(f"{folder}: no *.frame tracker files")
    return files


def _read_image(path: Path, grey: bool = False) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"missing image: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if grey else "RGB"))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _codes(frames: list[TrackerFrame]) -> dict[str, torch.Tensor]:
    def stack(name):
        return torch.from_numpy(np.stack([getattr(f, name) for f in frames]))

    out = {k: stack(k) for k in ("expr", "jaw", "eyes", "eyelids")}
    out["shape"] = stack("shape")[:1] if frames else torch.zeros(1, 300)  # one identity per subject
    return out


def _frameset(frames: list[TrackerFrame], cfg: Config, image_dir: Path, load_images: bool) -> FrameSet:
    n = len(frames)
    if n == 0:
        return FrameSet(torch.zeros(0, 1, 1, 3, dtype=torch.uint8), torch.zeros(0, 1, 1, dtype=torch.bool),
                        torch.zeros(0, 1, 1, dtype=torch.bool), torch.zeros(0, 4, 4), torch.zeros(0, 3, 3),
                        {k: torch.zeros(0 if k != "shape" else 1, d) for k, d in
                         (("shape", 300), ("expr", 100), ("jaw", 6), ("eyes", 12), ("eyelids", 2))},
                        torch.zeros(0, dtype=torch.long))
    h, w = frames[0].img_hw
    gt = torch.zeros(n, h, w, 3, dtype=torch.uint8)
    head = torch.zeros(n, h, w, dtype=torch.bool)
    mouth = torch.zeros(n, h, w, dtype=torch.bool)
    bg = np.asarray(background_color(cfg.data.background), np.float32)
    if load_images:
        off = cfg.data.frame_offset
        for i, f in enumerate(frames):
            name = f"{f.index + off:05d}"
            img = _read_image(image_dir / "imgs" / f"{name}.jpg")
            if img.shape[:2] != (h, w):
                raise ValueError(f"{image_dir / 'imgs' / (name + '.jpg')}: image is {img.shape[1]}x{img.shape[0]}"
                                 f" (w x h) but the tracker's img_size says {w}x{h}")
            alpha = _read_image(image_dir / "alpha" / f"{name}.jpg", grey=True).astype(np.float32)[..., None] / 255
            m_head = _read_image(image_dir / "parsing" / f"{name}_neckhead.png", grey=True)[..., None] > 127
            m_mouth = _read_image(image_dir / "parsing" / f"{name}_mouth.png", grey=True) > 127
            for what, arr in (("alpha", alpha), ("neckhead mask", m_head)):
                if arr.shape[:2] != (h, w):
                    raise ValueError(f"{image_dir}: {what} of frame {name} is {arr.shape[1]}x{arr.shape[0]}, "
                                     f"expected {w}x{h}")
            comp = img.astype(np.float32) / 255 * alpha + bg * (1 - alpha)
            comp = np.where(m_head, comp, bg)
            gt[i] = torch.from_numpy((comp * 255 + 0.5).astype(np.uint8))
            head[i] = torch.from_numpy(m_head[..., 0])
            mouth[i] = torch.from_numpy(m_mouth)
    return FrameSet(gt, head, mouth, torch.from_numpy(np.stack([f.viewmat for f in frames])),
                    torch.from_numpy(np.stack([f.K for f in frames])), _codes(frames),
                    torch.tensor([f.index for f in frames], dtype=torch.long))


def load_subject(cfg: Config, *, load_frames: bool = True) -> tuple[FrameSet, FrameSet, Path, Path]:
    """(train frames, test frames, head model pkl, template obj) of the configured subject."""
    image_dir = Path(cfg.data.data_root) / cfg.data.subject
    if not image_dir.is_dir():
        raise FileNotFoundError(f"subject folder not found: {image_dir} (data.data_root / data.subject; "
                                "make a synthetic one with `flashavatar synth`)")
    files = tracker_files(tracker_root_of(cfg), cfg.data.subject)
    frames = [read_tracker_frame(f) for f in files]
    sizes = {f.img_hw for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{files[0].parent}: tracker files disagree on img_size: {sorted(sizes)}")
    n_test = min(cfg.data.n_test, max(0, len(frames) - 1))
    train = frames[: len(frames) - n_test][: cfg.data.max_train]
    test = frames[len(frames) - n_test:]
    pkl, obj = head_model_of(cfg)
    return (_frameset(train, cfg, image_dir, load_frames), _frameset(test, cfg, image_dir, load_frames), pkl, obj)


def build_avatar(cfg: Config, head_model: Path, template: Path, frames: FrameSet, device: torch.device):
    from .model import FLAME, GaussianAvatar

    flame = FLAME(head_model)
    shape = frames.codes["shape"][0]
    if shape.numel() != flame.n_shape:  # tracker files may hold fewer shape components
        shape = torch.nn.functional.pad(shape, (0, max(0, flame.n_shape - shape.numel())))[: flame.n_shape]
    avatar = GaussianAvatar(flame, template, uv_size=cfg.model.uv_size, shape=shape, parity=cfg.model.parity,
                            sh_degree=cfg.model.sh_degree, hidden=cfg.model.mlp_hidden, layers=cfg.model.mlp_layers,
                            seed=cfg.train.seed)
    return flame.to(device), avatar.to(device)


@dataclass
class TrackerSequence:
    """Codes and cameras of a tracked sequence (no images): a driver for reenactment."""

    codes: dict[str, torch.Tensor]
    viewmats: torch.Tensor
    Ks: torch.Tensor
    frame_ids: torch.Tensor
    img_hw: tuple[int, int]


def load_tracker_sequence(tracker_root: str | Path, subject: str) -> TrackerSequence:
    frames = [read_tracker_frame(f) for f in tracker_files(Path(tracker_root), subject)]
    return TrackerSequence(_codes(frames), torch.from_numpy(np.stack([f.viewmat for f in frames])),
                           torch.from_numpy(np.stack([f.K for f in frames])),
                           torch.tensor([f.index for f in frames]), frames[0].img_hw)
