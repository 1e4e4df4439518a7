"""Evaluation of a trained avatar on its test split, and the ``flashavatar render`` command.

Writes ``<out>/frames/NNNNN.png`` (renders), ``<out>/test_side_by_side.mp4`` (ground truth | render) and
``<out>/metrics.json``: PSNR and SSIM (LPIPS when its weights are on disk) per frame and on average, on
the full frame and inside the head mask. Ground truth is composited as in SPEC 1 (matting alpha, then the
head mask, over the background colour) and the render is composited over the same colour, so pixels
outside the head count in "full" (where both should be the background) and not in "head".

With ``--robustness`` the test split is rendered again with Gaussian noise of each std added to the mouth
and eye parameters (jaw, eyes, eyelids) and the change of the metrics is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .io_utils import VideoWriter, atomic_write_text, write_png
from .session import AvatarSession, FrameSet, load_run

log = logging.getLogger("flashavatar.render")

MASKING_NOTE = ("gt = image*alpha + bg*(1-alpha), then gt*M_head + bg*(1-M_head) (SPEC 1); render composited "
                "over the same background; 'full' = every pixel of the frame, 'head' = pixels inside M_head")

NOISY_KEYS = ("jaw", "eyes", "eyelids")  # mouth and eye parameters


@torch.no_grad()
def evaluate(session: AvatarSession, frames: FrameSet, *, out_dir: Path | None = None, write_frames: bool = True,
             video_path: Path | None = None, batch_size: int = 4, noise_std: float = 0.0, seed: int = 0,
             lpips_net: metrics.LPIPS | None = None, fps: float = 25.0, progress: bool = False) -> dict[str, Any]:
    """Render every frame of ``frames``; returns mean metrics and the per-frame lists."""
    device = session.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per_frame: dict[str, list[float]] = {"psnr_full": [], "psnr_head": [], "ssim_full": [], "ssim_head": []}
    if lpips_net is not None:
        per_frame["lpips_head"] = []
    ids: list[int] = []
    video = VideoWriter(video_path, fps=fps) if video_path is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(frames), desc="render", unit="frame", dynamic_ncols=True)
    try:
        for chunk in torch.arange(len(frames)).split(batch_size):
            batch = frames.batch(chunk, device)
            if noise_std > 0:
                for k in NOISY_KEYS:
                    v = batch["codes"][k]
                    batch["codes"][k] = v + noise_std * torch.randn(v.shape, generator=gen).to(v.device, v.dtype)
            out = session.render(batch)
            pred, gt = out["image"].clamp(0, 1), batch["gt"]
            head = batch["head_mask"]
            per_frame["psnr_full"] += metrics.psnr(pred, gt).tolist()
            per_frame["psnr_head"] += metrics.psnr(pred, gt, head).tolist()
            per_frame["ssim_full"] += metrics.ssim(pred, gt).tolist()
            per_frame["ssim_head"] += metrics.ssim(pred, gt, head).tolist()
            if lpips_net is not None:
                h = head[..., None]
                per_frame["lpips_head"] += lpips_net(pred * h, gt * h).tolist()
            for j, fid in enumerate(batch["frame_ids"].tolist()):
                ids.append(int(fid))
                if write_frames and out_dir is not None:
                    write_png(out_dir / "frames" / f"{int(fid):05d}.png", pred[j])
                if video is not None:
                    video.append(torch.cat([gt[j], pred[j]], dim=1))  # [H, 2W, 3]
            if bar is not None:
                bar.update(len(chunk))
    except BaseException:
        if video is not None:
            video.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    if video is not None:
        video.close()
    means = {k: (sum(v) / len(v) if v else math.nan) for k, v in per_frame.items()}
    return {"frames": len(ids), "mean": means, "per_frame": per_frame, "frame_ids": ids, "noise_std": noise_std,
            "masking": MASKING_NOTE}


@torch.no_grad()
def temporal_flicker(session: AvatarSession, frames: FrameSet, batch_size: int = 4) -> dict[str, float]:
    """Mean |frame_t - frame_t-1| of renders minus that of ground truth over consecutive test frames."""
    prev_pred = prev_gt = None
    prev_id = None
    d_pred, d_gt = [], []
    for chunk in torch.arange(len(frames)).split(batch_size):
        batch = frames.batch(chunk, session.device)
        pred = session.render(batch)["image"].clamp(0, 1)
        for j, fid in enumerate(batch["frame_ids"].tolist()):
            if prev_id is not None and fid == prev_id + 1:
                d_pred.append(float((pred[j] - prev_pred).abs().mean()))
                d_gt.append(float((batch["gt"][j] - prev_gt).abs().mean()))
            prev_pred, prev_gt, prev_id = pred[j], batch["gt"][j], fid
    if not d_pred:
        return {"render": math.nan, "gt": math.nan, "excess": math.nan}
    r, g = sum(d_pred) / len(d_pred), sum(d_gt) / len(d_gt)
    return {"render": r, "gt": g, "excess": r - g}


def robustness(session: AvatarSession, frames: FrameSet, stds: list[float], clean: dict[str, Any], *,
               batch_size: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Metrics with noise on jaw/eyes/eyelids codes, and their change from ``clean``."""
    rows = []
    for std in stds:
        res = evaluate(session, frames, write_frames=False, batch_size=batch_size, noise_std=std, seed=seed)
        rows.append({"noise_std": std, "mean": res["mean"],
                     "delta": {k: res["mean"][k] - clean["mean"][k] for k in res["mean"]}})
    return rows


def video_available() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def format_metrics(m: dict[str, float]) -> str:
    parts = [f"PSNR {m['psnr_full']:.2f} dB (head {m['psnr_head']:.2f})",
             f"SSIM {m['ssim_full']:.4f} (head {m['ssim_head']:.4f})"]
    if "lpips_head" in m:
        parts.append(f"LPIPS(head) {m['lpips_head']:.4f}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="trained run folder (from `flashavatar train --out`)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: <run>/eval)")
    parser.add_argument("--max-frames", type=int, default=None, help="render only the first N test frames")
    parser.add_argument("--batch-size", type=int, default=4, help="frames per render call")
    parser.add_argument("--no-frames", action="store_true", help="do not write PNG frames")
    parser.add_argument("--no-video", action="store_true", help="do not write the side-by-side MP4")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate of the MP4")
    parser.add_argument("--robustness", action="store_true",
                        help="also render with Gaussian noise on jaw/eyes/eyelids codes and report metric changes")
    parser.add_argument("--noise-std", type=float, nargs="+", default=[0.001, 0.002, 0.005],
                        help="noise std-devs of the robustness run")
    parser.add_argument("--flicker", action="store_true",
                        help="also report temporal flicker (render minus ground-truth frame-to-frame change)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: as trained)")
    parser.add_argument("--lpips-weights", metavar="FILE", default=None,
                        help="local LPIPS-VGG weights (LPIPS is reported only when they are on disk)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        print("flashavatar render: error: --batch-size must be >= 1")
        return 2
    if any(s < 0 for s in args.noise_std):
        print("flashavatar render: error: --noise-std values must be >= 0")
        return 2
    try:
        session, _ = load_run(args.run, args.device)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"flashavatar render: error: {exc}")
        return 2
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    result = render_and_report(session, out, max_frames=args.max_frames, batch_size=args.batch_size,
                               write_frames=not args.no_frames, write_video=not args.no_video, fps=args.fps,
                               robust_stds=args.noise_std if args.robustness else None, flicker=args.flicker,
                               lpips_weights=args.lpips_weights)
    return 0 if result["frames"] else 1


def render_and_report(session: AvatarSession, out: Path, *, max_frames: int | None = None, batch_size: int = 4,
                      write_frames: bool = True, write_video: bool = True, fps: float = 25.0,
                      robust_stds: list[float] | None = None, flicker: bool = False,
                      lpips_weights: str | None = None, progress: bool = True) -> dict[str, Any]:
    frames = session.test_frames
    if max_frames is not None:
        frames = frames.subset(torch.arange(min(max_frames, len(frames))))
    if len(frames) == 0:
        print("flashavatar render: the test split is empty (data.n_test = 0?)")
        return {"frames": 0}
    lpips_net = None
    if metrics.lpips_weights_available(lpips_weights):
        lpips_net = metrics.LPIPS(lpips_weights).to(session.device)
    out.mkdir(parents=True, exist_ok=True)
    video_path = out / "test_side_by_side.mp4" if write_video else None
    if video_path is not None and not video_available():
        print("video: skipped (the imageio-ffmpeg package is not installed: pip install imageio-ffmpeg)")
        video_path = None
    t0 = time.perf_counter()
    result = evaluate(session, frames, out_dir=out, write_frames=write_frames, video_path=video_path,
                      batch_size=batch_size, lpips_net=lpips_net, fps=fps, progress=progress)
    result["seconds"] = time.perf_counter() - t0
    print(f"test split ({result['frames']} frames, {session.width}x{session.height}): {format_metrics(result['mean'])}")
    print(f"masking: {MASKING_NOTE}")
    if lpips_net is None:
        print("LPIPS: not reported (no local LPIPS-VGG weights; they are never downloaded)")
    if flicker:
        result["flicker"] = temporal_flicker(session, frames, batch_size)
        f = result["flicker"]
        print(f"temporal flicker: render {f['render']:.5f}, gt {f['gt']:.5f}, excess {f['excess']:+.5f}")
    if robust_stds:
        result["robustness"] = robustness(session, frames, robust_stds, result, batch_size=batch_size)
        for row in result["robustness"]:
            d = row["delta"]
            print(f"noise std {row['noise_std']:.4f} on jaw/eyes/eyelids: {format_metrics(row['mean'])} "
                  f"(PSNR {d['psnr_full']:+.3f} dB, SSIM {d['ssim_full']:+.4f})")
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=1))
    if write_frames:
        print(f"frames: {out / 'frames'}")
    if video_path is not None:
        print(f"video (ground truth | render): {video_path}")
    print(f"metrics: {out / 'metrics.json'}")
    return result
