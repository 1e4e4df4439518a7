"""``flashavatar validate DATA_ROOT [TRACKER_ROOT] --id NAME``: check a subject before training.

Reports frame counts, numbering gaps, image/tracker pairing gaps, image sizes, mask and alpha coverage and
the tracker files' keys and shapes, each problem naming the exact file. Problems that would make training
fail (a missing or unreadable file, a size mismatch, a missing tracker key, too few frames for the split)
are *errors* and give exit code 1; suspicious but trainable data (an empty head mask, tracker files without
an image) are *warnings*.

Tracker ``.frame`` files are pickles. They are read with ``torch.load(weights_only=True)`` allowing only numpy
arrays and scalars, which covers metrical-tracker's files and runs no code from them; a file that needs more
is reported, and ``--trust-tracker-files`` loads it fully (only for files you trust).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("flashavatar.validate")

# what training reads from every tracker file: dotted path -> shape (SPEC §1)
TRACKER_SCHEMA: dict[str, tuple[int, ...]] = {
    "flame.exp": (1, 100),
    "flame.shape": (1, 300),
    "flame.jaw": (1, 6),
    "flame.eyes": (1, 12),
    "flame.eyelids": (1, 2),
    "opencv.R": (1, 3, 3),
    "opencv.t": (1, 3),
    "opencv.K": (1, 3, 3),
    "img_size": (2,),
}

_FRAME_FILE = re.compile(r"^(\d+)\.frame$")
_IMAGE_FILE = re.compile(r"^(\d{5})\.jpg$")
MAX_LISTED = 5  # files named per kind of problem before "and N more"


@dataclasses.dataclass
class Finding:
    level: str  # "error" | "warning"
    path: str  # the file (or folder) at fault
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.path}: {self.message}"


@dataclasses.dataclass
class ValidationReport:
    subject: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when training can run on this data."""
        return not self.errors

    def error(self, path, message: str) -> None:
        self.findings.append(Finding("error", str(path), message))

    def warning(self, path, message: str) -> None:
        self.findings.append(Finding("warning", str(path), message))

    def mentions(self, path_fragment: str) -> bool:
        """True when some finding names a path containing ``path_fragment`` (for tests and scripts)."""
        return any(path_fragment in f.path or path_fragment in f.message for f in self.findings)

    def format(self) -> str:
        lines = [f"subject {self.subject}"]
        for key, value in self.stats.items():
            lines.append(f"  {key}: {value}")
        for finding in self.findings:
            lines.append(f"  {finding}")
        verdict = "OK: training can run" if self.ok else f"FAILED: {len(self.errors)} error(s), training would fail"
        lines.append(f"{verdict} ({len(self.warnings)} warning(s))")
        return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_root", type=Path, help="data root holding <id>/imgs, alpha, parsing")
    parser.add_argument("tracker_root", type=Path, nargs="?", default=None,
                        help="tracker root holding <id>/checkpoint/*.frame (leave out to check images only)")
    parser.add_argument("--id", required=True, help="subject name")
    parser.add_argument("--offset", type=int, default=1,
                        help="image number - tracker number of a pair (default 1: 00000.frame ↔ 00001.jpg)")
    parser.add_argument("--test-frames", type=int, default=500,
                        help="the last this-many frames are the test split (default 500)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="expected image size (default: the first frame's, or the tracker's img_size)")
    parser.add_argument("--quick", action="store_true",
                        help="read image headers only (faster; truncated images and mask coverage are not checked)")
    parser.add_argument("--trust-tracker-files", action="store_true",
                        help="load tracker files with full unpickling (runs code in them: only for files you trust)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = validate_subject(args.data_root, args.tracker_root, args.id, offset=args.offset,
                              test_frames=args.test_frames, expected_size=tuple(args.size) if args.size else None,
                              decode=not args.quick, trust_tracker_files=args.trust_tracker_files,
                              progress=not args.quiet)
    print(report.format())
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------------------------------------


def validate_subject(data_root, tracker_root, subject: str, *, offset: int = 1, test_frames: int = 500,
                     expected_size: tuple[int, int] | None = None, decode: bool = True,
                     trust_tracker_files: bool = False, progress: bool = False) -> ValidationReport:
    """Check ``data_root/subject`` (and ``tracker_root/subject/checkpoint`` when given).

    ``expected_size`` is ``(h, w)``; by default the tracker's ``img_size`` or else the first frame's size.
    Returns a :class:`ValidationReport`; never raises on bad data.
    """
    report = ValidationReport(subject=subject)
    folder = Path(data_root) / subject
    imgs = folder / "imgs"
    if not imgs.is_dir():
        report.error(imgs, "no such folder (the frames go in <data_root>/<id>/imgs/00001.jpg …)")
        return report
    frames = _numbered(imgs, _IMAGE_FILE)
    others = sorted(p.name for p in imgs.iterdir() if p.is_file() and not _IMAGE_FILE.match(p.name)
                    and not p.name.startswith("."))
    if others:
        report.warning(imgs, f"{len(others)} file(s) not named NNNNN.jpg are ignored ({_listed(others)})")
    if not frames:
        report.error(imgs, "no frames named NNNNN.jpg")
        return report
    numbers = sorted(frames)
    report.stats["frames"] = f"{len(numbers)} ({frame_range(numbers)})"
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if numbers[0] != 1:
        report.error(imgs / f"{1:05d}.jpg", f"missing: numbering must start at 00001.jpg (first is "
                                            f"{frames[numbers[0]].name})")
    for k in gaps[:MAX_LISTED]:
        report.error(imgs / f"{k:05d}.jpg", "missing (gap in the frame numbering)")
    if len(gaps) > MAX_LISTED:
        report.error(imgs, f"{len(gaps) - MAX_LISTED} more frames missing in the numbering "
                           f"({frame_range(gaps[MAX_LISTED:])})")

    tracker_frames: dict[int, Path] = {}
    tracker_sizes: dict[int, tuple[int, int]] = {}
    if tracker_root is not None:
        tracker_frames, tracker_sizes = _check_tracker(report, Path(tracker_root) / subject / "checkpoint",
                                                       numbers, offset, trust_tracker_files, progress)
        if expected_size is None and tracker_sizes:
            values, counts = np.unique(np.array(list(tracker_sizes.values())), axis=0, return_counts=True)
            expected_size = tuple(int(v) for v in values[np.argmax(counts)])

    _check_images(report, folder, frames, expected_size, tracker_sizes, offset, decode, progress)

    # the split the trainer will use: paired frames, last `test_frames` are the test split
    paired = [k for k in numbers if tracker_root is None or (k - offset) in tracker_frames]
    n_train = len(paired) - test_frames
    report.stats["split"] = f"{max(n_train, 0)} train / {min(test_frames, len(paired))} test (last {test_frames})"
    if n_train <= 0:
        report.error(folder, f"only {len(paired)} usable frame(s) but the test split takes the last {test_frames}: "
                             "no training frames (use more frames or a smaller test split, --test-frames)")
    return report


def frame_range(numbers: Iterable[int]) -> str:
    numbers = sorted(numbers)
    return f"{numbers[0]:05d}…{numbers[-1]:05d}" if len(numbers) > 1 else f"{numbers[0]:05d}"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:MAX_LISTED]) + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    found = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------------------------------------
# images, masks, alpha


def _check_images(report: ValidationReport, folder: Path, frames: dict[int, Path], expected_size, tracker_sizes,
                  offset: int, decode: bool, progress: bool) -> None:
    from tqdm import tqdm

    missing: dict[str, list[Path]] = {"alpha": [], "neckhead mask": [], "mouth mask": []}
    head_cover, mouth_cover, alpha_cover = [], [], []
    empty_heads: list[Path] = []
    size_errors = 0
    for k, image_path in tqdm(frames.items(), desc="images", unit="frame", disable=not progress, leave=False):
        companions = {"alpha": folder / "alpha" / f"{k:05d}.jpg",
                      "neckhead mask": folder / "parsing" / f"{k:05d}_neckhead.png",
                      "mouth mask": folder / "parsing" / f"{k:05d}_mouth.png"}
        size = _image_size(report, image_path, decode)
        if size is None:
            continue
        if expected_size is None:
            expected_size = size
            report.stats["image size"] = f"{size[0]}x{size[1]} (h x w, from {image_path.name})"
        want = tracker_sizes.get(k - offset, expected_size)
        if size != tuple(want):
            size_errors += 1
            if size_errors <= MAX_LISTED:
                source = "its tracker file's img_size" if (k - offset) in tracker_sizes else "the other frames"
                report.error(image_path, f"size {size[0]}x{size[1]} (h x w) but {source} says {want[0]}x{want[1]}")
        for kind, path in companions.items():
            if not path.exists():
                missing[kind].append(path)
                continue
            array = _read_grey(report, path, size, decode)
            if array is None:
                continue
            if kind == "neckhead mask":
                cover = float(np.mean(array > 127))
                head_cover.append(cover)
                if cover == 0.0:
                    empty_heads.append(path)
            elif kind == "mouth mask":
                mouth_cover.append(float(np.mean(array > 127)))
            else:
                alpha_cover.append(float(np.mean(array)) / 255.0)
    if "image size" not in report.stats and expected_size is not None:
        report.stats["image size"] = f"{expected_size[0]}x{expected_size[1]} (h x w)"
    if size_errors > MAX_LISTED:
        report.error(folder / "imgs", f"{size_errors - MAX_LISTED} more frames have the wrong size")
    for kind, paths in missing.items():
        for path in paths[:MAX_LISTED]:
            report.error(path, f"missing ({kind} of frame {path.name[:5]})")
        if len(paths) > MAX_LISTED:
            report.error(paths[0].parent, f"{len(paths) - MAX_LISTED} more {kind} files missing "
                                          f"({len(paths)} of {len(frames)} frames have none)")
    if decode:
        if head_cover:
            report.stats["neckhead mask coverage"] = _summary(head_cover)
        if mouth_cover:
            visible = sum(c > 0 for c in mouth_cover)
            report.stats["mouth mask coverage"] = f"{_summary(mouth_cover)}; inner mouth visible in {visible} frames"
        if alpha_cover:
            report.stats["mean alpha"] = _summary(alpha_cover)
        for path in empty_heads[:MAX_LISTED]:
            report.warning(path, "empty head mask (this frame trains towards pure background)")
        if len(empty_heads) > MAX_LISTED:
            report.warning(folder / "parsing", f"{len(empty_heads) - MAX_LISTED} more empty head masks")


def _summary(values: list[float]) -> str:
    v = np.asarray(values)
    return f"mean {v.mean():.3f}, min {v.min():.3f}, max {v.max():.3f}"


def _image_size(report: ValidationReport, path: Path, decode: bool) -> tuple[int, int] | None:
    """(h, w) of an image, or None after reporting it unreadable (truncated files too when ``decode``)."""
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
            return image.size[1], image.size[0]
    except (OSError, ValueError, SyntaxError) as exc:
        report.error(path, f"unreadable image ({exc})")
        return None


def _read_grey(report: ValidationReport, path: Path, size: tuple[int, int], decode: bool) -> np.ndarray | None:
    """A mask/alpha as ``[H, W] uint8`` (None when only headers are read, or after reporting a problem)."""
    try:
        with Image.open(path) as image:
            if (image.size[1], image.size[0]) != size:
                report.error(path, f"size {image.size[1]}x{image.size[0]} (h x w) differs from its frame's "
                                   f"{size[0]}x{size[1]}")
                return None
            if not decode:
                return None
            return np.asarray(image.convert("L"))
    except (OSError, ValueError, SyntaxError) as exc:
        report.error(path, f"unreadable image ({exc})")
        return None


# ----------------------------------------------------------------------------------------------------------
# tracker files


def load_tracker_file(path: str | Path, *, trust: bool = False) -> dict:
    """One metrical-tracker ``.frame`` dict. Numpy arrays/scalars only unless ``trust`` (full unpickling)."""
    import torch

    from flashavatar.data.video import numpy_safe_globals

    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def lookup(frame: dict, dotted: str):
    """``frame["flame"]["exp"]`` for ``"flame.exp"`` (nested dicts, as metrical-tracker saves), or a flat
    ``frame["flame.exp"]``; KeyError when neither exists."""
    if dotted in frame:
        return frame[dotted]
    node = frame
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def check_tracker_frame(frame, schema: dict[str, tuple[int, ...]] = TRACKER_SCHEMA) -> list[str]:
    """Problems with one tracker dict (missing keys, wrong shapes, non-finite values, a bad K); [] if fine."""
    if not isinstance(frame, dict):
        return [f"expected a dict, got {type(frame).__name__}"]
    problems = []
    for key, shape in schema.items():
        try:
            value = lookup(frame, key)
        except KeyError:
            problems.append(f"missing key {key!r} (expected shape {shape})")
            continue
        try:
            array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64)
        except (TypeError, ValueError):
            problems.append(f"{key!r} is not numeric ({type(value).__name__})")
            continue
        if array.shape != shape:
            problems.append(f"{key!r} has shape {tuple(array.shape)}, expected {shape}")
        elif not np.all(np.isfinite(array)):
            problems.append(f"{key!r} has NaN/inf values")
    if not problems:
        K = np.asarray(lookup(frame, "opencv.K"), dtype=np.float64)[0]
        if not (K[0, 0] > 0 and K[1, 1] > 0):
            problems.append(f"'opencv.K' has non-positive focal lengths fx={K[0, 0]:g}, fy={K[1, 1]:g}")
        R = np.asarray(lookup(frame, "opencv.R"), dtype=np.float64)[0]
        if abs(np.linalg.det(R) - 1.0) > 1e-3 or np.abs(R @ R.T - np.eye(3)).max() > 1e-3:
            problems.append("'opencv.R' is not a rotation matrix (RRᵀ ≠ I or det ≠ 1)")
        h, w = (int(v) for v in np.asarray(lookup(frame, "img_size")).reshape(-1))
        if h <= 0 or w <= 0:
            problems.append(f"'img_size' {[h, w]} is not a positive [h, w]")
    return problems


def _check_tracker(report: ValidationReport, checkpoint: Path, numbers: list[int], offset: int, trust: bool,
                   progress: bool) -> tuple[dict[int, Path], dict[int, tuple[int, int]]]:
    from tqdm import tqdm

    if not checkpoint.is_dir():
        report.error(checkpoint, "no such folder (tracker files go in <tracker_root>/<id>/checkpoint/00000.frame …)")
        return {}, {}
    tracker = _numbered(checkpoint, _FRAME_FILE)
    if not tracker:
        report.error(checkpoint, "no tracker files named NNNNN.frame")
        return {}, {}
    report.stats["tracker files"] = f"{len(tracker)} ({frame_range(tracker)}), image k ↔ tracker k-{offset}"
    unpaired_images = [k for k in numbers if (k - offset) not in tracker]
    for k in unpaired_images[:MAX_LISTED]:
        report.error(checkpoint / f"{k - offset:05d}.frame", f"missing: image {k:05d}.jpg has no tracker file")
    if len(unpaired_images) > MAX_LISTED:
        report.error(checkpoint, f"{len(unpaired_images) - MAX_LISTED} more images without a tracker file")
    image_set = set(numbers)
    unpaired_tracker = [t for t in tracker if (t + offset) not in image_set]
    if unpaired_tracker:
        report.warning(checkpoint, f"{len(unpaired_tracker)} tracker file(s) have no image and are ignored "
                                   f"({_listed([tracker[t].name for t in unpaired_tracker])})")

    sizes: dict[int, tuple[int, int]] = {}
    bad = 0
    for t, path in tqdm(tracker.items(), desc="tracker", unit="frame", disable=not progress, leave=False):
        if (t + offset) not in image_set:
            continue
        try:
            frame = load_tracker_file(path, trust=trust)
        except Exception as exc:  # unpickling can raise nearly anything
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
                message = ("holds objects other than numpy arrays; re-run with --trust-tracker-files if you trust "
                           "this file")
            bad += 1
            if bad <= MAX_LISTED:
                report.error(path, f"unreadable tracker file ({message})")
            continue
        problems = check_tracker_frame(frame)
        if problems:
            bad += 1
            if bad <= MAX_LISTED:
                report.error(path, "; ".join(problems))
            continue
        h, w = (int(v) for v in np.asarray(lookup(frame, "img_size")).reshape(-1))
        sizes[t] = (h, w)
    if bad > MAX_LISTED:
        report.error(checkpoint, f"{bad - MAX_LISTED} more tracker files with problems")
    return tracker, sizes


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="flashavatar validate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
