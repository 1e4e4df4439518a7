"""``flashavatar export``: one frame's Gaussians of a trained avatar as a 3DGS-standard PLY (see :mod:`.ply`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .ply import write_gaussians_ply
from .session import AvatarSession, load_run


def find_frame(session: AvatarSession, frame_id: int | None, split: str):
    """(FrameSet, index) of dataset frame ``frame_id`` in ``split`` (default: the first test frame)."""
    sets = {"test": session.test_frames, "train": session.train_frames}
    order = [split] if split != "any" else ["test", "train"]
    for name in order:
        fs = sets[name]
        if len(fs) == 0:
            continue
        if frame_id is None:
            return fs, 0
        hits = torch.nonzero(fs.frame_ids == frame_id).flatten()
        if len(hits):
            return fs, int(hits[0])
    where = " or ".join(order)
    raise ValueError(f"--frame {frame_id}: no such frame in the {where} split")


@torch.no_grad()
def export_frame(session: AvatarSession, path: str | Path, frame_id: int | None = None, split: str = "any",
                 neutral: bool = False) -> int:
    """Write the Gaussians of one frame (or of the neutral codes) to ``path``; returns their count."""
    fs, i = find_frame(session, frame_id, split)
    codes = fs.codes_at(torch.tensor([i]))
    if neutral:
        from .model.flame import FlameCodes

        n = FlameCodes.neutral(1, n_shape=codes["shape"].shape[-1], n_expr=codes["expr"].shape[-1])
        codes = {**n.as_dict(), "shape": codes["shape"]}
    codes = {k: v.to(session.device) for k, v in codes.items()}
    g = session.gaussians(codes)
    return write_gaussians_ply(path, g["means"][0], g["quats"][0], g["scales"][0], g["opacities"][0], g["sh"][0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="trained run folder (from `flashavatar train --out`)")
    parser.add_argument("--out", metavar="FILE", default=None, help="PLY path (default: <run>/export/frame_<id>.ply)")
    parser.add_argument("--frame", type=int, default=None,
                        help="dataset frame number whose expression to use (default: the first test frame)")
    parser.add_argument("--split", choices=["any", "test", "train"], default="any", help="where to look for --frame")
    parser.add_argument("--neutral", action="store_true", help="zero expression, identity jaw/eyes instead")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    try:
        session, _ = load_run(args.run, args.device)
        fs, i = find_frame(session, args.frame, args.split)
        fid = int(fs.frame_ids[i])
        out = Path(args.out) if args.out else Path(args.run) / "export" / (
            "neutral.ply" if args.neutral else f"frame_{fid:05d}.ply")
        n = export_frame(session, out, fid, args.split, args.neutral)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"flashavatar export: error: {exc}")
        return 2
    print(f"wrote {n} Gaussians ({'neutral' if args.neutral else f'frame {fid}'}) to {out}")
    return 0
