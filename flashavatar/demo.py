"""``flashavatar demo`` (``make demo``): the main job end to end on the bundled synthetic subject.

synthesise the subject (if absent) -> train with the preset for this machine (cpu: small, minutes on 2 cores;
gpu: full) -> render the test split (PSNR/SSIM, side-by-side MP4) -> FPS of animate + render -> PLY export,
then print where everything is.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import add_config_arguments

    parser.add_argument("--workdir", metavar="DIR", default="demo_output",
                        help="where the subject, the run and the outputs go (default ./demo_output)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames of the synthetic subject (default 120 on a CPU, 600 on a GPU)")
    parser.add_argument("--size", type=int, default=None, help="frame size of the subject (default 256 on a CPU, 512 "
                                                               "on a GPU)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--fresh", action="store_true", help="retrain even if the run folder has a checkpoint")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .bench import bench_pipeline, device_label, front_camera  # noqa: F401
    from .export import export_frame
    from .model.synthetic import make_subject
    from .render import render_and_report
    from .session import resolve_device
    from .train import Trainer, config_from_args, report_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        print(f"flashavatar demo: error: {exc}")
        return 2
    gpu = device.type == "cuda"
    if args.preset is None:
        args.preset = "gpu" if gpu else "cpu"
    work = Path(args.workdir)
    data_root = work / "data"
    subject = "synthetic"
    n_frames = args.frames or (600 if gpu else 120)
    size = args.size or (512 if gpu else 256)
    n_test = max(4, n_frames // 10) if not gpu else 100
    marker = data_root / subject / "subject.json"
    if not marker.is_file():
        print(f"[1/5] synthesising the subject: {n_frames} frames at {size}x{size} -> {data_root}")
        t0 = time.perf_counter()
        make_subject(data_root, subject, n_frames=n_frames, size=size, progress=True)
        print(f"      done in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"[1/5] using the existing subject {data_root / subject}")
    try:
        cfg = config_from_args(args, data={"data_root": str(data_root), "subject": subject, "n_test": n_test},
                               train={"device": str(device)})
    except (ValueError, FileNotFoundError) as exc:
        print(f"flashavatar demo: error: {exc}")
        return 2
    run_dir = work / "run"
    print(f"[2/5] training (preset '{args.preset}', {cfg.train.iterations} iterations, batch {cfg.train.batch_size}, "
          f"uv_size {cfg.model.uv_size}) -> {run_dir}")
    trainer = Trainer(cfg, run_dir, device=device, resume=not args.fresh)
    result = report_training(trainer, trainer.run())
    if result.interrupted:
        return 130
    session = trainer.session
    session.avatar.eval()

    print("[3/5] rendering the test split")
    eval_dir = run_dir / "eval"
    metrics = render_and_report(session, eval_dir, batch_size=cfg.train.batch_size)

    print("[4/5] frames per second of FLAME -> avatar -> rasterise")
    view0 = session.test_frames.viewmats[0]
    K0 = session.test_frames.Ks[0]
    codes = session.test_frames.codes_at(torch.tensor([0]))
    rows = bench_pipeline(session.avatar, codes, view0, K0, session.width, session.height, [1], device,
                          warmup=2, repeats=5 if not gpu else 50)
    fps = rows[0]["fps"]
    print(f"      {fps:.1f} FPS at {session.width}x{session.height}, batch 1, {session.num_gaussians} Gaussians, "
          f"{device_label(device)}, rasteriser '{rows[0]['rasterizer']}'")

    print("[5/5] exporting a PLY")
    ply_path = run_dir / "export" / "test_frame0.ply"
    n = export_frame(session, ply_path, int(session.test_frames.frame_ids[0]), "test")

    m = metrics["mean"]
    total = time.perf_counter() - t_start
    print("\n== flashavatar demo: done in %.1f s ==" % total)
    print(f"test PSNR {m['psnr_full']:.2f} dB (head {m['psnr_head']:.2f}), SSIM {m['ssim_full']:.4f} "
          f"(head {m['ssim_head']:.4f}); {fps:.1f} FPS ({device_label(device)})")
    if (eval_dir / "test_side_by_side.mp4").is_file():
        print(f"video (ground truth | render): {eval_dir / 'test_side_by_side.mp4'}")
    print(f"frames: {eval_dir / 'frames'}")
    print(f"metrics: {eval_dir / 'metrics.json'}")
    print(f"PLY ({n} Gaussians): {ply_path}")
    print(f"checkpoint: {result.checkpoint}   previews: {run_dir / 'previews'}")
    return 0
