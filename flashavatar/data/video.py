"""Video decoding and the fixed crop box used by ``flashavatar prepare``.

Decoding goes through imageio's ffmpeg plugin (the ffmpeg binary shipped by ``imageio-ffmpeg``), one RGB
frame at a time, so memory stays flat for long videos. Frame times are ``index / fps`` (the container's
average frame rate): exact for constant-frame-rate videos, which is what phones and cameras record; for a
variable-frame-rate file the times are approximate.

The crop box is fixed for the whole video (the tracker's intrinsics assume a camera that does not move in
the image). It comes from, in order of preference:

1. ``--box x0,y0,x1,y1`` given by the user (source pixels, made square around its centre);
2. a metrical-tracker ``bbox.pt`` (``[x_min, x_max, y_min, y_max]``), cropped and padded to a square the
   way that tracker does it, so the frames line up with its ``.frame`` intrinsics;
3. an automatic box from the first frames: a skin-colour heuristic (see :func:`skin_box`), no network and
   no weights; if it finds no face-sized skin region it falls back to the centred square.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class VideoError(ValueError):
    """A video that cannot be opened or decoded (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float  # average frame rate of the stream
    width: int
    height: int
    duration: float | None  # seconds, when the container says


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's frame rate, size and duration; :class:`VideoError` naming the file if it can't."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video {path}: no such file")
    try:
        meta = iio.immeta(path, plugin="FFMPEG")
    except Exception as exc:  # ffmpeg reports anything from 'moov atom not found' to unknown codecs
        raise VideoError(f"video {path}: ffmpeg cannot read it ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    size = meta.get("size") or (0, 0)
    fps = float(meta.get("fps") or 0.0)
    if not (size[0] > 0 and size[1] > 0):
        raise VideoError(f"video {path}: no video stream found (metadata: {meta})")
    if not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"video {path}: the stream has no usable frame rate ({meta.get('fps')!r})")
    duration = meta.get("duration")
    duration = float(duration) if duration is not None and math.isfinite(float(duration)) else None
    return VideoInfo(path=path, fps=fps, width=int(size[0]), height=int(size[1]), duration=duration)


def select_frames(src_fps: float, *, target_fps: float | None = None, start: float = 0.0,
                  end: float | None = None) -> "FrameSelector":
    """Build the rule that decides which source frames to keep; see :class:`FrameSelector`."""
    return FrameSelector(src_fps=src_fps, target_fps=target_fps, start=start, end=end)


@dataclasses.dataclass
class FrameSelector:
    """Keeps source frames with ``start <= t < end``, thinned to at most ``target_fps`` frames per second.

    With a target rate below the source rate, the kept frame for output slot ``j`` is the first source frame
    at or after ``start + j / target_fps`` (no frame is repeated; a target above the source rate keeps all).
    """

    src_fps: float
    target_fps: float | None = None
    start: float = 0.0
    end: float | None = None
    _next_slot: int = 0

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start time must be >= 0 s, got {self.start}")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end time ({self.end} s) must be after start time ({self.start} s)")
        if self.target_fps is not None and not self.target_fps > 0:
            raise ValueError(f"fps must be > 0, got {self.target_fps}")

    def time_of(self, index: int) -> float:
        return index / self.src_fps

    def past_end(self, index: int) -> bool:
        return self.end is not None and self.time_of(index) >= self.end - 1e-9

    def keep(self, index: int) -> bool:
        """Call once per source frame, in order; True when that frame is kept."""
        t = self.time_of(index)
        # half a source frame of tolerance so that e.g. 30 -> 15 fps keeps exactly every other frame
        tol = 0.5 / self.src_fps
        if t < self.start - 1e-9 or self.past_end(index):
            return False
        if self.target_fps is None or self.target_fps >= self.src_fps:
            return True
        # slot j is due at start + j / target_fps; 1e-6 absorbs float error in e.g. 0.08 + 0.02 vs 0.1
        if (t + tol - self.start) * self.target_fps + 1e-6 < self._next_slot:
            return False
        self._next_slot = int(math.floor((t + tol - self.start) * self.target_fps + 1e-6)) + 1
        return True


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Decoded RGB frames ``[H, W, 3] uint8``, in order; :class:`VideoError` naming the file on failure."""
    import imageio.v3 as iio

    path = Path(path)
    index = -1
    try:
        for index, frame in enumerate(iio.imiter(path, plugin="FFMPEG")):
            yield np.asarray(frame)[..., :3]
    except (OSError, RuntimeError, ValueError) as exc:
        where = "before the first frame" if index < 0 else f"after frame {index} (0-based)"
        raise VideoError(f"video {path}: decoding failed {where}: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------------------
# crop boxes


@dataclasses.dataclass(frozen=True)
class CropBox:
    """A crop in source pixels, half-open: columns ``x0 <= x < x1``, rows ``y0 <= y < y1``.

    ``mode`` says how the crop becomes a square image: ``"square"`` — the box itself is square and may reach
    outside the frame (outside = black); ``"tracker"`` — metrical-tracker's rule: clip the box to the frame,
    then pad the shorter side evenly with black to a square.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    mode: str = "square"
    source: str = "user"

    def __post_init__(self) -> None:
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"crop box must have x1 > x0 and y1 > y0, got {self.as_tuple()}")
        if self.mode not in ("square", "tracker"):
            raise ValueError(f"crop box mode must be 'square' or 'tracker', got {self.mode!r}")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


def parse_box(text: str) -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` -> ints; ValueError naming the option otherwise."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(int(round(float(p))) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ValueError(f"--box: expected four numbers x0,y0,x1,y1 (source pixels), got {text!r}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"--box: need x1 > x0 and y1 > y0, got {text!r}")
    return values  # type: ignore[return-value]


def square_box(x0: float, y0: float, x1: float, y1: float, *, scale: float = 1.0,
               source: str = "user") -> CropBox:
    """The square with the same centre as the box, side ``scale * max(width, height)`` (pixels, rounded)."""
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    side = max(1, int(round(scale * max(x1 - x0, y1 - y0))))
    left, top = int(math.floor(cx - side / 2.0 + 0.5)), int(math.floor(cy - side / 2.0 + 0.5))
    return CropBox(left, top, left + side, top + side, mode="square", source=source)


def shift_inside(box: CropBox, width: int, height: int) -> CropBox:
    """Move a square box (same size) so it lies inside a ``width × height`` frame, where it fits; an axis on
    which it is larger than the frame stays centred where it was (the outside is padded black)."""
    def shift(lo: int, hi: int, limit: int) -> tuple[int, int]:
        if hi - lo > limit:
            return lo, hi
        offset = -lo if lo < 0 else (limit - hi if hi > limit else 0)
        return lo + offset, hi + offset

    x0, x1 = shift(box.x0, box.x1, width)
    y0, y1 = shift(box.y0, box.y1, height)
    return dataclasses.replace(box, x0=x0, y0=y0, x1=x1, y1=y1)


def centre_box(width: int, height: int) -> CropBox:
    """The largest centred square inside a ``width × height`` frame."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return CropBox(x0, y0, x0 + side, y0 + side, mode="square", source="centre")


def load_tracker_bbox(path: str | os.PathLike) -> CropBox:
    """A metrical-tracker ``bbox.pt`` (``[x_min, x_max, y_min, y_max]``) as a ``"tracker"`` crop box.

    Also accepts ``.npy`` and ``.txt``/``.json`` files holding the same four numbers. The ``.pt`` file is a
    pickled numpy array; it is loaded with ``torch.load(weights_only=True)`` plus numpy's array types allowed,
    so no arbitrary code in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--tracker-bbox {path}: no such file")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif path.suffix in (".txt", ".json"):
            values = np.array([float(v) for v in path.read_text().replace("[", " ").replace("]", " ")
                               .replace(",", " ").split()])
        else:
            values = _load_pickled_array(path)
    except Exception as exc:
        raise ValueError(f"--tracker-bbox {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape != (4,) or not np.all(np.isfinite(values)):
        raise ValueError(f"--tracker-bbox {path}: expected 4 numbers [x_min, x_max, y_min, y_max], "
                         f"got shape {tuple(values.shape)}")
    x_min, x_max, y_min, y_max = (int(v) for v in values)
    return CropBox(x_min, y_min, x_max, y_max, mode="tracker", source=f"tracker:{path}")


def numpy_safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` must allow to read pickled numpy arrays and scalars (the
    contents of metrical-tracker's ``bbox.pt`` and ``.frame`` files) and nothing else, so no code in the
    file can run. Covers files written under NumPy 1 (``numpy.core``) and NumPy 2 (``numpy._core``)."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
    allowed: list = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    allowed += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                (multiarray.scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("bool", "uint8", "int32", "int64", "float16", "float32", "float64")]
    return allowed


def _load_pickled_array(path: Path) -> np.ndarray:
    import torch

    with torch.serialization.safe_globals(numpy_safe_globals()):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        obj = obj.numpy()
    return np.asarray(obj)


def crop_square(frame: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Crop ``frame [H, W, C]`` with ``box`` and resize to ``[size, size, C]`` (bicubic; outside = black)."""
    h, w = frame.shape[:2]
    if box.mode == "tracker":
        # metrical-tracker: clip to the frame (its slice ends at h-1 / w-1), then pad evenly to a square
        x0, y0 = max(box.x0, 0), max(box.y0, 0)
        x1, y1 = min(box.x1, w - 1), min(box.y1, h - 1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"tracker crop box {box.as_tuple()} lies outside the {w}x{h} frame")
        crop = frame[y0:y1, x0:x1]
        ch, cw = crop.shape[:2]
        side = max(ch, cw)
        pad_x, pad_y = (side - cw) // 2, (side - ch) // 2
        pad = [(pad_y, pad_y), (pad_x, pad_x)] + [(0, 0)] * (frame.ndim - 2)
        crop = np.pad(crop, pad, mode="constant")
    else:
        crop = _crop_padded(frame, box.x0, box.y0, box.x1, box.y1)
    image = Image.fromarray(crop)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def _crop_padded(frame: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``frame[y0:y1, x0:x1]`` where the parts outside the frame are zeros."""
    h, w = frame.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + frame.shape[2:], dtype=frame.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    return out


# ----------------------------------------------------------------------------------------------------------
# automatic box (no detector weights)


def skin_mask(frame: np.ndarray) -> np.ndarray:
    """Skin-coloured pixels of an RGB frame ``[H, W, 3] uint8`` -> bool ``[H, W]``.

    The classic fixed chroma window in YCbCr (Cb 77–127, Cr 133–173; Chai & Ngan 1999), plus a minimum
    brightness so dark shadows don't count. Crude, but needs no weights.
    """
    rgb = frame[..., :3].astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return (cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173) & (y >= 40)


def skin_box(frames: list[np.ndarray], *, scale: float = 1.8, min_fraction: float = 0.005
             ) -> CropBox | None:
    """A square head box from the first frames of a video, or None when no face-sized skin region is found.

    For each frame: skin mask (:func:`skin_mask`), opened to drop specks, largest connected region. The face
    is the top of that region down to where it narrows into the neck (the first row, at least 0.8 face
    widths below the top, whose extent falls under 75% of the widest row so far), so a visible neck or
    shoulders do not stretch the box. The median face box over the frames (robust to a bad frame) is made
    square around its centre with side ``scale × max(width, height)`` (face → head with hair). Regions
    below ``min_fraction`` of the frame area are ignored.
    """
    from scipy import ndimage

    boxes = []
    for frame in frames:
        mask = ndimage.binary_opening(skin_mask(frame), iterations=2)
        labels, n = ndimage.label(mask)
        if n == 0:
            continue
        areas = np.bincount(labels.ravel())[1:]
        best = int(np.argmax(areas))
        if areas[best] < min_fraction * mask.size:
            continue
        boxes.append(_face_box(labels == best + 1))
    if not boxes:
        return None
    x0, y0, x1, y1 = np.median(np.asarray(boxes, dtype=np.float64), axis=0)
    return square_box(x0, y0, x1, y1, scale=scale, source="skin")


def _face_box(region: np.ndarray) -> tuple[int, int, int, int]:
    """``[x0, y0, x1, y1]`` (half-open) of the face part of a skin region ``[H, W] bool``: from its top row
    down to where it narrows into the neck (see :func:`skin_box`)."""
    rows = np.nonzero(region.any(axis=1))[0]
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    widest = 0
    for r in range(top, bottom):
        cols = np.nonzero(region[r])[0]
        extent = int(cols[-1] - cols[0] + 1) if cols.size else 0
        widest = max(widest, extent)
        if r - top >= 0.8 * widest and extent < 0.75 * widest:
            bottom = r
            break
    cols = np.nonzero(region[top:bottom].any(axis=0))[0]
    return int(cols[0]), top, int(cols[-1]) + 1, bottom
