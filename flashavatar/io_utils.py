"""Atomic file writes, checkpoints, images and videos.

Every file is written to a temporary name in the same folder, flushed to disk, then moved over the target
with ``os.replace`` (atomic on POSIX), so an interrupted write never leaves a half-written file under the
real name and the previous version stays intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # make the bytes durable before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result over ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


# ----------------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """Every random state a training step may touch (torch CPU/CUDA, numpy, python)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # another GPU count than at save time: keep the current state
            torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (state dicts, iteration, RNG states, ...) atomically with ``torch.save``."""
    payload = dict(payload, format=CHECKPOINT_FORMAT)
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Checkpoints hold RNG states (numpy arrays, python tuples), so they are read with ``weights_only=False``:
    load only checkpoints you wrote yourself or otherwise trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"checkpoint {path} is not a flashavatar checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


# ---------------------------------------------------------------------------------------- images, video

def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H, W, 3] (or [3, H, W]) float in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_png(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    import imageio.v3 as iio

    data = to_uint8(image)
    atomic_write_with(path, lambda tmp: iio.imwrite(tmp, data, extension=".png"))


class VideoWriter:
    """MP4 (H.264 via imageio-ffmpeg) written to a temporary file and moved into place on close."""

    def __init__(self, path: str | os.PathLike, fps: float = 25.0):
        import imageio.v2 as iio2

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".mp4", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        # macro_block_size=1 keeps odd sizes as they are (libx264 with yuv420p needs even sizes: we pad).
        self._writer = iio2.get_writer(self._tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                       quality=8, macro_block_size=1, pixelformat="yuv420p")
        self.frames = 0

    def append(self, frame: torch.Tensor | np.ndarray) -> None:
        data = to_uint8(frame)
        h, w = data.shape[:2]
        if h % 2 or w % 2:  # yuv420p needs even dimensions
            data = np.pad(data, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        self._writer.append_data(data)
        self.frames += 1

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
