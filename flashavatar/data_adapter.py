"""From a config to frames in memory and a built avatar (the glue between the data layout and training).

Frames are read by :class:`flashavatar.data.FlashAvatarDataset` (the layout of SPEC 1; tracker files are
pickles read with ``weights_only=False``: use only files you trust; every bad file is reported by name) and
kept in memory as one :class:`~flashavatar.session.FrameSet` per split. The default head model is ``<data_root>/flame/
generic_model.pkl`` with ``head_template.obj`` beside it (the layout `flashavatar synth` writes); the
default tracker root is ``<data_root>/tracker`` when it exists, else ``<data_root>``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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


def _frameset(ds, load_images: bool) -> FrameSet:
    """Everything of one split in memory: uint8 ground truth (composited over the background, SPEC 1), masks,
    cameras and codes."""
    n, h, w = len(ds), ds.height, ds.width
    gt = torch.zeros(n, h, w, 3, dtype=torch.uint8)
    head = torch.zeros(n, h, w, dtype=torch.bool)
    mouth = torch.zeros(n, h, w, dtype=torch.bool)
    if load_images:
        from .data import compose_gt

        for i in range(n):
            im = ds.load_images(i)
            gt[i] = (compose_gt(im["image"], im["alpha"], im["head_mask"], ds.background) * 255 + 0.5).to(torch.uint8)
            head[i], mouth[i] = im["head_mask"], im["mouth_mask"]
    codes = {k: v.clone() for k, v in ds.codes.as_dict().items()}
    codes["shape"] = codes["shape"][:1]  # one identity per subject
    return FrameSet(gt, head, mouth, ds.viewmats.clone(), ds.Ks.clone(), codes,
                    torch.tensor(ds.frame_indices, dtype=torch.long))


def load_subject(cfg: Config, *, load_frames: bool = True) -> tuple[FrameSet, FrameSet, Path, Path]:
    """(train frames, test frames, head model pkl, template obj) of the configured subject, read with
    :class:`flashavatar.data.FlashAvatarDataset` (errors name the file at fault)."""
    from .data import FlashAvatarDataset

    d = cfg.data
    common = dict(frame_offset=d.frame_offset, n_test=d.n_test, max_train=d.max_train,
                  background=background_color(d.background))
    # without frames (bench, inspect) only the tracker files are needed
    train = FlashAvatarDataset(d.data_root, tracker_root_of(cfg), d.subject, "train", check_files=load_frames,
                               **common)
    test = FlashAvatarDataset(d.data_root, tracker_root_of(cfg), d.subject, "test", check_files=False, **common)
    pkl, obj = head_model_of(cfg)
    return _frameset(train, load_frames), _frameset(test, load_frames), pkl, obj


def build_avatar(cfg: Config, head_model: Path, template: Path, frames: FrameSet, device: torch.device):
    from .model import FLAME, GaussianAvatar

    flame = FLAME(head_model)
    shape = frames.codes["shape"][0]
    if shape.numel() != flame.n_shape:  # tracker files may hold fewer shape components
        shape = torch.nn.functional.pad(shape, (0, max(0, flame.n_shape - shape.numel())))[: flame.n_shape]
    avatar = GaussianAvatar(flame, template, uv_size=cfg.model.uv_size, shape=shape, parity=cfg.model.parity,
                            sh_degree=cfg.model.sh_degree, hidden=cfg.model.mlp_hidden, layers=cfg.model.mlp_layers,
                            seed=cfg.train.seed, color_offset=cfg.model.color_offset,
                            shading=cfg.model.shading)
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
    """Every tracker frame of ``<tracker_root>/<subject>/checkpoint`` (trusted files only: they are pickles)."""
    from .data import list_tracker_frames, load_tracker_frame

    frames = [load_tracker_frame(p) for _, p in list_tracker_frames(Path(tracker_root) / subject / "checkpoint")]

    def f32(values):
        return torch.as_tensor(np.stack(values), dtype=torch.float32)

    codes = {k: f32([getattr(f, k) for f in frames]) for k in ("shape", "expr", "jaw", "eyes", "eyelids")}
    codes["shape"] = codes["shape"][:1]
    return TrackerSequence(codes, f32([f.viewmat for f in frames]), f32([f.K for f in frames]),
                           torch.tensor([f.frame_index for f in frames]), (frames[0].height, frames[0].width))
