"""``flashavatar inspect``: see whether tracking and deformation line up, for chosen frames.

For each chosen frame (1-based image number ``k``, tracker file ``k - offset``) it writes to ``--out``:

* ``NNNNN_mesh.obj`` — the posed FLAME mesh (world coordinates, metres; ``--mouth-faces`` adds the
  triangles that close the mouth);
* ``NNNNN_gaussians.ply`` — the avatar's Gaussian centres as a coloured point cloud (``x y z red green
  blue``; opens in MeshLab, CloudCompare, Blender). Colours: the avatar's own (SH band 0) for a trained run,
  else the frame's pixel under each projected centre (``--colour image``), or ``region`` (inner-mouth
  Gaussians red, the rest grey);
* ``NNNNN_overlay.png`` — the frame with the projected mesh drawn over it (flat-shaded, half transparent),
  so a misaligned camera, a wrong principal point or swapped ``[h, w]`` show at a glance.

Without ``--run`` the avatar is freshly initialised (its Gaussians sit on the mesh surface): that checks the
data and the tracking before training. With ``--run RUN_DIR`` (a ``flashavatar train --out`` folder) the
trained deformation is shown, and data paths default to the run's config.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from flashavatar.data import masks as M
from flashavatar.io_utils import atomic_write_text, atomic_write_with
from flashavatar.model.avatar import SH_C0

log = logging.getLogger("flashavatar.inspect")



@dataclasses.dataclass
class FrameInput:
    """One frame to inspect. ``codes``: FLAME codes, each ``[1, ...]``; ``viewmat [4, 4]`` world→camera
    (OpenCV); ``K [3, 3]`` pixels; ``image [H, W, 3] uint8`` (None: the overlay is drawn on black)."""

    number: int
    codes: dict[str, torch.Tensor]
    viewmat: torch.Tensor
    K: torch.Tensor
    image: np.ndarray | None
    size_hw: tuple[int, int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_root", type=Path, nargs="?", default=None,
                        help="data root holding <id>/imgs (default with --run: the run's)")
    parser.add_argument("tracker_root", type=Path, nargs="?", default=None,
                        help="tracker root holding <id>/checkpoint/*.frame (default: the run's, else "
                             "DATA_ROOT/tracker when it holds <id>, else DATA_ROOT)")
    parser.add_argument("--id", default=None, help="subject name (default with --run: the run's)")
    parser.add_argument("--run", type=Path, default=None, help="trained run folder (config.yaml + checkpoints/)")
    parser.add_argument("--head-model", type=Path, default=None,
                        help="FLAME generic_model.pkl or the synthetic head (default DATA_ROOT/flame/"
                             "generic_model.pkl; not needed with --run)")
    parser.add_argument("--template", type=Path, default=None,
                        help="template OBJ with UVs (default: the .obj next to the head model)")
    parser.add_argument("--frames", default=None,
                        help="image numbers, e.g. 1,250,900 or 10-20 (default: first, middle and last)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <data_root>/<id>/inspect)")
    parser.add_argument("--offset", type=int, default=None,
                        help="image number - tracker number (default 1, or the run's)")
    parser.add_argument("--uv-size", type=int, default=128, help="UV grid of a fresh avatar (default 128)")
    parser.add_argument("--colour", choices=("auto", "avatar", "image", "region"), default="auto",
                        help="point colours (default: avatar colours for a run, image colours otherwise)")
    parser.add_argument("--mouth-faces", action="store_true", help="include the mouth-closing faces in the OBJ")
    parser.add_argument("--trust-tracker-files", action="store_true",
                        help="load tracker files with full unpickling (only for files you trust)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        flame, avatar, paths = _build(args)
        numbers = parse_frames(args.frames, available_frames(paths["data_root"] / paths["id"] / "imgs"))
        frames = [load_frame(paths["data_root"], paths["tracker_root"], paths["id"], k, offset=paths["offset"],
                             trust=args.trust_tracker_files) for k in numbers]
        if avatar is None:
            avatar = fresh_avatar(flame, paths["template"], frames[0].codes["shape"], uv_size=args.uv_size)
        colour = args.colour if args.colour != "auto" else ("avatar" if args.run is not None else "image")
        out = args.out or paths["data_root"] / paths["id"] / "inspect"
        results = inspect_frames(flame, avatar, frames, out, colour=colour, mouth_faces=args.mouth_faces)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"flashavatar inspect: error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"frame {r['number']:05d}: {r['obj']} ({r['vertices']} vertices, {r['faces']} faces), "
              f"{r['ply']} ({r['points']} points), {r['overlay']}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# inputs


def _build(args) -> tuple:
    """FLAME (+ the trained avatar with --run) and the resolved data paths."""
    avatar = None
    if args.run is not None:
        try:
            from flashavatar.session import load_run
        except ImportError as exc:  # pragma: no cover - depends on the build
            raise ValueError(f"--run needs flashavatar.session ({exc})") from None
        session, _ = load_run(args.run, device="cpu", load_frames=False)
        flame, avatar = session.flame, session.avatar
        data_cfg = session.cfg.data
        data_root = args.data_root or Path(data_cfg.data_root)
        subject = args.id or data_cfg.subject
        tracker_root = args.tracker_root or (Path(data_cfg.tracker_root) if data_cfg.tracker_root
                                             else default_tracker_root(data_root, subject))
        offset = data_cfg.frame_offset if args.offset is None else args.offset
        template = None
    else:
        if args.data_root is None or args.id is None:
            raise ValueError("give DATA_ROOT [TRACKER_ROOT] --id NAME [--head-model PKL], or --run RUN_DIR")
        from flashavatar.model import FLAME

        data_root, subject = args.data_root, args.id
        head_model = args.head_model or Path(data_root) / "flame" / "generic_model.pkl"
        if not Path(head_model).is_file():
            raise FileNotFoundError(f"--head-model {head_model}: no such file (FLAME generic_model.pkl, or the "
                                    "synthetic head written by `flashavatar synth`)")
        flame = FLAME(head_model)
        tracker_root = args.tracker_root or default_tracker_root(data_root, subject)
        offset = 1 if args.offset is None else args.offset
        template = args.template or find_template(head_model)
    return flame, avatar, {"data_root": Path(data_root), "tracker_root": Path(tracker_root), "id": subject,
                           "offset": offset, "template": template}


def default_tracker_root(data_root, subject: str) -> Path:
    """``<data_root>/tracker`` when it holds the subject (the layout `flashavatar synth` writes), else the
    data root itself (the same rule as training)."""
    candidate = Path(data_root) / "tracker"
    return candidate if (candidate / subject).is_dir() else Path(data_root)


def find_template(head_model: Path) -> Path:
    """The template OBJ beside the head model (the only ``.obj`` there, or one named ``*template*.obj``)."""
    objs = sorted(Path(head_model).parent.glob("*.obj"))
    named = [p for p in objs if "template" in p.name]
    if len(named) == 1 or len(objs) == 1:
        return (named or objs)[0]
    raise FileNotFoundError(f"--template: no single template .obj beside {head_model} (found "
                            f"{[p.name for p in objs] or 'none'}); pass --template")


def available_frames(imgs: Path) -> list[int]:
    if not imgs.is_dir():
        raise FileNotFoundError(f"{imgs}: no such folder")
    numbers = sorted(int(p.stem) for p in imgs.glob("*.jpg") if p.stem.isdigit())
    if not numbers:
        raise FileNotFoundError(f"{imgs}: no frames named NNNNN.jpg")
    return numbers


def parse_frames(text: str | None, available: list[int]) -> list[int]:
    """``"1,5,10-12"`` -> [1, 5, 10, 11, 12]; None -> first, middle and last of ``available``."""
    if not text:
        return sorted({available[0], available[len(available) // 2], available[-1]})
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                chosen.extend(range(lo, hi + 1))
            else:
                chosen.append(int(part))
        except ValueError:
            raise ValueError(f"--frames: cannot read {part!r} (use e.g. 1,250,900 or 10-20)") from None
    missing = [k for k in chosen if k not in set(available)]
    if missing:
        raise ValueError(f"--frames: no image {missing[0]:05d}.jpg (frames are {available[0]:05d}…{available[-1]:05d})")
    return list(dict.fromkeys(chosen))


def load_frame(data_root, tracker_root, subject: str, number: int, *, offset: int = 1,
               trust: bool = False) -> FrameInput:
    """Image ``number`` and its tracker file as a :class:`FrameInput` (errors name the file)."""
    from flashavatar.validate import read_tracker_file

    image_path = Path(data_root) / subject / "imgs" / f"{number:05d}.jpg"
    tracker_path = Path(tracker_root) / subject / "checkpoint" / f"{number - offset:05d}.frame"
    if not tracker_path.is_file():
        raise FileNotFoundError(f"{tracker_path}: no tracker file for image {image_path.name}")
    tracker = read_tracker_file(tracker_path, trust=trust)  # the reader's checks; errors name the file
    codes = {name: torch.as_tensor(getattr(tracker, name), dtype=torch.float32)[None]
             for name in ("shape", "expr", "jaw", "eyes", "eyelids")}
    h, w = tracker.height, tracker.width
    image = None
    if image_path.is_file():
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        if image.shape[:2] != (h, w):
            raise ValueError(f"{image_path}: size {image.shape[0]}x{image.shape[1]} (h x w) but {tracker_path.name} "
                             f"says img_size {h}x{w}")
    return FrameInput(number, codes, torch.as_tensor(tracker.viewmat, dtype=torch.float32),
                      torch.as_tensor(tracker.K, dtype=torch.float32), image, (h, w))


def fresh_avatar(flame, template, shape: torch.Tensor, *, uv_size: int = 128, seed: int = 0):
    """An untrained :class:`GaussianAvatar` for ``shape`` (Gaussians on the mesh surface, up to the tiny
    offsets of the freshly initialised MLP). Built under a fixed seed so repeated runs give the same file."""
    from flashavatar.model import GaussianAvatar

    shape = shape.reshape(-1)[: flame.n_shape]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GaussianAvatar(flame, template, uv_size=uv_size, shape=shape, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# outputs


@torch.no_grad()
def inspect_frames(flame, avatar, frames: list[FrameInput], out_dir, *, colour: str = "image",
                   mouth_faces: bool = False) -> list[dict]:
    """Write the OBJ, PLY and overlay of every frame; returns per frame the paths and element counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next((b.device for b in avatar.buffers()), torch.device("cpu"))
    n_faces = flame.n_mesh_faces
    faces = flame.faces if mouth_faces else flame.faces[:n_faces]
    faces_np = faces.cpu().numpy()
    results = []
    for frame in frames:
        codes = {k: _fit_codes(k, v, flame).to(device) for k, v in frame.codes.items()}
        out = avatar(codes)
        vertices = out["vertices"][0].float().cpu()  # [V, 3]
        means = out["means"][0].float().cpu()  # [N, 3]
        stem = f"{frame.number:05d}"
        obj_path = out_dir / f"{stem}_mesh.obj"
        write_obj(obj_path, vertices.numpy(), faces_np)
        colours = point_colours(colour, avatar, frame, means)
        ply_path = out_dir / f"{stem}_gaussians.ply"
        write_point_ply(ply_path, means.numpy(), colours)
        overlay_path = out_dir / f"{stem}_overlay.png"
        M.write_png(overlay_path, draw_overlay(frame, vertices, faces_np[:n_faces]))
        results.append({"number": frame.number, "obj": obj_path, "ply": ply_path, "overlay": overlay_path,
                        "vertices": int(vertices.shape[0]), "faces": int(len(faces_np)),
                        "points": int(means.shape[0])})
    return results


def _fit_codes(name: str, value: torch.Tensor, flame) -> torch.Tensor:
    """Tracker codes may carry more components than the layer uses (300 shape / 100 expression)."""
    width = {"shape": flame.n_shape, "expr": flame.n_expr}.get(name)
    if width is not None:
        if value.shape[-1] < width:
            raise ValueError(f"tracker {name} has {value.shape[-1]} components, the FLAME layer needs {width}")
        value = value[..., :width]
    return value.float()


def project(points: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """World points ``[N, 3]`` -> (pixel coordinates ``[N, 2]`` in K's convention, depth ``[N]``)."""
    cam = points.double() @ viewmat[:3, :3].double().T + viewmat[:3, 3].double()
    uvw = cam @ K.double().T
    depth = cam[:, 2]
    pixels = uvw[:, :2] / uvw[:, 2:3].clamp_min(1e-9)
    return pixels.numpy(), depth.numpy()


def point_colours(mode: str, avatar, frame: FrameInput, means: torch.Tensor) -> np.ndarray:
    """``[N, 3] uint8`` colours of the Gaussian centres for ``mode`` avatar | image | region."""
    n = means.shape[0]
    if mode == "avatar":
        rgb = (0.5 + SH_C0 * avatar.features_dc[:, 0, :].detach().float().cpu()).clamp(0, 1).numpy()
        return np.round(rgb * 255).astype(np.uint8)
    if mode == "region":
        colours = np.full((n, 3), 180, np.uint8)
        colours[avatar.is_mouth.cpu().numpy()] = (220, 30, 30)
        return colours
    if mode != "image":
        raise ValueError(f"--colour must be avatar, image or region, got {mode!r}")
    colours = np.full((n, 3), 128, np.uint8)  # outside the image / behind the camera: grey
    if frame.image is None:
        return colours
    pixels, depth = project(means, frame.viewmat, frame.K)
    h, w = frame.image.shape[:2]
    cols, rows = np.floor(pixels[:, 0]).astype(np.int64), np.floor(pixels[:, 1]).astype(np.int64)
    inside = (depth > 0) & (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    colours[inside] = frame.image[rows[inside], cols[inside]]
    return colours


def draw_overlay(frame: FrameInput, vertices: torch.Tensor, faces: np.ndarray, *, opacity: float = 0.5
                 ) -> np.ndarray:
    """The frame ``[H, W, 3] uint8`` with the projected mesh drawn over it: flat shading by the angle to the
    view ray, far faces first (painter's algorithm), blended at ``opacity``."""
    h, w = frame.size_hw
    base = frame.image if frame.image is not None else np.zeros((h, w, 3), np.uint8)
    pixels, depth = project(vertices, frame.viewmat, frame.K)
    cam = (vertices.double() @ frame.viewmat[:3, :3].double().T + frame.viewmat[:3, 3].double()).numpy()
    tri_cam = cam[faces]  # [F, 3, 3]
    normals = np.cross(tri_cam[:, 1] - tri_cam[:, 0], tri_cam[:, 2] - tri_cam[:, 0])
    centres = tri_cam.mean(1)
    cos = np.abs((normals * centres).sum(1)) / np.maximum(
        np.linalg.norm(normals, axis=1) * np.linalg.norm(centres, axis=1), 1e-12)
    in_front = (depth[faces] > 1e-3).all(1)
    order = np.argsort(-centres[:, 2])  # far to near
    layer = Image.new("RGB", (w, h), (0, 0, 0))
    mask = Image.new("L", (w, h), 0)
    draw, draw_mask = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    tri_px = pixels[faces] - 0.5  # K puts pixel centres at +0.5; PIL at integers
    for f in order:
        if not in_front[f]:
            continue
        shade = int(60 + 195 * cos[f])
        polygon = [tuple(p) for p in tri_px[f]]
        draw.polygon(polygon, fill=(shade, int(shade * 0.85), int(shade * 0.6)))
        draw_mask.polygon(polygon, fill=255)
    covered = (np.asarray(mask, dtype=np.float32) / 255.0 * opacity)[..., None]
    blended = base.astype(np.float32) * (1 - covered) + np.asarray(layer, dtype=np.float32) * covered
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def write_obj(path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """A triangle mesh as OBJ (``v x y z`` lines, 1-based ``f a b c``), written atomically."""
    vertices, faces = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"write_obj: vertices must be [V, 3] and faces [F, 3], got {vertices.shape}, {faces.shape}")
    lines = ["# flashavatar inspect: posed FLAME mesh (metres, world coordinates)"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a} {b} {c}" for a, b, c in faces + 1]
    _write_text(Path(path), "\n".join(lines) + "\n")


def write_point_ply(path, points: np.ndarray, colours: np.ndarray) -> None:
    """A coloured point cloud ``points [N, 3]``, ``colours [N, 3] uint8`` as binary PLY, written atomically."""
    from plyfile import PlyData, PlyElement

    points, colours = np.asarray(points, dtype=np.float32), np.asarray(colours, dtype=np.uint8)
    if points.ndim != 2 or points.shape[1] != 3 or colours.shape != points.shape:
        raise ValueError(f"write_point_ply: points [N, 3] and colours [N, 3], got {points.shape}, {colours.shape}")
    vertex = np.empty(len(points), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                          ("blue", "u1")])
    for i, name in enumerate("xyz"):
        vertex[name] = points[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        vertex[name] = colours[:, i]
    data = PlyData([PlyElement.describe(vertex, "vertex")], text=False)
    atomic_write_with(Path(path), lambda tmp: data.write(str(tmp)))


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
