"""Reenactment: drive avatar A with sequence B's expression, jaw, eye and eyelid codes (``flashavatar reenact``).

Codes are transferred relative to a neutral frame of each sequence, so A keeps its own resting face:

    expr_A(t)    = expr_A(n_A)    + expr_B(t) - expr_B(n_B)          (same for eyelids)
    R_A(t)       = R_B(t) R_B(n_B)^T R_A(n_A)                         (jaw and both eyes, as rotations)

A's shape code is kept. The camera is A's camera at its neutral frame (``--camera fixed``) or that camera
moved by B's head motion relative to B's neutral frame (``--camera driver``: the tracker moves the camera,
not the head, so head motion lives in B's camera sequence).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .io_utils import VideoWriter, atomic_write_text, write_png
from .model.camera import matrix_to_rot6d, rot6d_to_matrix
from .session import AvatarSession, load_run


def transfer_codes(src_neutral: dict[str, torch.Tensor], drv: dict[str, torch.Tensor],
                   drv_neutral: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Codes for A: src_neutral [1, ...] (A at its neutral frame), drv [T, ...], drv_neutral [1, ...]."""
    t = drv["expr"].shape[0]
    out = {"shape": src_neutral["shape"].expand(t, -1)}
    for k in ("expr", "eyelids"):
        out[k] = src_neutral[k] + drv[k] - drv_neutral[k]

    def rel(key: str, sl: slice) -> torch.Tensor:
        r_t = rot6d_to_matrix(drv[key][:, sl])
        r_n = rot6d_to_matrix(drv_neutral[key][:, sl])
        r_a = rot6d_to_matrix(src_neutral[key][:, sl])
        return matrix_to_rot6d(r_t @ r_n.transpose(-1, -2) @ r_a)

    out["jaw"] = rel("jaw", slice(0, 6))
    out["eyes"] = torch.cat([rel("eyes", slice(0, 6)), rel("eyes", slice(6, 12))], -1)
    return out


@torch.no_grad()
def reenact(session: AvatarSession, driver, out_dir: Path, *, source_neutral: int = 0, driver_neutral: int = 0,
            camera: str = "fixed", batch_size: int = 4, fps: float = 25.0, write_frames: bool = True,
            max_frames: int | None = None) -> dict:
    """Render A (``session``) driven by ``driver`` (a FrameSet-like object with codes, viewmats, Ks)."""
    src = session.train_frames if len(session.train_frames) else session.test_frames
    if not 0 <= source_neutral < len(src):
        raise ValueError(f"--source-neutral {source_neutral} is outside A's {len(src)} training frames")
    n_drv = len(driver.frame_ids)
    if not 0 <= driver_neutral < n_drv:
        raise ValueError(f"--driver-neutral {driver_neutral} is outside the driver's {n_drv} frames")
    if camera not in ("fixed", "driver"):
        raise ValueError(f"--camera must be fixed or driver, got '{camera}'")
    count = n_drv if max_frames is None else min(n_drv, max_frames)
    dev = session.device
    src_n = {k: v.to(dev) for k, v in src.codes_at(torch.tensor([source_neutral])).items()}
    drv_codes = {k: v.to(dev) for k, v in driver.codes.items()}
    drv_n = {k: (v[:1] if v.shape[0] == 1 else v[driver_neutral:driver_neutral + 1]) for k, v in drv_codes.items()}
    view_a = src.viewmats[source_neutral].to(dev)
    k_a = src.Ks[source_neutral].to(dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    video_path = out_dir / "reenactment.mp4"
    written = 0
    with VideoWriter(video_path, fps=fps) as video:
        for chunk in torch.arange(count).split(batch_size):
            drv = {k: (v.expand(len(chunk), -1) if v.shape[0] == 1 else v[chunk.to(dev)]) for k, v in drv_codes.items()}
            codes = transfer_codes(src_n, drv, drv_n)
            if camera == "driver":
                vt = driver.viewmats[chunk].to(dev)
                vn = driver.viewmats[driver_neutral].to(dev)
                views = vt @ torch.linalg.inv(vn) @ view_a
            else:
                views = view_a.expand(len(chunk), 4, 4)
            g = session.gaussians(codes)
            img = session.render_gaussians(g, views, k_a.expand(len(chunk), 3, 3), session.sh_degree)["image"]
            for j in range(len(chunk)):
                frame = img[j].clamp(0, 1)
                if write_frames:
                    write_png(out_dir / "frames" / f"{written:05d}.png", frame)
                video.append(frame)
                written += 1
    summary = {"frames": written, "video": str(video_path), "camera": camera, "source_neutral": source_neutral,
               "driver_neutral": driver_neutral}
    atomic_write_text(out_dir / "reenactment.json", __import__("json").dumps(summary, indent=1))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="trained run folder of avatar A")
    parser.add_argument("--driver-tracker", metavar="DIR", required=True,
                        help="tracker root of sequence B (holding <subject>/checkpoint/*.frame)")
    parser.add_argument("--driver-subject", required=True, help="subject name of sequence B under --driver-tracker")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: <run>/reenact_<subject>)")
    parser.add_argument("--source-neutral", type=int, default=0, help="index of A's neutral frame in its training split")
    parser.add_argument("--driver-neutral", type=int, default=0, help="index of B's neutral frame")
    parser.add_argument("--camera", choices=["fixed", "driver"], default="fixed",
                        help="fixed: A's camera at its neutral frame; driver: moved by B's head motion")
    parser.add_argument("--max-frames", type=int, default=None, help="render only the first N driver frames")
    parser.add_argument("--batch-size", type=int, default=4, help="frames per render call")
    parser.add_argument("--no-frames", action="store_true", help="only the MP4, no PNG frames")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate of the MP4")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from .data_adapter import load_tracker_sequence

    try:
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        session, _ = load_run(args.run, args.device, load_frames=True)
        driver = load_tracker_sequence(args.driver_tracker, args.driver_subject)
        out = Path(args.out) if args.out else Path(args.run) / f"reenact_{args.driver_subject}"
        summary = reenact(session, driver, out, source_neutral=args.source_neutral,
                          driver_neutral=args.driver_neutral, camera=args.camera, batch_size=args.batch_size,
                          fps=args.fps, write_frames=not args.no_frames, max_frames=args.max_frames)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"flashavatar reenact: error: {exc}")
        return 2
    print(f"reenacted {summary['frames']} frames: {summary['video']}")
    return 0
