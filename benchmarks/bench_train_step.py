"""Training-step throughput and where its time goes (issue 6 item 4): iterations/s and a per-stage profile.

    python benchmarks/bench_train_step.py                      # GPU: gpu preset, 512x512; CPU: a small one
    python benchmarks/bench_train_step.py --cuda-graph both    # eager and CUDA-graph steps, side by side
    python benchmarks/bench_train_step.py --set train.batch_size=8 --start-iteration 0

Builds the synthetic subject (``flashavatar synth``; cached in ``--data``), a :class:`flashavatar.train.Trainer`
on it, runs ``--warmup`` steps, then times ``--steps`` steps (synchronise + perf_counter around the loop, and
CUDA events for the GPU span) and profiles ``--profile-steps`` more with torch.profiler, split by stage: data,
FLAME, MLP, assembly, rasteriser forward, losses, backward (rasteriser backward inside it), optimiser. Prints
the tables and writes JSON with the device name (default ``benchmarks/results/train_step_<device>.json``).

The steps are real training steps from ``--start-iteration`` (default: the first iteration at which every
configured loss term and the full SH degree are on, the most expensive phase). Host time is what Python and
the dispatcher spend per stage; device time is the sum of the kernels launched inside it. A step whose wall
time is well above its device time is host-bound (launch overhead), which a CUDA graph removes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashavatar import config as config_mod  # noqa: E402
from flashavatar.io_utils import atomic_write_text  # noqa: E402

# stage label -> what it covers (ranges named "train/<label>")
STAGES = {
    "data": "frame sampling + batch gather (uint8 -> float)",
    "flame": "FLAME LBS",
    "mlp": "deformation MLP",
    "assembly": "Gaussian assembly (avatar forward minus FLAME and MLP)",
    "raster_fwd": "rasteriser forward (+ its Python wrapper)",
    "losses": "Huber, mouth, perceptual, W2, EMD",
    "backward": "all backward passes (zero_grad + autograd)",
    "raster_bwd": "  of which the rasteriser backward",
    "optimizer": "Adam step",
}


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_subject_cached(root: Path, frames: int, size: int) -> Path:
    """The synthetic subject under ``root/synth_<frames>x<size>`` (made once, reused)."""
    from flashavatar.model.synthetic import make_subject

    data = root / f"synth_{frames}x{size}"
    if not (data / "synthetic" / "checkpoint").is_dir():
        t0 = time.perf_counter()
        make_subject(data, "synthetic", n_frames=frames, size=size, progress=False)
        print(f"synthetic subject: {frames} frames at {size}x{size} in {time.perf_counter() - t0:.1f} s -> {data}")
    return data


def build_config(args: argparse.Namespace, data: Path, cuda_graph: bool | None) -> config_mod.Config:
    overrides = config_mod.parse_set(args.set)
    overrides.setdefault("data", {}).update({"data_root": str(data), "subject": "synthetic",
                                             "n_test": args.n_test})
    overrides.setdefault("train", {}).update({"progress": False, "tensorboard": False, "preview_every": 0,
                                              "checkpoint_every": 0, "device": args.device})
    if cuda_graph is not None and hasattr(config_mod.TrainConfig, "cuda_graph"):
        overrides["train"]["cuda_graph"] = cuda_graph
    return config_mod.make_config(args.preset, args.config, overrides)


def all_terms_iteration(cfg: config_mod.Config) -> int:
    """First iteration with the full SH degree and every configured loss term on."""
    lc = cfg.loss
    starts = [cfg.model.sh_degree * cfg.train.sh_increase_every]
    if lc.perceptual != "none" and lc.perceptual_weight > 0:
        starts.append(lc.perceptual_from)
    if lc.w2_weight > 0:
        starts.append(lc.w2_from)
    if lc.emd_weight > 0:
        starts.append(lc.emd_from)
    return max(starts)


def time_steps(trainer, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Wall time of ``steps`` steps after ``warmup`` (synchronised at both ends), and their GPU span."""
    for _ in range(warmup):
        trainer.step()
    _sync(device)
    start = end = None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        terms = trainer.step()
    if end is not None:
        end.record()
    _sync(device)
    wall = time.perf_counter() - t0
    out = {"steps": steps, "seconds": wall, "it_per_s": steps / wall, "ms_per_step": 1e3 * wall / steps,
           "loss_last": float(terms["total"])}
    if start is not None:
        out["gpu_span_ms_per_step"] = start.elapsed_time(end) / steps
    return out


def _wrap(obj, attr: str, label: str) -> None:
    """Instance-level wrapper of ``obj.attr`` in a profiler range (removed again by :func:`_unwrap`)."""
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with torch.profiler.record_function(f"train/{label}"):
            return fn(*a, **k)

    object.__setattr__(obj, attr, wrapped)


def _unwrap(obj, attr: str) -> None:
    if attr in obj.__dict__:
        object.__delattr__(obj, attr)


def profile_stages(trainer, device: torch.device, steps: int) -> dict:
    """torch.profiler over ``steps`` eager steps: host and device milliseconds per step for each stage."""
    from torch.profiler import ProfilerActivity, profile

    avatar, session = trainer.avatar, trainer.session
    hooks = [(avatar.flame, "forward", "flame"), (avatar, "mlp_outputs", "mlp"), (avatar, "forward", "avatar"),
             (session, "render_gaussians", "raster_fwd")]
    for obj, attr, label in hooks:
        _wrap(obj, attr, label)
    trainer.profile_stages = True
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("train/step"):
                    trainer.step()
            _sync(device)
    finally:
        trainer.profile_stages = False
        for obj, attr, _ in hooks:
            _unwrap(obj, attr)
    # Numbers from the raw events: a kernel counts once, as self device time of the CPU op that launched it
    # (key_averages would also merge in the GPU-side copies of the record_function ranges).
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == cpu]
    host, dev = {}, {}

    def add(name: str, e) -> None:
        host[name] = host.get(name, 0.0) + e.cpu_time_total / 1e3 / steps
        dev[name] = dev.get(name, 0.0) + e.device_time_total / 1e3 / steps

    for e in events:
        if e.name.startswith("train/"):
            add(e.name[6:], e)
        elif "rasterize_bwd" in e.name and not (e.cpu_parent is not None and "rasterize_bwd" in e.cpu_parent.name):
            add("raster_bwd", e)
    for d in (host, dev):
        d["assembly"] = d.get("avatar", 0.0) - d.get("flame", 0.0) - d.get("mlp", 0.0)
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps
    n_kernels = sum(len(e.kernels) for e in events) / steps
    n_ops = sum(1 for e in events if e.name.startswith("aten::")) / steps
    if device.type == "cuda":
        # backward kernels run on the autograd engine's thread, outside the "backward" range of the main thread
        dev["backward"] = max(0.0, kernel_ms - sum(dev.get(k, 0.0) for k in ("data", "forward", "losses",
                                                                             "optimizer")))
    ka = prof.key_averages()
    stages = {k: {"host_ms": host.get(k, 0.0), "device_ms": dev.get(k, 0.0), "what": v} for k, v in STAGES.items()}
    table = ka.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                     row_limit=25, max_name_column_width=60)
    return {"stages": stages, "step_host_ms": host.get("step", 0.0), "kernel_ms_per_step": kernel_ms,
            "kernels_per_step": n_kernels, "aten_ops_per_step": n_ops, "table": table}


def print_stages(p: dict, device: torch.device) -> None:
    print(f"\nper-stage profile ({'host and device' if device.type == 'cuda' else 'host'} ms per step; "
          f"profiled step {p['step_host_ms']:.2f} ms host)")
    print(f"  {'stage':<12} {'host ms':>9} {'device ms':>10}  what")
    for name, s in p["stages"].items():
        devs = f"{s['device_ms']:10.3f}" if device.type == "cuda" else f"{'-':>10}"
        print(f"  {name:<12} {s['host_ms']:9.3f} {devs}  {s['what']}")
    if device.type == "cuda":
        print(f"  kernels: {p['kernels_per_step']:.0f} per step, {p['kernel_ms_per_step']:.3f} ms of kernel time")
    print(f"  aten ops: {p['aten_ops_per_step']:.0f} per step")


def run_mode(args, data: Path, mode: str, device: torch.device, work: Path) -> dict:
    from flashavatar.train import Trainer

    cfg = build_config(args, data, {"eager": False, "graph": True, "auto": None}[mode])
    trainer = Trainer(cfg, work / f"run_{mode}", device=device, resume=False)
    start = all_terms_iteration(cfg) if args.start_iteration is None else args.start_iteration
    trainer.iteration = start
    res = {"mode": mode, "start_iteration": start, "batch_size": cfg.train.batch_size,
           "sh_degree": trainer.active_sh_degree(start)}
    res.update(time_steps(trainer, device, args.warmup, args.steps))
    res["cuda_graph_active"] = bool(getattr(trainer, "graph_active", False))
    res["cuda_graph_note"] = getattr(trainer, "graph_note", "")
    print(f"{mode:>6}: {res['it_per_s']:8.1f} it/s  {res['ms_per_step']:8.2f} ms/step"
          + (f"  (GPU span {res['gpu_span_ms_per_step']:.2f} ms/step)" if "gpu_span_ms_per_step" in res else "")
          + f"  from iteration {start}, batch {cfg.train.batch_size}, SH degree {res['sh_degree']}"
          + (f"; CUDA graph: {res['cuda_graph_note']}" if res["cuda_graph_note"] else ""))
    if mode != "graph" and args.profile_steps > 0:
        prof = profile_stages(trainer, device, args.profile_steps)
        if args.table:
            print(prof["table"])
        del prof["table"]
        print_stages(prof, device)
        res["profile"] = prof
    res["num_gaussians"] = trainer.session.num_gaussians
    res["image_hw"] = [trainer.session.height, trainer.session.width]
    res["config"] = cfg.to_dict()
    return res


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--preset", default=None, help="config preset (default: gpu on CUDA, cpu otherwise)")
    ap.add_argument("--config", default=None, help="YAML/JSON config file on top of the preset")
    ap.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--frames", type=int, default=None, help="synthetic frames (default 60 on CUDA, 16 on CPU)")
    ap.add_argument("--size", type=int, default=None, help="frame size in pixels (default 512 on CUDA, 96 on CPU)")
    ap.add_argument("--n-test", type=int, default=8, help="test frames held out (data.n_test)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 30 CUDA, 3 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 300 CUDA, 10 CPU)")
    ap.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 20 CUDA, 3 CPU; 0 = none)")
    ap.add_argument("--start-iteration", type=int, default=None,
                    help="iteration the timed steps start from (default: all loss terms and full SH on)")
    ap.add_argument("--cuda-graph", choices=("auto", "on", "off", "both"), default="both" if cuda else "off",
                    help="time eager steps (off), CUDA-graph steps (on), both, or the config's choice (auto)")
    ap.add_argument("--table", action="store_true", help="also print torch.profiler's op table")
    ap.add_argument("--data", default=None, help="folder for the cached synthetic subject (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results", help="folder (or .json file) for the results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.preset = args.preset or ("gpu" if on_gpu else "cpu")
    args.frames = args.frames or (60 if on_gpu else 16)
    args.size = args.size or (512 if on_gpu else 96)
    args.warmup = args.warmup if args.warmup is not None else (30 if on_gpu else 3)
    args.steps = args.steps or (300 if on_gpu else 10)
    args.profile_steps = args.profile_steps if args.profile_steps is not None else (20 if on_gpu else 3)
    if args.n_test >= args.frames:
        ap.error(f"--n-test ({args.n_test}) must be smaller than --frames ({args.frames})")
    if args.cuda_graph in ("on", "both") and not on_gpu:
        ap.error("--cuda-graph on/both needs a CUDA device (use --cuda-graph off on the CPU)")
    modes = {"auto": ["auto"], "on": ["graph"], "off": ["eager"], "both": ["eager", "graph"]}[args.cuda_graph]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_subject_cached(Path(args.data) if args.data else work, args.frames, args.size)
        label = device_label(device)
        print(f"device: {label}; torch {torch.__version__}; preset {args.preset}; {args.frames} frames at "
              f"{args.size}x{args.size}" + ("" if on_gpu else "  [CPU figures: a smoke test, not the GPU target]"))
        runs = [run_mode(args, data, m, device, work) for m in modes]
    if len(runs) == 2:
        print(f"graph / eager: {runs[1]['it_per_s'] / runs[0]['it_per_s']:.2f}x")
    result = {"benchmark": "train_step", "device": label, "device_type": device.type, "torch": torch.__version__,
              "preset": args.preset, "frames": args.frames, "size": args.size, "overrides": args.set,
              "warmup": args.warmup, "runs": runs,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    if out.suffix != ".json":
        name = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_") if on_gpu else "cpu"
        out = out / f"train_step_{name}.json"
    atomic_write_text(out, json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    ok = all(math.isfinite(r["loss_last"]) for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
