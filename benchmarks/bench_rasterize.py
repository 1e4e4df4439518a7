"""Benchmark: flashavatar.ops.rasterize_gaussians vs gsplat 1.5.3 (``gsplat.rasterization``, classic mode).

Head-like scenes of 15k / 50k / 200k Gaussians at 512x512, 1 and 16 cameras, forward and forward+backward,
timed with CUDA events (warm-up, median of many runs), in the same process. Also: PSNR between our image and
gsplat's, a CUDA-graph-replay row (gsplat cannot be captured: it reads the tile count back to the host), and a
per-kernel breakdown from the PyTorch profiler. Prints a table and writes JSON with the device name.

    python benchmarks/bench_rasterize.py [--out benchmarks/results/rasterize_<gpu>.json] [--quick] [--run DIR]

``--run DIR`` adds a trained avatar's first training frame (its own camera) as a scene: timings, the per-kernel
split of the forward and the forward blend variants, where the head-like scenes are only a stand-in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from raster_scenes import cameras, head_scene  # noqa: E402

from flashavatar.ops import rasterize_gaussians  # noqa: E402

W = H = 512


def scene(n: int, n_cams: int, device="cuda"):
    # Scales shrink with N so the head surface stays covered about equally (an avatar's density).
    scale = 0.8 * math.sqrt(0.1 / n)
    m, q, s, o, c = head_scene(n, d=3, seed=n, scale=scale, dtype=torch.float32)
    vm, K = cameras(n_cams, W, H, distance=0.45, dtype=torch.float32)
    return [t.to(device) for t in (m, q, s, o, c, vm, K)]


def trained_scene(run_dir, device="cuda"):
    """[means, quats, scales, opacities, colors, viewmats, Ks] of a trained run's first training frame seen from its
    own camera, shaped like :func:`scene` (colours: each Gaussian's view-independent RGB, 0.5 + C0 * SH DC, clamped
    at 0 as the rasteriser would; the SH evaluation is a small part of the projection kernel)."""
    from flashavatar.animate import Animator
    from flashavatar.model.avatar import SH_C0
    from flashavatar.session import load_run

    session, _ = load_run(run_dir, device, load_frames=False)
    frames = session.train_frames if len(session.train_frames) else session.test_frames
    codes = {k: v[:1].to(device) for k, v in frames.codes.items()}
    with torch.no_grad():
        g = Animator(session.avatar).gaussians(codes)
    colors = (0.5 + SH_C0 * g["sh"][0, :, 0]).clamp_min(0)  # [N, 3]
    vm, K = frames.viewmats[:1].to(device), frames.Ks[:1].to(device)  # [1, 4, 4], [1, 3, 3]
    out = [g["means"][0], g["quats"][0], g["scales"][0], g["opacities"][0], colors, vm, K]
    return [t.float().contiguous() for t in out], (session.width, session.height)


def short_kernel_name(name: str) -> str:
    """Kernel name without the namespaces and argument lists the profiler reports (readable in a table)."""
    for prefix in ("void ", "flashavatar::", "(anonymous namespace)::", "cub::", "CUB_300001_SM_900::", "detail::"):
        name = name.replace(prefix, "")
    return name.split("(")[0]


def time_cuda(fn, warmup=10, reps=50) -> float:
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ours_fns(args, cot):
    leaves = [t.clone().requires_grad_(i < 5) for i, t in enumerate(args)]

    def fwd():
        with torch.no_grad():
            return rasterize_gaussians(*leaves, W, H, check_finite=False)

    def fwd_bwd():
        r, a, _ = rasterize_gaussians(*leaves, W, H, check_finite=False)
        return torch.autograd.grad(r, leaves[:5], cot)

    return fwd, fwd_bwd, leaves


def gsplat_fns(args, cot):
    import gsplat

    leaves = [t.clone().requires_grad_(i < 5) for i, t in enumerate(args)]

    def call():
        return gsplat.rasterization(*leaves, W, H, near_plane=0.01, rasterize_mode="classic")

    def fwd():
        with torch.no_grad():
            return call()

    def fwd_bwd():
        r, a, _ = call()
        return torch.autograd.grad(r, leaves[:5], cot)

    return fwd, fwd_bwd


def host_time_us(fn, calls=20) -> float:
    """CPU time to issue one call (launch-bound when it exceeds the GPU time)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / calls * 1e6


def graph_fn(fn):
    """Capture fn once and return a replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def kernel_breakdown(fn, rows=14) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:rows]:
        if e.device_time_total <= 0:
            continue
        out.append({"kernel": short_kernel_name(e.key)[:90], "calls_per_iter": e.count / 20,
                    "us_per_iter": e.device_time_total / 20})
    return out


def host_profile(fn, rows=16, iters=20) -> list[dict]:
    """Where the host time of one call goes: self CPU time per operator / CUDA runtime call (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]:
        out.append({"op": e.key[:80], "calls_per_iter": e.count / iters, "self_us_per_iter": e.self_cpu_time_total / iters})
    return out


def op_only_fn(args):
    """The forward op on prepared [B, ...] tensors, no wrapper and no autograd: the C++ side's host time."""
    import flashavatar.ops.rasterize as rast

    m, q, s, o, c, vm, K = args
    n, cams = m.shape[0], vm.shape[0]
    cap = rast._capacity_state(m.device, cams, n, W, H).value
    prepped = (m[None], q[None], s[None], o[None], c[None, :, None], vm[None], K[None])

    def fn():
        with torch.no_grad():
            return torch.ops.flashavatar.rasterize_fwd.default(*prepped, None, W, H, -1, 0.01, 1e10, 0.3, cap)

    return fn


def blend_variants(env, names, args, cot, reps, profiled="fwd_bwd") -> dict:
    """Graph-replay fwd and fwd+bwd with each blend kernel that the environment variable `env` selects (names[0]:
    the default, `env` unset), and the top kernels of the `profiled` function.
    FLASHAVATAR_RAST_BWD: split (default: reduce-scatter, long tile lists split over blocks), warp (reduce-scatter,
    one block per tile), block (the previous kernel: butterfly sums, per-block shared-memory sums).
    FLASHAVATAR_RAST_FWD: split (default: long tile lists in parts over blocks + a combine pass, where the chunk
    state is kept), single (one block per tile)."""
    out = {}
    for variant in names:
        if variant == names[0]:
            os.environ.pop(env, None)
        else:
            os.environ[env] = variant
        fwd, fwd_bwd, _ = ours_fns(args, cot)
        out[variant] = {"fwd_graph_ms": time_cuda(graph_fn(fwd), reps=reps),
                        "fwd_bwd_graph_ms": time_cuda(graph_fn(fwd_bwd), reps=reps),
                        "kernels": kernel_breakdown(fwd if profiled == "fwd" else fwd_bwd, rows=4)}
    os.environ.pop(env, None)
    return out


def main():
    global W, H  # the scenes' image size (the trained run's, while it is measured)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-gsplat", action="store_true")
    ap.add_argument("--sizes", default="15000,50000,200000", help="comma-separated Gaussian counts")
    ap.add_argument("--run", default=None, metavar="DIR", help="also a trained run's first frame (see the top)")
    opt = ap.parse_args()
    reps = 20 if opt.quick else 50
    dev_name = torch.cuda.get_device_name()
    have_gsplat = False
    if not opt.no_gsplat:
        try:
            t0 = time.time()
            import gsplat  # noqa: F401
            from gsplat.cuda._backend import _C as gs_c  # compiles on first use

            have_gsplat = gs_c is not None
            print(f"gsplat {gsplat.__version__} ready in {time.time() - t0:.0f}s", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"gsplat unavailable: {type(exc).__name__}: {exc}", flush=True)

    rows = []
    for n in (int(x) for x in opt.sizes.split(",")):
        for n_cams in (1, 16):
            args = scene(n, n_cams)
            cot = torch.rand(n_cams, H, W, 3, device="cuda")
            fwd, fwd_bwd, _ = ours_fns(args, cot)
            row = {"gaussians": n, "cameras": n_cams, "ours_fwd_ms": time_cuda(fwd, reps=reps),
                   "ours_fwd_bwd_ms": time_cuda(fwd_bwd, reps=reps)}
            if n_cams == 1 and n <= 50_000:
                row["ours_fwd_graph_ms"] = time_cuda(graph_fn(fwd), reps=reps)
                row["ours_fwd_bwd_graph_ms"] = time_cuda(graph_fn(fwd_bwd), reps=reps)
            row["ours_host_fwd_us"] = host_time_us(fwd)
            row["ours_host_fwd_bwd_us"] = host_time_us(fwd_bwd)
            r_ours = fwd()[0]
            row["ours_alpha_mean"] = fwd()[1].mean().item()
            if have_gsplat:
                gfwd, gfwd_bwd = gsplat_fns(args, cot)
                row["gsplat_host_fwd_us"] = host_time_us(gfwd)
                row["gsplat_fwd_ms"] = time_cuda(gfwd, reps=reps)
                row["gsplat_fwd_bwd_ms"] = time_cuda(gfwd_bwd, reps=reps)
                row["psnr_vs_gsplat_db"] = psnr(r_ours, gfwd()[0])
                row["speedup_fwd"] = row["gsplat_fwd_ms"] / row["ours_fwd_ms"]
                row["speedup_fwd_bwd"] = row["gsplat_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del args, fwd, fwd_bwd

    args = scene(15_000, 1)
    cot = torch.rand(1, H, W, 3, device="cuda")
    fwd, fwd_bwd, _ = ours_fns(args, cot)
    breakdown = {"ours_15k_1cam_fwd_bwd": kernel_breakdown(fwd_bwd)}
    if have_gsplat:
        breakdown["gsplat_15k_1cam_fwd_bwd"] = kernel_breakdown(gsplat_fns(args, cot)[1])
    host = {"op_only_fwd_us": host_time_us(op_only_fn(args), calls=50), "wrapper_fwd_us": host_time_us(fwd, calls=50),
            "fwd_bwd_us": host_time_us(fwd_bwd, calls=50)}
    host_tables = {"fwd": host_profile(fwd), "fwd_bwd": host_profile(fwd_bwd)}
    variants, fwd_variants = {}, {}
    for n in (15_000, 50_000):
        a = scene(n, 1)
        cot1 = torch.rand(1, H, W, 3, device="cuda")
        variants[f"{n // 1000}k"] = blend_variants("FLASHAVATAR_RAST_BWD", ("split", "warp", "block"), a, cot1, reps)
        fwd_variants[f"{n // 1000}k"] = blend_variants("FLASHAVATAR_RAST_FWD", ("split", "single"), a, cot1, reps,
                                                       profiled="fwd")

    trained = None
    if opt.run:
        targs, (tw, th) = trained_scene(opt.run)
        size = W, H
        W, H = tw, th  # ours_fns / blend_variants render at the global size
        tcot = torch.rand(1, H, W, 3, device="cuda")
        tfwd, tfwd_bwd, _ = ours_fns(targs, tcot)
        trained = {"run": opt.run, "gaussians": int(targs[0].shape[0]), "width": W, "height": H,
                   "fwd_ms": time_cuda(tfwd, reps=reps), "fwd_bwd_ms": time_cuda(tfwd_bwd, reps=reps),
                   "fwd_graph_ms": time_cuda(graph_fn(tfwd), reps=reps),
                   "fwd_bwd_graph_ms": time_cuda(graph_fn(tfwd_bwd), reps=reps),
                   "alpha_mean": tfwd()[1].mean().item(), "kernels_fwd": kernel_breakdown(tfwd),
                   "fwd_variants": blend_variants("FLASHAVATAR_RAST_FWD", ("split", "single"), targs, tcot, reps,
                                                  profiled="fwd")}
        W, H = size

    hdr = (f"{'N':>7} {'cams':>4} | {'ours fwd':>9} {'gsplat':>8} {'x':>5} | {'ours f+b':>9} {'gsplat':>8} {'x':>5} | "
           f"{'graph fwd':>9} {'graph f+b':>9} | {'PSNR dB':>7}")
    print("\n" + dev_name)
    print(hdr)
    print("-" * len(hdr))
    f = lambda r, k, fmt="{:.3f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
    for r in rows:
        print(f"{r['gaussians']:>7} {r['cameras']:>4} | {f(r, 'ours_fwd_ms'):>9} {f(r, 'gsplat_fwd_ms'):>8} "
              f"{f(r, 'speedup_fwd', '{:.2f}'):>5} | {f(r, 'ours_fwd_bwd_ms'):>9} {f(r, 'gsplat_fwd_bwd_ms'):>8} "
              f"{f(r, 'speedup_fwd_bwd', '{:.2f}'):>5} | {f(r, 'ours_fwd_graph_ms'):>9} "
              f"{f(r, 'ours_fwd_bwd_graph_ms'):>9} | {f(r, 'psnr_vs_gsplat_db', '{:.1f}'):>7}")
    print("(ms, median of CUDA-event timings; x = gsplat time / ours)")
    print("host time per call (us): " + ", ".join(
        f"{r['gaussians'] // 1000}k/{r['cameras']}: fwd {r['ours_host_fwd_us']:.0f} f+b {r['ours_host_fwd_bwd_us']:.0f}"
        + (f" (gsplat fwd {r['gsplat_host_fwd_us']:.0f})" if "gsplat_host_fwd_us" in r else "") for r in rows))
    for name, table in breakdown.items():
        print(f"\nper-kernel, {name} (us per iteration):")
        for e in table:
            print(f"  {e['us_per_iter']:8.1f}  x{e['calls_per_iter']:<4g} {e['kernel']}")
    print("\nhost us per call, 15k/1 cam: " + ", ".join(f"{k} {v:.0f}" for k, v in host.items()))
    for name, table in host_tables.items():
        print(f"host self-CPU, 15k/1 cam {name} (us per call, profiler on):")
        for e in table:
            print(f"  {e['self_us_per_iter']:8.1f}  x{e['calls_per_iter']:<4g} {e['op']}")
    for what, table in (("backward", variants), ("forward", fwd_variants)):
        for n, v in table.items():
            print(f"{what} blend variants, {n}/1 cam: " + "; ".join(
                f"{name}: graph fwd {r['fwd_graph_ms']:.3f} ms, f+b {r['fwd_bwd_graph_ms']:.3f} ms, "
                + ", ".join(f"{e['kernel'][:40]} {e['us_per_iter']:.1f}" for e in r["kernels"][:3])
                for name, r in v.items()))

    if trained:
        t = trained
        print(f"\ntrained run {t['run']}: {t['gaussians']} Gaussians, {t['width']}x{t['height']}, 1 camera: fwd "
              f"{t['fwd_ms']:.3f} ms, f+b {t['fwd_bwd_ms']:.3f} ms, graph fwd {t['fwd_graph_ms']:.3f} ms, graph f+b "
              f"{t['fwd_bwd_graph_ms']:.3f} ms, mean alpha {t['alpha_mean']:.3f}")
        print("per-kernel, trained fwd (us per iteration):")
        for e in t["kernels_fwd"]:
            print(f"  {e['us_per_iter']:8.1f}  x{e['calls_per_iter']:<4g} {e['kernel']}")
        print("forward blend variants: " + "; ".join(f"{name}: graph fwd {r['fwd_graph_ms']:.3f} ms" for name, r in
                                                    t["fwd_variants"].items()))

    result = {"device": dev_name, "trained_run": trained, "torch": torch.__version__, "width": W, "height": H, "rows": rows,
              "kernels": breakdown, "host_us_15k_1cam": host, "host_profile_15k_1cam": host_tables,
              "bwd_variants": variants, "fwd_variants": fwd_variants,
              "notes": "ours called with check_finite=False (no host sync); gsplat "
              "rasterization(packed=True default, classic mode); fwd under no_grad; fwd+bwd = forward + "
              "torch.autograd.grad of the colour image w.r.t. means, quats, scales, opacities, colors"}
    out = opt.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  "rasterize_" + dev_name.replace(" ", "_") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
