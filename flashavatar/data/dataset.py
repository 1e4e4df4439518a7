"""The FlashAvatar / metrical-tracker dataset layout (SPEC §1)::

    <data_root>/<id>/imgs/00001.jpg  alpha/00001.jpg  parsing/00001_neckhead.png  parsing/00001_mouth.png
    <tracker_root>/<id>/checkpoint/00000.frame

Tracker frame k pairs with image k + ``frame_offset`` (default 1). The last ``n_test`` frames (default 500) are
the test split; the train split is the rest, at most ``max_train`` (default 10,000) from the start.

Images are read lazily from disk as uint8 (optionally kept in RAM, ``cache=True``); the float ground truth is
made on request by :func:`compose_gt`, on whatever device the uint8 tensors are, so a batch travels to the
GPU as ~1 MB per 512² frame instead of the original's 5 MB float32.

Tracker files are pickles read with ``torch.load(weights_only=False)``: only read folders you trust.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..model.flame import FlameCodes
from .tracker import TrackerFrame, list_tracker_frames, load_tracker_frame

log = logging.getLogger(__name__)

__all__ = ["FlashAvatarDataset", "AdjacentPairs", "compose_gt", "collate_frames", "collate_pairs", "read_image",
           "BACKGROUNDS"]

BACKGROUNDS = {"green": (0.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
_IMAGE_EXTS = (".jpg", ".png", ".jpeg")


def read_image(path: Path, kind: str) -> np.ndarray:
    """Read ``path`` as uint8: ``kind`` 'rgb' -> [H, W, 3], 'gray' -> [H, W], 'mask' -> [H, W] bool (> 127)."""
    import imageio.v3 as iio

    if not Path(path).is_file():
        raise FileNotFoundError(f"missing {kind} image: {path}")
    try:
        img = np.asarray(iio.imread(path, plugin="pillow"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"{path}: unsupported image (dtype {img.dtype}, shape {img.shape})")
    if kind == "rgb":
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        return np.ascontiguousarray(img[..., :3])
    if img.ndim == 3:
        img = img[..., 0]
    return img > 127 if kind == "mask" else np.ascontiguousarray(img)


def compose_gt(image: torch.Tensor, alpha: torch.Tensor, head_mask: torch.Tensor, background) -> torch.Tensor:
    """Ground truth of SPEC §1: ``gt = img·α + bg·(1−α)``, then ``gt·M + bg·(1−M)``.

    ``image [..., H, W, 3]`` uint8 (or float in [0, 1]), ``alpha [..., H, W]`` uint8 (or float), ``head_mask
    [..., H, W]`` bool, ``background [3]`` or ``[..., 3]``. Returns float32 ``[..., H, W, 3]`` on image's device.
    """
    img = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    a = alpha.float() / 255.0 if alpha.dtype == torch.uint8 else alpha.float()
    m = head_mask.float()
    bg = torch.as_tensor(background, dtype=torch.float32, device=img.device)
    bg = bg.reshape(*bg.shape[:-1], 1, 1, 3) if bg.dim() > 1 else bg
    gt = img * a[..., None] + bg * (1 - a[..., None])
    return gt * m[..., None] + bg * (1 - m[..., None])


class FlashAvatarDataset(Dataset):
    """Frames of one subject (one split).

    Items (dict): ``image [H, W, 3]`` uint8, ``alpha [H, W]`` uint8, ``head_mask [H, W]`` bool,
    ``mouth_mask [H, W]`` bool, ``viewmat [4, 4]`` float32 (world→camera, OpenCV), ``K [3, 3]`` float32,
    ``width``, ``height``, FLAME codes ``shape [300] expr [100] jaw [6] eyes [12] eyelids [2]`` float32,
    ``frame_index`` (tracker k), ``image_index`` (k + offset), ``index`` (position in the split); and
    ``gt [H, W, 3]`` float32 when ``return_gt=True``.

    Args:
        background: RGB in [0, 1] or a name in :data:`BACKGROUNDS` (default green).
        cache: keep decoded uint8 images in RAM after the first read.
        check_files: check at construction that the four image files of every tracker frame (all splits)
            exist (cheap ``stat``), so mismatched counts fail early, naming the first missing file.
        n_shape, n_expr: components kept from the tracker codes.

    Tracker files are read with ``torch.load(weights_only=False)``: only pass folders you trust.
    """

    def __init__(self, data_root, tracker_root, subject_id: str, split: str = "train", *, frame_offset: int = 1,
                 n_test: int = 500, max_train: int = 10000, background=(0.0, 1.0, 0.0), return_gt: bool = False,
                 cache: bool = False, check_files: bool = True, n_shape: int = 300, n_expr: int = 100):
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        self.data_dir = Path(data_root) / subject_id
        self.checkpoint_dir = Path(tracker_root) / subject_id / "checkpoint"
        self.subject_id, self.split, self.frame_offset = subject_id, split, int(frame_offset)
        bg = BACKGROUNDS[background] if isinstance(background, str) else background
        self.background = torch.as_tensor(bg, dtype=torch.float32).reshape(3)
        self.return_gt, self.cache = return_gt, cache
        self._cache: dict[int, dict] = {}
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"subject folder not found: {self.data_dir}")

        frames = list_tracker_frames(self.checkpoint_dir)
        n = len(frames)
        if split == "all":
            chosen = frames
        else:
            if n_test < 0 or n_test >= n:
                raise ValueError(f"{self.checkpoint_dir}: n_test={n_test} leaves no training frames "
                                 f"({n} tracker frames); pass a smaller n_test")
            chosen = frames[n - n_test:] if split == "test" else frames[: min(max_train, n - n_test)]
        self.frames: list[TrackerFrame] = [load_tracker_frame(p, n_shape=n_shape, n_expr=n_expr) for _, p in chosen]
        for fr in self.frames:
            if fr.width != self.frames[0].width or fr.height != self.frames[0].height:
                raise ValueError(f"{fr.path}: img_size [{fr.height}, {fr.width}] differs from "
                                 f"{self.frames[0].path} [{self.frames[0].height}, {self.frames[0].width}]")
        self.frame_indices = [k for k, _ in chosen]
        self.height, self.width = self.frames[0].height, self.frames[0].width

        f32 = lambda a: torch.as_tensor(np.stack(a), dtype=torch.float32)  # noqa: E731
        self.codes = FlameCodes(*(f32([getattr(fr, n) for fr in self.frames])
                                  for n in ("shape", "expr", "jaw", "eyes", "eyelids")))
        self.viewmats = f32([fr.viewmat for fr in self.frames])  # [T, 4, 4]
        self.Ks = f32([fr.K for fr in self.frames])  # [T, 3, 3]
        self._paths = [self._image_paths(k) for k in self.frame_indices]
        if check_files:  # every tracker frame (all splits) needs its four images: catches count mismatches
            missing = [p for k, _ in frames for p in self._image_paths(k).values() if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"missing {len(missing)} image file(s) for the {n} tracker frames in "
                                        f"{self.checkpoint_dir} (frame k <-> image k+{self.frame_offset}), "
                                        f"first: {missing[0]}")

    def _image_paths(self, k: int) -> dict[str, Path]:
        name = f"{k + self.frame_offset:05d}"

        def first(folder: str) -> Path:  # .jpg as in the original layout; .png / .jpeg accepted too
            cands = [self.data_dir / folder / f"{name}{ext}" for ext in _IMAGE_EXTS]
            return next((c for c in cands if c.is_file()), cands[0])
        return {"image": first("imgs"), "alpha": first("alpha"),
                "head_mask": self.data_dir / "parsing" / f"{name}_neckhead.png",
                "mouth_mask": self.data_dir / "parsing" / f"{name}_mouth.png"}

    def __len__(self) -> int:
        return len(self.frames)

    def load_images(self, i: int) -> dict[str, torch.Tensor]:
        """The uint8 / bool image tensors of item ``i`` (checked against the tracker's img_size)."""
        if i in self._cache:
            return self._cache[i]
        paths = self._paths[i]
        kinds = {"image": "rgb", "alpha": "gray", "head_mask": "mask", "mouth_mask": "mask"}
        out = {}
        for key, path in paths.items():
            arr = read_image(path, kinds[key])
            if arr.shape[:2] != (self.height, self.width):
                raise ValueError(f"{path}: image is {arr.shape[0]}x{arr.shape[1]} (h x w) but the tracker frame "
                                 f"{self.frames[i].path} says img_size [{self.height}, {self.width}]")
            out[key] = torch.from_numpy(arr)
        if self.cache:
            self._cache[i] = out
        return out

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} frames")
        item = dict(self.load_images(i))
        fr = self.frames[i]
        # clones: a view would carry the whole [T, ...] storage into DataLoader worker queues
        item.update(viewmat=self.viewmats[i].clone(), K=self.Ks[i].clone(), width=self.width, height=self.height,
                    frame_index=self.frame_indices[i], image_index=self.frame_indices[i] + self.frame_offset,
                    index=i, **{k: v[i].clone() for k, v in self.codes.as_dict().items()})
        if self.return_gt:
            item["gt"] = compose_gt(item["image"], item["alpha"], item["head_mask"], self.background)
        return item

    def gt(self, batch: dict, device=None) -> torch.Tensor:
        """Float ground truth ``[..., H, W, 3]`` for an item or a collated batch (optionally moved first)."""
        img, a, m = (batch[k].to(device) if device is not None else batch[k] for k in ("image", "alpha", "head_mask"))
        return compose_gt(img, a, m, self.background)

    def adjacent_pairs(self) -> "AdjacentPairs":
        return AdjacentPairs(self)

    def check_all(self) -> list[str]:
        """Read every image of the split; return one message per bad file (empty = all good)."""
        problems = []
        for i in range(len(self)):
            try:
                self.load_images(i)
            except (OSError, ValueError) as exc:
                problems.append(str(exc))
        return problems


class AdjacentPairs(Dataset):
    """Pairs ``(frame t−1, frame t)`` of consecutive tracker frames inside one split (for the temporal
    regulariser). Item: ``(prev_item, cur_item)``."""

    def __init__(self, dataset: FlashAvatarDataset):
        self.dataset = dataset
        k = dataset.frame_indices
        self.pairs = [(i - 1, i) for i in range(1, len(k)) if k[i] - k[i - 1] == 1]
        if not self.pairs:
            raise ValueError(f"{dataset.checkpoint_dir}: no consecutive tracker frames in the {dataset.split} split")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int):
        a, b = self.pairs[j]
        return self.dataset[a], self.dataset[b]


def collate_frames(items: list[dict]) -> dict:
    """Stack items into a batch: tensors get a leading ``[B]``, ints become long tensors ``[B]``.
    ``FlameCodes.from_any(batch)`` gives the batch's codes."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if torch.is_tensor(vals[0]):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, np.integer)):
            out[key] = torch.as_tensor(vals, dtype=torch.long)
        else:
            out[key] = vals
    return out


def collate_pairs(pairs: list[tuple[dict, dict]]) -> dict:
    """Batch of adjacent pairs -> ``{"prev": batch, "cur": batch}`` (row b of each forms one pair)."""
    return {"prev": collate_frames([p for p, _ in pairs]), "cur": collate_frames([c for _, c in pairs])}
