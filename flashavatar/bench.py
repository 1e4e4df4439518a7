"""``flashavatar bench``: frames per second of the per-frame pipeline FLAME -> avatar -> rasterise -> image.

A first, simple form (issue 6 extends it with CUDA graphs and a gsplat row): for each batch size it times
the whole pipeline and its stages (FLAME LBS, avatar MLP + assembly, rasterisation) after warm-up, reports
the median over repeats and peak GPU memory, prints a table and writes JSON. On a CPU the figures are
labelled CPU and are only a smoke test of the path.

The avatar is a trained run (``--run``) or, by default, an untrained one on the procedural head (written to
a cache folder when absent), so the benchmark needs no dataset.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .io_utils import atomic_write_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call (CUDA events on a GPU, perf_counter on a CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def front_camera(width: int, height: int, distance: float = 0.55, fov_deg: float = 30.0, center_y: float = -0.02):
    """A camera looking at the head from the front (OpenCV: x right, y down, z forward; head faces +z)."""
    import math

    f = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
    # world y up, head looking along +z -> camera at +z looking back: flip y and z
    view = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, center_y], [0, 0, -1, distance], [0, 0, 0, 1]])
    return view, K


def default_head_model(cache: Path | None = None) -> Path:
    from .model.synthetic import write_head_model

    cache = cache or Path.home() / ".cache" / "flashavatar" / "head_model"
    pkl = cache / "generic_model.pkl"
    if not pkl.is_file():
        write_head_model(cache)
    return pkl


@torch.no_grad()
def bench_pipeline(avatar, codes: dict[str, torch.Tensor], view: torch.Tensor, K: torch.Tensor, width: int, height: int,
                   batch_sizes: list[int], device: torch.device, warmup: int = 3, repeats: int = 10,
                   sh_degree: int | None = None) -> list[dict[str, Any]]:
    from .rasterize_fallback import pick_rasterizer

    name, raster = pick_rasterizer(device)
    d = avatar.max_sh_degree if sh_degree is None else sh_degree
    rows = []
    for b in batch_sizes:
        c = {k: v[:1].expand(b, -1).contiguous().to(device) for k, v in codes.items()}
        views = view.to(device).expand(b, 1, 4, 4).contiguous()
        ks = K.to(device).expand(b, 1, 3, 3).contiguous()
        bg = torch.tensor([0.0, 1.0, 0.0], device=device).expand(b, 1, 3)

        def flame():
            return avatar.flame(c["shape"], c["expr"], c["jaw"], c["eyes"], c["eyelids"])

        verts = flame()

        def animate():
            return avatar(c, vertices=verts)

        g = animate()
        k = (d + 1) ** 2

        def render():
            return raster(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"][:, :, :k], views, ks, width,
                          height, sh_degree=d, backgrounds=bg)

        def full():
            gg = avatar(c)
            return raster(gg["means"], gg["quats"], gg["scales"], gg["opacities"], gg["sh"][:, :, :k], views, ks,
                          width, height, sh_degree=d, backgrounds=bg)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_full = statistics.median(time_fn(full, device, warmup, repeats))
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        t_flame = statistics.median(time_fn(flame, device, warmup, repeats))
        t_anim = statistics.median(time_fn(animate, device, warmup, repeats))
        t_rast = statistics.median(time_fn(render, device, warmup, repeats))
        rows.append({"batch": b, "fps": b / t_full, "ms_per_call": 1e3 * t_full, "ms_flame": 1e3 * t_flame,
                     "ms_avatar_mlp": 1e3 * t_anim, "ms_rasterize": 1e3 * t_rast, "peak_mem_mib": peak,
                     "rasterizer": name})
    return rows


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(rows: list[dict[str, Any]], label: str) -> str:
    head = f"{'batch':>5} {'FPS':>10} {'ms/call':>9} {'FLAME':>8} {'avatar':>8} {'raster':>8} {'peak MiB':>9}"
    lines = [f"device: {label}", head]
    for r in rows:
        peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
        lines.append(f"{r['batch']:>5} {r['fps']:>10.1f} {r['ms_per_call']:>9.2f} {r['ms_flame']:>8.2f} "
                     f"{r['ms_avatar_mlp']:>8.2f} {r['ms_rasterize']:>8.2f} {peak:>9}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", default=None,
                        help="trained run folder (default: an untrained avatar on the procedural head)")
    parser.add_argument("--head-model", metavar="PKL", default=None,
                        help="head model of the untrained avatar (default: the procedural head, written to "
                             "~/.cache/flashavatar/head_model when absent); its template OBJ must be beside it")
    parser.add_argument("--resolution", type=int, default=None, help="square image size in pixels (default 512 on a "
                                                                      "GPU, 128 on a CPU)")
    parser.add_argument("--uv-size", type=int, default=None, help="UV grid of the untrained avatar (default 128 on a "
                                                                  "GPU, 32 on a CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="frames per call (default 1 16 64 on a GPU, 1 4 on a CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", metavar="FILE", default=None, help="JSON output (default benchmarks/results/"
                                                                    "end_to_end_<device>.json)")


def run(args: argparse.Namespace) -> int:
    from .session import resolve_device

    try:
        device = resolve_device(args.device)
        gpu = device.type == "cuda"
        res = args.resolution or (512 if gpu else 128)
        batches = args.batch_sizes or ([1, 16, 64] if gpu else [1, 4])
        repeats = args.repeats or (50 if gpu else 3)
        if res < 8 or min(batches) < 1 or repeats < 1:
            raise ValueError("--resolution must be >= 8, --batch-sizes and --repeats >= 1")
        if args.run:
            from .session import load_run

            session, _ = load_run(args.run, device, load_frames=False)
            avatar = session.avatar
            codes = {k: v[:1] for k, v in (session.train_frames.codes if len(session.train_frames)
                                           else session.test_frames.codes).items()}
            for k in ("expr", "jaw", "eyes", "eyelids"):
                codes.setdefault(k, torch.zeros(1, 1))
            source = f"run {args.run}"
        else:
            from .model import FLAME, FlameCodes, GaussianAvatar

            pkl = Path(args.head_model) if args.head_model else default_head_model()
            if not pkl.is_file():
                raise FileNotFoundError(f"--head-model: file not found: {pkl}")
            flame = FLAME(pkl)
            avatar = GaussianAvatar(flame, pkl.parent / "head_template.obj", uv_size=args.uv_size or (128 if gpu else 32))
            avatar.active_sh_degree = avatar.max_sh_degree
            codes = FlameCodes.neutral(1, flame.n_shape, flame.n_expr).as_dict()
            source = f"untrained avatar on the procedural head ({pkl})"
        avatar = avatar.to(device).eval()
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"flashavatar bench: error: {exc}")
        return 2
    view, K = front_camera(res, res)
    rows = bench_pipeline(avatar, codes, view, K, res, res, batches, device, args.warmup, repeats)
    label = device_label(device)
    print(f"animate + render at {res}x{res}, {avatar.n_gaussians} Gaussians, {source}")
    print(format_table(rows, label + ("" if gpu else "  [CPU figures: a smoke test, not the GPU target]")))
    result = {"device": label, "device_type": device.type, "resolution": res, "gaussians": avatar.n_gaussians,
              "source": source, "torch": torch.__version__, "rows": rows}
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"end_to_end_{device.type}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    print(f"results: {out}")
    return 0
