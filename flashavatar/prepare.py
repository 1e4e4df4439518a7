"""``flashavatar prepare``: a raw video (+ face-parsing labels, matting) -> the dataset folder of SPEC §1.

Stages, each resumable (a file that already exists is kept unless ``--overwrite``), each optional:

1. **frames** (when VIDEO is given): decode, keep ``--start``..``--end`` seconds thinned to ``--fps``, crop
   with one box for the whole video, resize to ``--size``², write ``<out>/<id>/imgs/00001.jpg`` … (1-based).
   The box comes from ``--box``, from a metrical-tracker ``bbox.pt`` (``--tracker-bbox``), or automatically
   from the first frames (a skin-colour heuristic, moved inside the frame where it fits, falling back to
   the centred square; see :mod:`flashavatar.data.video`). The choices are recorded in
   ``<out>/<id>/prepare.json``; a resumed run with different choices is refused (``--overwrite`` redoes).
   ``--alpha-video`` (a matte of VIDEO itself) is cropped the same way into ``alpha/``.
2. **labels** (``--parsing-weights``): run the BiSeNet face parser on the frames and keep its label maps in
   ``<id>/labels/00001.png`` (class indices, CelebAMask-HQ order).
3. **masks**: from label maps (``--labels-dir``, or ``<id>/labels`` when it exists) write
   ``parsing/00001_neckhead.png`` and ``parsing/00001_mouth.png``.
4. **alpha**: from matting outputs (``--alpha-dir``, any common image format), else — documented fallback —
   the parsing foreground (every class except background), written as ``alpha/00001.jpg``.
5. **check** (``--check [TRACKER_ROOT]``): :mod:`flashavatar.validate` on the result.

Files in ``--labels-dir``/``--alpha-dir`` are matched to frames by the last number in their name; the file
numbered ``--labels-first``/``--alpha-first`` (default: the smallest number present) is frame 1.

FLAME tracking is not part of this command (it needs licensed models). The tracker's intrinsics must
describe *these* frames: either run metrical-tracker on ``imgs/`` with its own cropping off, or let it crop
the raw video and pass its ``bbox.pt`` here as ``--tracker-bbox`` so both crops agree. ``flashavatar
validate`` then checks that sizes and pairing line up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from flashavatar.data import masks as M
from flashavatar.io_utils import atomic_write_text
from flashavatar.data import video as V

log = logging.getLogger("flashavatar.prepare")

MANIFEST = "prepare.json"


class PrepareError(RuntimeError):
    """A problem with the inputs that stops ``prepare`` (the message says which file or option)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", nargs="?", default=None,
                        help="input video (any format ffmpeg reads); leave out to only (re)make masks/alpha "
                             "for frames already in <out>/<id>/imgs")
    parser.add_argument("--id", required=True, help="subject name: files go to <out>/<id>/")
    parser.add_argument("--out", required=True, type=Path, help="data root (the folder holding <id>/)")
    g = parser.add_argument_group(
        "frames", "One crop box for the whole video. Without --box, --tracker-bbox or --centre-box it is found "
        "automatically: the largest skin-coloured region in the first frames (YCbCr skin window; no detector "
        "weights needed), cut at the neck, scaled by --box-scale; the centred square if no skin is found.")
    g.add_argument("--size", type=int, default=512, help="output frames are SIZE×SIZE (default 512)")
    g.add_argument("--fps", type=float, default=None, help="keep at most this many frames per second "
                   "(default: every frame)")
    g.add_argument("--start", type=float, default=0.0, help="first second of the video to use (default 0)")
    g.add_argument("--end", type=float, default=None, help="stop at this second (default: the end)")
    g.add_argument("--max-frames", type=int, default=None, help="write at most this many frames")
    g.add_argument("--quality", type=int, default=95, help="JPG quality of the frames (default 95)")
    box = g.add_mutually_exclusive_group()
    box.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1",
                     help="crop box in source pixels (made square around its centre, the same for every frame)")
    box.add_argument("--tracker-bbox", type=Path, default=None, metavar="BBOX_PT",
                     help="metrical-tracker's bbox.pt ([x_min, x_max, y_min, y_max]); crops like the tracker "
                          "does, so frames match its intrinsics")
    box.add_argument("--centre-box", action="store_true",
                     help="crop the largest centred square (no face search)")
    g.add_argument("--box-scale", type=float, default=1.8,
                   help="automatic box: square side = this × the face's size (default 1.8)")
    g.add_argument("--box-frames", type=int, default=10,
                   help="automatic box: number of first kept frames to look at (default 10)")
    g = parser.add_argument_group("masks and alpha")
    g.add_argument("--parsing-weights", type=Path, default=None, metavar="PTH",
                   help="BiSeNet/ResNet-18 CelebAMask-HQ face-parsing checkpoint (never downloaded); its label "
                        "maps go to <id>/labels/")
    g.add_argument("--device", default="cpu", help="device for the face parser (default cpu)")
    g.add_argument("--batch-size", type=int, default=8, help="face-parser batch size (default 8)")
    g.add_argument("--labels-dir", type=Path, default=None,
                   help="existing label maps (class index per pixel, CelebAMask-HQ order); default <id>/labels "
                        "when it exists")
    g.add_argument("--labels-first", type=int, default=None,
                   help="number of the label file that is frame 1 (default: the smallest number present)")
    g.add_argument("--neckhead-labels", default="all,-background,-cloth",
                   help="classes of the head+neck mask, names or indices (default: all,-background,-cloth)")
    g.add_argument("--mouth-labels", default="mouth",
                   help="classes of the inner-mouth mask (default: mouth = class 11)")
    g.add_argument("--alpha-dir", type=Path, default=None,
                   help="matting outputs (alpha mattes, any common image format, same framing as the frames)")
    g.add_argument("--alpha-video", type=Path, default=None,
                   help="matting result of VIDEO itself (same size and frame count): cropped like the frames")
    g.add_argument("--alpha-first", type=int, default=None,
                   help="number of the alpha file that is frame 1 (default: the smallest number present)")
    g.add_argument("--alpha-feather", type=float, default=0.0,
                   help="fallback alpha from parsing: blur its edge by this std-dev in pixels (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite files that exist (default: keep them and resume)")
    parser.add_argument("--check", nargs="?", const="", default=None, metavar="TRACKER_ROOT",
                        help="validate the result afterwards (with the tracker folder: given, or found as in training)")
    parser.add_argument("--test-frames", type=int, default=500,
                        help="--check: the last this-many frames are the test split (default 500)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        subject = Path(args.out) / args.id
        if args.alpha_video is not None and (args.video is None or args.alpha_dir is not None):
            raise PrepareError("--alpha-video needs VIDEO and excludes --alpha-dir")
        if args.video is not None:
            prepare_frames(args.video, subject, size=args.size, fps=args.fps, start=args.start, end=args.end,
                           max_frames=args.max_frames, box=args.box, tracker_bbox=args.tracker_bbox,
                           centre=args.centre_box, box_scale=args.box_scale, box_frames=args.box_frames,
                           quality=args.quality, alpha_video=args.alpha_video, overwrite=args.overwrite,
                           progress=not args.quiet)
        elif not (subject / "imgs").is_dir():
            raise PrepareError(f"no VIDEO given and {subject / 'imgs'} does not exist: nothing to work on")
        labels_dir = args.labels_dir
        if args.parsing_weights is not None:
            if labels_dir is not None:
                raise PrepareError("give either --parsing-weights or --labels-dir, not both")
            labels_dir = subject / "labels"
            run_face_parser(subject, args.parsing_weights, device=args.device, batch_size=args.batch_size,
                            overwrite=args.overwrite, progress=not args.quiet)
        elif labels_dir is None and (subject / "labels").is_dir():
            labels_dir = subject / "labels"
        neckhead = M.parse_label_set(args.neckhead_labels, option="neckhead-labels")
        mouth = M.parse_label_set(args.mouth_labels, option="mouth-labels")
        write_masks_and_alpha(subject, labels_dir=labels_dir, labels_first=args.labels_first,
                              alpha_dir=args.alpha_dir, alpha_first=args.alpha_first,
                              neckhead_labels=neckhead, mouth_labels=mouth, alpha_feather=args.alpha_feather,
                              parsing_alpha=args.alpha_video is None, overwrite=args.overwrite,
                              progress=not args.quiet)
    except (PrepareError, V.VideoError, ValueError, FileNotFoundError) as exc:
        print(f"flashavatar prepare: error: {exc}", file=sys.stderr)
        return 2
    if args.check is not None:
        from flashavatar import validate

        tracker_root = args.check or validate.default_tracker_root(args.out, args.id)
        report = validate.validate_subject(args.out, tracker_root, args.id, test_frames=args.test_frames,
                                           progress=not args.quiet)
        print(report.format())
        return 0 if report.ok else 1
    return 0


# ----------------------------------------------------------------------------------------------------------
# stage 1: frames


def frame_name(index: int) -> str:
    """1-based frame number -> ``00001.jpg``."""
    return f"{index:05d}.jpg"


def prepare_frames(video: str | os.PathLike, subject: str | os.PathLike, *, size: int = 512,
                   fps: float | None = None, start: float = 0.0, end: float | None = None,
                   max_frames: int | None = None, box: str | tuple[int, int, int, int] | None = None,
                   tracker_bbox: str | os.PathLike | None = None, centre: bool = False, box_scale: float = 1.8,
                   box_frames: int = 10, quality: int = 95, alpha_video: str | os.PathLike | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Decode ``video`` and write ``subject/imgs/00001.jpg`` … ; returns the manifest (also written to
    ``subject/prepare.json``) with ``box``, ``frames`` (count), ``written``, ``skipped`` and
    ``source_frames`` (the 0-based source frame index of each output frame).

    ``alpha_video``: a matting result of the same video (same size and frame count, e.g. a matting network's
    alpha output run on ``video``); its frames get the same selection and crop and go to ``alpha/``.
    """
    if size < 16:
        raise ValueError(f"--size must be at least 16, got {size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {max_frames}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    subject = Path(subject)
    info = V.probe_video(video)
    V.select_frames(info.fps, target_fps=fps, start=start, end=end)  # validates the range options early
    if info.duration is not None and start >= info.duration:
        raise PrepareError(f"--start {start} s is past the end of {video} ({info.duration:.2f} s)")

    alpha_info = V.probe_video(alpha_video) if alpha_video is not None else None
    if alpha_info is not None and (alpha_info.width, alpha_info.height) != (info.width, info.height):
        raise PrepareError(f"--alpha-video {alpha_video}: {alpha_info.width}x{alpha_info.height} but {video} is "
                           f"{info.width}x{info.height}; the matte must be computed on the same video")
    if alpha_info is not None and abs(alpha_info.fps - info.fps) > 0.01 * info.fps:
        log.warning("prepare: --alpha-video %s runs at %.3f fps, the video at %.3f fps; frames are paired by "
                    "index", alpha_video, alpha_info.fps, info.fps)
    settings = {"video": str(Path(video).resolve()), "size": size, "fps": fps, "start": start, "end": end,
                "max_frames": max_frames}
    manifest_path = subject / MANIFEST
    previous = _read_manifest(manifest_path)
    if previous is None and not overwrite and any((subject / "imgs").glob("[0-9]*.jpg")):
        raise PrepareError(f"{subject / 'imgs'} already holds frames that prepare did not make (no {MANIFEST}); "
                           "pass --overwrite to replace them, or use another --id")

    crop = _choose_box(video, info, settings, previous, box=box, tracker_bbox=tracker_bbox, centre=centre,
                       box_scale=box_scale, box_frames=box_frames, overwrite=overwrite)
    log.info("prepare: %s (%dx%d, %.3f fps) -> %s, crop box %s (%s), %d×%d", video, info.width, info.height,
             info.fps, subject / "imgs", crop.as_tuple(), crop.source, size, size)

    imgs = subject / "imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    selector = V.select_frames(info.fps, target_fps=fps, start=start, end=end)
    total = _expected_count(info, fps, start, end, max_frames)
    bar = _progress(total, "frames", progress)
    out_index = written = skipped = 0
    source_frames: list[int] = []
    frames = V.iter_frames(video)
    mattes = V.iter_frames(alpha_video) if alpha_video is not None else None
    try:
        for src_index, frame in enumerate(frames):
            matte = next(mattes, None) if mattes is not None else None
            if mattes is not None and matte is None:
                raise PrepareError(f"--alpha-video {alpha_video}: ends after {src_index} frames but {video} has more")
            if selector.past_end(src_index) or (max_frames is not None and out_index >= max_frames):
                break
            if not selector.keep(src_index):
                continue
            out_index += 1
            source_frames.append(src_index)
            path = imgs / frame_name(out_index)
            if path.exists() and not overwrite:
                skipped += 1
            else:
                M.write_jpg(path, V.crop_square(frame, crop, size), quality=quality)
                written += 1
            alpha_path = subject / "alpha" / frame_name(out_index)
            if matte is not None and (overwrite or not alpha_path.exists()):
                M.write_jpg(alpha_path, V.crop_square(_grey(matte), crop, size), quality=quality)
            bar.update(1)
    finally:
        frames.close()
        if mattes is not None:
            mattes.close()
    bar.close()
    if out_index == 0:
        raise PrepareError(f"{video}: no frames between {start} s and {end if end is not None else 'the end'}")
    stale = sorted(p.name for p in imgs.glob("*.jpg") if p.stem.isdigit() and int(p.stem) > out_index)
    if stale:
        log.warning("prepare: %s holds %d frame(s) past the %d of this video (%s…) from an earlier run; "
                    "delete them or they will be read as part of the sequence", imgs, len(stale), out_index,
                    stale[0])
    manifest = {**settings, "box": list(crop.as_tuple()), "box_mode": crop.mode, "box_source": crop.source,
                "source_fps": info.fps, "source_size": [info.width, info.height], "frames": out_index,
                "source_frames": source_frames}
    _write_json(manifest_path, manifest)
    log.info("prepare: %d frames (%d written, %d kept from an earlier run)", out_index, written, skipped)
    return {**manifest, "written": written, "skipped": skipped}


def _grey(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3] uint8`` -> ``[H, W] uint8`` luminance (a grey matte stored in a colour video)."""
    return np.clip(np.round(rgb[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])), 0, 255
                   ).astype(np.uint8)


def _first_frame(video) -> np.ndarray:
    frames = V.iter_frames(video)
    try:
        frame = next(frames, None)
    finally:
        frames.close()
    if frame is None:
        raise PrepareError(f"{video}: the video has no frames")
    return frame


def _choose_box(video, info: V.VideoInfo, settings: dict, previous: dict | None, *, box, tracker_bbox, centre,
                box_scale: float, box_frames: int, overwrite: bool) -> V.CropBox:
    if box is not None:
        values = V.parse_box(box) if isinstance(box, str) else tuple(int(v) for v in box)
        crop = V.square_box(*values, source="user")
    elif tracker_bbox is not None:
        crop = V.load_tracker_bbox(tracker_bbox)
    elif centre:  # from a decoded frame: ffmpeg applies the rotation flag, the metadata size does not
        h, w = _first_frame(video).shape[:2]
        crop = V.centre_box(w, h)
    else:
        crop = None
    if previous is not None and not overwrite:
        changed = [k for k, v in settings.items() if previous.get(k) != v]
        if crop is not None and (previous.get("box") != list(crop.as_tuple()) or previous.get("box_mode") != crop.mode):
            changed.append("box")
        if changed:
            raise PrepareError(f"{settings['video']}: the frames in this folder were made with different "
                               f"{', '.join(changed)} (see {MANIFEST}); pass --overwrite to redo them")
        if crop is None:  # resume with the automatic box found the first time
            x0, y0, x1, y1 = previous["box"]
            return V.CropBox(x0, y0, x1, y1, mode=previous.get("box_mode", "square"),
                             source=previous.get("box_source", "auto"))
    if crop is not None:
        return crop
    selector = V.select_frames(info.fps, target_fps=settings["fps"], start=settings["start"], end=settings["end"])
    first: list[np.ndarray] = []
    frames = V.iter_frames(video)
    try:
        for index, frame in enumerate(frames):
            if len(first) >= max(1, box_frames) or selector.past_end(index):
                break
            if selector.keep(index):
                first.append(frame)
    finally:
        frames.close()
    crop = V.skin_box(first, scale=box_scale) if first else None
    if crop is not None:  # no black borders where the head sits near the frame's edge
        crop = V.shift_inside(crop, first[0].shape[1], first[0].shape[0])
    if crop is None:
        log.warning("prepare: no face-sized skin region in the first frames; using the centred square "
                    "(pass --box or --tracker-bbox to choose)")
        h, w = (first[0] if first else _first_frame(video)).shape[:2]
        crop = V.centre_box(w, h)
    return crop


def _expected_count(info: V.VideoInfo, fps, start, end, max_frames) -> int | None:
    if info.duration is None and end is None:
        return max_frames
    stop = min(x for x in (info.duration, end) if x is not None)
    rate = info.fps if fps is None else min(fps, info.fps)
    count = max(0, int(math.ceil((stop - start) * rate - 1e-6)))
    return count if max_frames is None else min(count, max_frames)


# ----------------------------------------------------------------------------------------------------------
# stage 2: face parser


def run_face_parser(subject: str | os.PathLike, weights: str | os.PathLike, *, device: str = "cpu",
                    batch_size: int = 8, input_size: int = 512, overwrite: bool = False,
                    progress: bool = True) -> int:
    """Label maps for every frame in ``subject/imgs`` -> ``subject/labels/NNNNN.png``; returns how many were
    computed (frames that already have one are skipped unless ``overwrite``)."""
    from flashavatar.data.face_parsing import load_face_parser, parse_faces

    subject = Path(subject)
    frames = _frames(subject)
    todo = [(k, p) for k, p in frames.items()
            if overwrite or not (subject / "labels" / f"{k:05d}.png").exists()]
    if not todo:
        return 0
    net = load_face_parser(weights, device=device)
    bar = _progress(len(todo), "face parsing", progress)
    for i in range(0, len(todo), max(1, batch_size)):
        chunk = todo[i:i + max(1, batch_size)]
        images = np.stack([_read_rgb(p) for _, p in chunk])
        for (k, _), labels in zip(chunk, parse_faces(net, images, input_size=input_size)):
            M.write_png(subject / "labels" / f"{k:05d}.png", labels)
        bar.update(len(chunk))
    bar.close()
    return len(todo)


# ----------------------------------------------------------------------------------------------------------
# stages 3–4: masks and alpha


def write_masks_and_alpha(subject: str | os.PathLike, *, labels_dir: str | os.PathLike | None = None,
                          labels_first: int | None = None, alpha_dir: str | os.PathLike | None = None,
                          alpha_first: int | None = None, neckhead_labels=M.NECKHEAD_LABELS,
                          mouth_labels=M.MOUTH_LABELS, alpha_feather: float = 0.0, parsing_alpha: bool = True,
                          overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``parsing/NNNNN_{neckhead,mouth}.png`` and ``alpha/NNNNN.jpg`` for every frame in ``imgs/``.

    Returns counts ``{"masks": written, "alpha": written, "alpha_source": "matting"|"parsing"|None}``.
    ``parsing_alpha=False`` turns the parsing-foreground fallback off (alpha comes from elsewhere).
    Every frame needs its label map (and its matte when ``alpha_dir`` is given): a missing one is an error
    naming the frame and the folder.
    """
    subject = Path(subject)
    frames = _frames(subject)
    labels = _match(frames, labels_dir, labels_first, "label map", "--labels-dir") if labels_dir else None
    mattes = _match(frames, alpha_dir, alpha_first, "alpha matte", "--alpha-dir") if alpha_dir else None
    alpha_source = "matting" if mattes is not None else ("parsing" if labels is not None and parsing_alpha else None)
    if labels is None and mattes is None and parsing_alpha:
        log.warning("prepare: no label maps (--labels-dir / --parsing-weights) and no mattes (--alpha-dir): "
                    "parsing/ and alpha/ are not written, and training needs both")
        return {"masks": 0, "alpha": 0, "alpha_source": None}
    if labels is None:
        log.warning("prepare: no label maps: parsing/*_neckhead.png and *_mouth.png are not written")
    if alpha_source == "parsing":
        log.info("prepare: no --alpha-dir: alpha = parsing foreground (every class but background), a hard-edged "
                 "fallback; a matting network's output is better")

    counts = {"masks": 0, "alpha": 0, "alpha_source": alpha_source}
    bar = _progress(len(frames), "masks/alpha", progress)
    for k, image_path in frames.items():
        neck_path = subject / "parsing" / f"{k:05d}_neckhead.png"
        mouth_path = subject / "parsing" / f"{k:05d}_mouth.png"
        alpha_path = subject / "alpha" / f"{k:05d}.jpg"
        need_masks = labels is not None and (overwrite or not (neck_path.exists() and mouth_path.exists()))
        need_alpha = alpha_source is not None and (overwrite or not alpha_path.exists())
        if need_masks or need_alpha:
            with Image.open(image_path) as im:
                size = im.size  # (w, h)
            label_map = None
            if labels is not None and (need_masks or alpha_source == "parsing"):
                label_map = _fit(M.read_label_map(labels[k]), size, labels[k], nearest=True)
            if need_masks:
                neck, mouth = M.masks_from_labels(label_map, neckhead_labels=neckhead_labels,
                                                  mouth_labels=mouth_labels)
                M.write_png(neck_path, neck)
                M.write_png(mouth_path, mouth)
                counts["masks"] += 1
            if need_alpha:
                if alpha_source == "matting":
                    alpha = _fit(M.read_alpha(mattes[k]), size, mattes[k], nearest=False)
                else:
                    alpha = M.alpha_from_labels(label_map, feather=alpha_feather)
                M.write_jpg(alpha_path, alpha)
                counts["alpha"] += 1
        bar.update(1)
    bar.close()
    log.info("prepare: masks written for %d frames, alpha for %d (%s)", counts["masks"], counts["alpha"],
             alpha_source)
    return counts


def _frames(subject: Path) -> dict[int, Path]:
    imgs = subject / "imgs"
    frames = {int(p.stem): p for p in sorted(imgs.glob("*.jpg")) if p.stem.isdigit()} if imgs.is_dir() else {}
    if not frames:
        raise PrepareError(f"{imgs}: no frames (NNNNN.jpg); run prepare with a VIDEO first")
    return dict(sorted(frames.items()))


def _match(frames: dict[int, Path], folder, first: int | None, what: str, option: str) -> dict[int, Path]:
    """Frame number -> file in ``folder``, by the number in the file name, shifted so ``first`` is frame 1."""
    found = M.numbered_images(folder, what=what)
    if not found:
        raise PrepareError(f"{option} {folder}: no images in it")
    shift = (min(found) if first is None else first) - 1
    matched: dict[int, Path] = {}
    missing = []
    for k in frames:
        path = found.get(k + shift)
        if path is None:
            missing.append(k)
        else:
            matched[k] = path
    if missing:
        raise PrepareError(f"{option} {folder}: no {what} for frame {frame_name(missing[0])} (file number "
                           f"{missing[0] + shift}; {len(missing)} of {len(frames)} frames have none; numbers "
                           f"found {min(found)}..{max(found)}, frame 1 = {shift + 1})")
    return matched


def _fit(array: np.ndarray, size: tuple[int, int], path: Path, *, nearest: bool) -> np.ndarray:
    """Resize a label map / matte to the frame size ``(w, h)`` when it has the same aspect ratio."""
    h, w = array.shape[:2]
    if (w, h) == tuple(size):
        return array
    if abs(w * size[1] - h * size[0]) > max(w, h):  # aspect differs by more than a pixel
        raise PrepareError(f"{path}: size {w}x{h} does not match the frames ({size[0]}x{size[1]}) and has another "
                           "aspect ratio; it must be computed on the cropped frames")
    if nearest:
        rows = np.minimum((np.arange(size[1]) + 0.5) * h / size[1], h - 1).astype(np.int64)
        cols = np.minimum((np.arange(size[0]) + 0.5) * w / size[0], w - 1).astype(np.int64)
        return array[rows][:, cols]
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR))


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------------------------------------


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, leave=False)


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{path}: unreadable ({exc}); delete it or pass --overwrite") from None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))
