"""``flashavatar validate DATA_ROOT [TRACKER_ROOT] --id NAME``: check a subject before training.

Reports frame counts, numbering gaps, image/tracker pairing gaps, image sizes, mask and alpha coverage and
the tracker files' keys and shapes, each problem naming the exact file. Problems that would make training
fail (a missing or unreadable file, a size mismatch, a missing tracker key, too few frames for the split)
are *errors* and give exit code 1; suspicious but trainable data (an empty head mask, images without a
tracker file, which training ignores) are *warnings*.

It follows the reader (:class:`flashavatar.data.FlashAvatarDataset`): training enumerates the tracker files,
and tracker file ``k`` needs image ``k + offset`` (``imgs/NNNNN.jpg``, ``.png`` or ``.jpeg``), its alpha and
both masks, all exactly ``img_size``; every tracker file must have the same ``img_size``; the last
``--test-frames`` tracker frames are the test split. Tracker files are checked by the reader's own
:func:`flashavatar.data.load_tracker_frame`, plus a few sanity checks of the camera.

Tracker ``.frame`` files are pickles. Each is first opened with ``torch.load(weights_only=True)`` allowing
only numpy arrays and scalars (which covers metrical-tracker's files and runs no code from them); only when
that succeeds is it handed to the reader. A file that needs more is reported, and ``--trust-tracker-files``
skips the restricted load (only for files you trust).
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

_FRAME_FILE = re.compile(r"^(\d+)\.frame$")
_IMAGE_FILE = re.compile(r"^(\d{5})\.(jpg|png|jpeg)$")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")  # what the reader accepts for imgs/ and alpha/
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
                        help="tracker root holding <id>/checkpoint/*.frame (default, as in training: "
                             "DATA_ROOT/tracker when it holds <id>, else DATA_ROOT when <id>/checkpoint is there)")
    parser.add_argument("--images-only", action="store_true", help="do not look for tracker files")
    parser.add_argument("--id", required=True, help="subject name")
    parser.add_argument("--offset", type=int, default=1,
                        help="image number - tracker number of a pair (default 1: 00000.frame ↔ 00001.jpg)")
    parser.add_argument("--test-frames", type=int, default=500,
                        help="the last this-many frames are the test split (default 500)")
    parser.add_argument("--max-train", type=int, default=10000,
                        help="at most this many training frames (default 10000)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="expected image size (default: the first frame's, or the tracker's img_size)")
    parser.add_argument("--quick", action="store_true",
                        help="read image headers only (faster; truncated images and mask coverage are not checked)")
    parser.add_argument("--trust-tracker-files", action="store_true",
                        help="load tracker files with full unpickling (runs code in them: only for files you trust)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tracker_root = None if args.images_only else (args.tracker_root or default_tracker_root(args.data_root, args.id))
    if tracker_root is None and not args.images_only:
        print(f"no tracker folder given or found ({Path(args.data_root) / 'tracker' / args.id / 'checkpoint'}, "
              f"{Path(args.data_root) / args.id / 'checkpoint'}): checking images only")
    report = validate_subject(args.data_root, tracker_root, args.id, offset=args.offset,
                              test_frames=args.test_frames, max_train=args.max_train,
                              expected_size=tuple(args.size) if args.size else None, decode=not args.quick,
                              trust_tracker_files=args.trust_tracker_files, progress=not args.quiet)
    print(report.format())
    return 0 if report.ok else 1


def default_tracker_root(data_root, subject: str) -> Path | None:
    """Where training looks for tracker files when none is configured: ``<data_root>/tracker`` when it holds
    the subject, else ``<data_root>``; None when neither has ``<subject>/checkpoint``."""
    for root in (Path(data_root) / "tracker", Path(data_root)):
        if (root / subject / "checkpoint").is_dir():
            return root
    return None


# ----------------------------------------------------------------------------------------------------------


def validate_subject(data_root, tracker_root, subject: str, *, offset: int = 1, test_frames: int = 500,
                     max_train: int = 10000, expected_size: tuple[int, int] | None = None, decode: bool = True,
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
    images = _images(report, imgs)
    if images:
        report.stats["frames"] = f"{len(images)} ({frame_range(images)})"

    sizes: dict[int, tuple[int, int]] = {}  # image number -> the size training will demand
    if tracker_root is None:
        if not images:
            report.error(imgs, "no frames named NNNNN.jpg")
            return report
        numbers = sorted(images)
        expected = [k for k in range(1, numbers[-1] + 1) if k not in images]
        for k in expected[:MAX_LISTED]:
            report.error(imgs / f"{k:05d}.jpg", "missing (gap in the frame numbering)")
        if len(expected) > MAX_LISTED:
            report.error(imgs, f"{len(expected) - MAX_LISTED} more frames missing in the numbering "
                               f"({frame_range(expected[MAX_LISTED:])})")
        n_frames = len(numbers)
    else:
        tracker = _check_tracker(report, Path(tracker_root) / subject / "checkpoint", offset, trust_tracker_files,
                                 progress)
        numbers = [t + offset for t in tracker]
        missing = [k for k in numbers if k not in images]
        for k in missing[:MAX_LISTED]:
            report.error(imgs / f"{k:05d}.jpg", f"missing: tracker file {tracker[k - offset][0].name} pairs with "
                                                "this frame")
        if len(missing) > MAX_LISTED:
            report.error(imgs, f"{len(missing) - MAX_LISTED} more frames missing for tracker files "
                               f"({frame_range(missing[MAX_LISTED:])})")
        extra = sorted(set(images) - set(numbers))
        if extra:
            report.warning(imgs, f"{len(extra)} frame(s) have no tracker file and are not used "
                                 f"({_listed([images[k].name for k in extra])})")
        numbers = [k for k in numbers if k in images]
        for t, (_, frame) in tracker.items():
            if frame is not None:
                sizes[t + offset] = (frame.height, frame.width)
        n_frames = len(tracker)
        if sizes:
            reference = "the size given" if expected_size is not None else "the other tracker files'"
            if expected_size is None:  # the size most tracker files agree on
                values, counts = np.unique(np.array(list(sizes.values())), axis=0, return_counts=True)
                expected_size = tuple(int(v) for v in values[np.argmax(counts)])
            expected_size = tuple(expected_size)
            odd = [k for k in sorted(sizes) if sizes[k] != expected_size]
            for k in odd[:MAX_LISTED]:
                report.error(tracker[k - offset][0], f"img_size {list(sizes[k])} differs from {reference} "
                                                     f"{list(expected_size)} (all frames must share one size)")
            if len(odd) > MAX_LISTED:
                report.error(tracker[odd[0] - offset][0].parent, f"{len(odd) - MAX_LISTED} more tracker files "
                                                                 "with another img_size")

    _check_images(report, folder, {k: images[k] for k in numbers}, expected_size, sizes, decode, progress)

    n_train = min(max_train, n_frames - test_frames)
    report.stats["split"] = f"{max(n_train, 0)} train / {min(test_frames, n_frames)} test (the last {test_frames})"
    if n_train <= 0:
        report.error(folder, f"only {n_frames} frame(s) but the test split takes the last {test_frames}: no "
                             "training frames (use more frames or a smaller test split, --test-frames)")
    return report


def frame_range(numbers: Iterable[int]) -> str:
    numbers = sorted(numbers)
    return f"{numbers[0]:05d}…{numbers[-1]:05d}" if len(numbers) > 1 else f"{numbers[0]:05d}"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:MAX_LISTED]) + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _images(report: ValidationReport, imgs: Path) -> dict[int, Path]:
    """Frame number -> image in ``imgs`` (NNNNN.jpg/.png/.jpeg; the reader takes the last of those present)."""
    found: dict[int, list[Path]] = {}
    others = []
    for path in sorted(imgs.iterdir()):
        match = _IMAGE_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(1)), []).append(path)
        elif path.is_file() and not path.name.startswith("."):
            others.append(path.name)
    if others:
        report.warning(imgs, f"{len(others)} file(s) not named NNNNN.jpg are ignored ({_listed(others)})")
    doubles = [paths for paths in found.values() if len(paths) > 1]
    if doubles:
        report.warning(imgs, f"{len(doubles)} frame(s) exist in several formats, e.g. "
                             f"{', '.join(p.name for p in doubles[0])}: make sure they agree")
    return {k: _pick(paths) for k, paths in sorted(found.items())}


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    found = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _pick(paths: list[Path]) -> Path:
    return max(paths, key=lambda p: IMAGE_EXTENSIONS.index(p.suffix))


def _companion(folder: Path, name: str) -> Path:
    """``folder/name.jpg`` (or .png/.jpeg when that exists), as the reader resolves alpha files."""
    present = [folder / f"{name}{ext}" for ext in IMAGE_EXTENSIONS if (folder / f"{name}{ext}").is_file()]
    return _pick(present) if present else folder / f"{name}.jpg"


# ----------------------------------------------------------------------------------------------------------
# images, masks, alpha


def _check_images(report: ValidationReport, folder: Path, frames: dict[int, Path], expected_size,
                  sizes: dict[int, tuple[int, int]], decode: bool, progress: bool) -> None:
    from tqdm import tqdm

    missing: dict[str, list[Path]] = {"alpha": [], "neckhead mask": [], "mouth mask": []}
    head_cover, mouth_cover, alpha_cover = [], [], []
    empty_heads: list[Path] = []
    size_errors = 0
    for k, image_path in tqdm(frames.items(), desc="images", unit="frame", disable=not progress, leave=False):
        companions = {"alpha": _companion(folder / "alpha", f"{k:05d}"),
                      "neckhead mask": folder / "parsing" / f"{k:05d}_neckhead.png",
                      "mouth mask": folder / "parsing" / f"{k:05d}_mouth.png"}
        size = _image_size(report, image_path, decode)
        if size is None:
            continue
        if expected_size is None:
            expected_size = size
            report.stats["image size"] = f"{size[0]}x{size[1]} (h x w, from {image_path.name})"
        want = sizes.get(k, expected_size)
        if size != tuple(want):
            size_errors += 1
            if size_errors <= MAX_LISTED:
                source = "its tracker file's img_size" if k in sizes else "the other frames"
                report.error(image_path, f"size {size[0]}x{size[1]} (h x w) but {source} says {want[0]}x{want[1]}")
        for kind, path in companions.items():
            if not path.exists():
                missing[kind].append(path)
                continue
            array = _read_grey(report, path, tuple(want), decode)
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
                report.error(path, f"size {image.size[1]}x{image.size[0]} (h x w) but its frame must be "
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


class UntrustedTrackerFile(ValueError):
    """A tracker file holding more than numpy arrays/scalars (loading it fully could run code)."""


def load_tracker_dict(path: str | Path) -> dict:
    """A ``.frame`` file opened with only numpy arrays/scalars allowed (no code in the file can run).

    :class:`UntrustedTrackerFile` naming the file when it holds anything else.
    """
    import pickle

    import torch

    from flashavatar.data.video import numpy_safe_globals

    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("Unsupported global:")[-1].split("\n")[0].strip() if "Unsupported global" in str(exc) else ""
        raise UntrustedTrackerFile(f"{path}: holds objects other than numpy arrays{f' ({detail})' if detail else ''}; "
                                   "pass --trust-tracker-files if you trust this file") from None


def read_tracker_file(path: str | Path, *, trust: bool = False, n_shape: int = 300, n_expr: int = 100):
    """One tracker file through the reader (:func:`flashavatar.data.load_tracker_frame`, whose errors name the
    file), after a restricted load proved it holds only numpy data, unless ``trust``. -> ``TrackerFrame``."""
    from flashavatar.data import load_tracker_frame

    if not trust:
        load_tracker_dict(path)
    return load_tracker_frame(path, n_shape=n_shape, n_expr=n_expr)


def camera_problems(frame) -> list[str]:
    """Sanity checks the reader does not make: positive focal lengths, an orthonormal rotation."""
    problems = []
    K, R = np.asarray(frame.K, dtype=np.float64), np.asarray(frame.R, dtype=np.float64)
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        problems.append(f"'opencv.K' has non-positive focal lengths fx={K[0, 0]:g}, fy={K[1, 1]:g}")
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3:
        problems.append("'opencv.R' is not a rotation matrix (R Rᵀ ≠ I)")
    return problems


def _has_key(d: dict, dotted: str) -> bool:
    if dotted in d:
        return True
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_tracker(report: ValidationReport, checkpoint: Path, offset: int, trust: bool, progress: bool
                   ) -> dict[int, tuple[Path, object]]:
    """tracker number -> (path, TrackerFrame or None when it is broken); problems go to ``report``."""
    from tqdm import tqdm

    if not checkpoint.is_dir():
        report.error(checkpoint, "no such folder (tracker files go in <tracker_root>/<id>/checkpoint/00000.frame …)")
        return {}
    found = _numbered(checkpoint, _FRAME_FILE)
    if not found:
        report.error(checkpoint, "no tracker files named NNNNN.frame")
        return {}
    others = sorted(p.name for p in checkpoint.glob("*.frame") if not _FRAME_FILE.match(p.name))
    if others:  # the reader refuses these
        report.error(checkpoint, f"tracker file names must be zero-padded integers: {_listed(others)}")
    report.stats["tracker files"] = f"{len(found)} ({frame_range(found)}), image k ↔ tracker k-{offset}"
    gaps = sorted(set(range(min(found), max(found) + 1)) - set(found))
    if gaps:
        report.warning(checkpoint, f"{len(gaps)} gap(s) in the tracker numbering ({_listed([f'{g:05d}.frame' for g in gaps])}):"
                                   " the temporal regulariser pairs only consecutive frames")

    tracker: dict[int, tuple[Path, object]] = {}
    bad = no_eyelids = 0
    for t, path in tqdm(found.items(), desc="tracker", unit="frame", disable=not progress, leave=False):
        frame = None
        try:
            if not trust:
                raw = load_tracker_dict(path)
                no_eyelids += isinstance(raw, dict) and not _has_key(raw, "flame.eyelids")
            frame = read_tracker_file(path, trust=True)
            problems = camera_problems(frame)
            if problems:
                frame = None
                raise ValueError(f"{path}: {'; '.join(problems)}")
        except (ValueError, FileNotFoundError) as exc:
            bad += 1
            if bad <= MAX_LISTED:
                message = str(exc)
                report.error(path, message.split(f"{path}: ", 1)[-1])
        except Exception as exc:  # unpickling can raise nearly anything
            bad += 1
            if bad <= MAX_LISTED:
                report.error(path, f"unreadable tracker file ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        tracker[t] = (path, frame)
    if bad > MAX_LISTED:
        report.error(checkpoint, f"{bad - MAX_LISTED} more tracker files with problems")
    if no_eyelids:
        report.warning(checkpoint, f"{no_eyelids} tracker file(s) have no flame.eyelids (zeros are used)")
    return tracker


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="flashavatar validate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
