"""``flashavatar bench``: frames per second of the per-frame pipeline FLAME -> MLP -> Gaussians -> rasterise -> image.

For each avatar size (``--uv-size``, default 128 and 256 on a GPU) and batch size (frames per call, default
1, 16, 64 on a GPU) it times, after warm-up, with CUDA events (median of ``--repeats`` calls):

* ``forward``: the ordinary path (``GaussianAvatar.forward`` + ``rasterize_gaussians``, as ``render`` uses it);
* ``fast <dtype>``: :class:`flashavatar.animate.Animator` (precomputed frame-independent work, FLAME on the used
  vertices only, the MLP in fp32 / bf16 / fp16), eager and replayed from one CUDA graph (``graph``);
* the same fast path with gsplat's ``rasterization`` as the rasteriser when gsplat is importable (eager only:
  gsplat reads the tile-intersection count back to the host, so it cannot be captured);

plus a per-stage breakdown (FLAME, MLP, assembly, rasterisation; each stage timed on its own, eager and as a
replayed graph; ``flame`` and ``assembly`` are the fused ops where the extension has them, ``flame_torch`` and
``assembly_torch`` the torch paths timed beside them) and peak GPU memory. ``--sweep-mlp-rows`` adds a table of the MLP chunk size (rows per chunk) against
the MLP stage time and the whole step's FPS. Prints tables and writes JSON with the device name. On a CPU it runs a
small configuration whose figures are labelled CPU (a smoke test of the path, not the GPU target).

The avatar is a trained run (``--run``) or, by default, an untrained one on the procedural head (written to
a cache folder when absent), so the benchmark needs no dataset.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .io_utils import atomic_write_text

STAGES = ("flame", "flame_torch", "mlp", "assembly", "assembly_torch", "raster", "raster_gsplat")


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


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    return 1e3 * statistics.median(time_fn(fn, device, warmup, repeats))


def capture(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph; returns the replay function. Warm-up runs on a side stream, with a
    synchronisation after each call (lets the rasteriser's asynchronous capacity read-back land)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
            torch.cuda.synchronize(device)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def front_camera(width: int, height: int, distance: float = 0.55, fov_deg: float = 30.0, center_y: float = -0.02):
    """A camera looking at the head from the front (OpenCV: x right, y down, z forward; head faces +z)."""
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


def frame_codes(base: dict[str, torch.Tensor], batch: int, device: torch.device, seed: int = 0) -> dict:
    """``batch`` different frames around ``base`` (small random expression, jaw and eyelid motion): real
    data, not zeros, so no path is timed on a degenerate input."""
    g = torch.Generator().manual_seed(seed)
    c = {k: v[:1].float().cpu() for k, v in base.items()}
    out = {"shape": c["shape"].expand(batch, -1).contiguous()}
    out["expr"] = c["expr"] + 0.5 * torch.randn(batch, c["expr"].shape[1], generator=g)
    out["jaw"] = c["jaw"] + 0.05 * torch.randn(batch, 6, generator=g)
    out["eyes"] = c["eyes"] + 0.02 * torch.randn(batch, 12, generator=g)
    out["eyelids"] = (c["eyelids"] + 0.3 * torch.rand(batch, 2, generator=g)).clamp(0, 1)
    return {k: v.to(device) for k, v in out.items()}


def batch_inputs(base: dict[str, torch.Tensor], batch: int, view: torch.Tensor, K: torch.Tensor,
                 device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One call's inputs for ``batch`` frames seen by the camera ``view [4, 4]``, ``K [3, 3]``: (FLAME codes
    from :func:`frame_codes`, viewmats ``[B, 1, 4, 4]``, Ks ``[B, 1, 3, 3]``, green backgrounds ``[B, 1, 3]``)."""
    codes = frame_codes(base, batch, device, seed=batch)
    views = view.to(device).expand(batch, 1, 4, 4).contiguous()
    ks = K.to(device).expand(batch, 1, 3, 3).contiguous()
    bg = torch.tensor([0.0, 1.0, 0.0], device=device).expand(batch, 1, 3).contiguous()
    return codes, views, ks, bg


def gsplat_rasterizer() -> tuple[Callable | None, str]:
    """gsplat's ``rasterization`` in our signature (classic mode), or ``(None, reason)``."""
    try:
        import gsplat
        from gsplat.cuda._backend import _C  # compiles its CUDA on first use

        if _C is None:
            return None, "gsplat CUDA backend unavailable"
    except Exception as exc:  # noqa: BLE001 - any import/compile failure means: no gsplat row
        return None, f"gsplat unavailable ({type(exc).__name__}: {exc})"

    def raster(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, sh_degree=None,
               backgrounds=None):
        # gsplat 1.5.3's packed path asserts backgrounds of shape [channels] whatever the batch, so the
        # background is composited here instead: render + (1 - alpha) * background.
        render, alpha, meta = gsplat.rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width,
                                                   height, sh_degree=sh_degree, near_plane=0.01,
                                                   rasterize_mode="classic")
        if backgrounds is not None:
            render = render + (1.0 - alpha) * backgrounds[..., None, None, :]
        return render, alpha, meta

    return raster, f"gsplat {gsplat.__version__}"


@torch.no_grad()
def bench_pipeline(avatar, codes: dict[str, torch.Tensor], view: torch.Tensor, K: torch.Tensor, width: int, height: int,
                   batch_sizes: list[int], device: torch.device, warmup: int = 3, repeats: int = 10,
                   sh_degree: int | None = None) -> list[dict[str, Any]]:
    """The ordinary path (``avatar(codes)`` + the picked rasteriser) for one camera: FPS and stage times per batch
    size (used by ``flashavatar demo``)."""
    from .rasterizer_choice import pick_rasterizer

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


def mlp_flops_per_frame(avatar) -> float:
    """Multiply-adds x 2 of the per-frame MLP work (the per-Gaussian half of layer 1 is precomputed)."""
    n = avatar.n_gaussians
    hidden = [m for m in avatar.mlp_hidden if isinstance(m, torch.nn.Linear)]
    heads = [avatar.mlp_out] + ([avatar.mlp_color] if getattr(avatar, "mlp_color", None) is not None else [])
    per = sum(m.in_features * m.out_features for m in hidden + heads)
    return 2.0 * n * per


def _torch_flame(animator, codes):
    """The Animator's torch FLAME (the fused flame_lbs op switched off for this call), for comparison."""
    fused, animator.fused_flame = animator.fused_flame, False
    try:
        return animator.vertices(codes)
    finally:
        animator.fused_flame = fused


@torch.no_grad()
def bench_avatar(avatar, base_codes: dict[str, torch.Tensor], width: int, height: int, batch_sizes: list[int],
                 device: torch.device, *, dtypes: list[str], warmup: int, repeats: int, graphs: bool,
                 gsplat_fn: Callable | None, log: Callable[[str], None] = print,
                 deadline: float | None = None, mlp_rows: int | None = None,
                 fused_mlp: bool = False) -> tuple[list[dict], list[dict]]:
    """Rows (one per pipeline variant and batch) and stage rows (one per dtype, batch and mode). Past
    ``deadline`` (``time.perf_counter()`` value) the remaining measurements are skipped and marked so."""
    skipped = "skipped: time budget (--max-seconds) used up"

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    from .animate import Animator, rasterize_with
    from .model import FlameCodes
    from .ops import rasterize_gaussians

    d = avatar.active_sh_degree
    k = (d + 1) ** 2
    view, K = front_camera(width, height)
    animators = {dt: Animator(avatar, mlp_dtype=dt, mlp_rows=mlp_rows, fused_mlp=fused_mlp) for dt in dtypes}
    log("fused MLP: " + ", ".join(f"{dt} {'yes' if an.fused_mlp else 'no'}" for dt, an in animators.items()))
    rows, stage_rows = [], []
    cuda = device.type == "cuda"

    def peak_reset():
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    for b in batch_sizes:
        codes, views, ks, bg = batch_inputs(base_codes, b, view, K, device)
        cond = FlameCodes.from_any(codes).condition()

        def add(pipeline, dtype, graph, raster, ms, mem, **extra):
            row = {"batch": b, "pipeline": pipeline, "mlp_dtype": dtype, "graph": graph, "rasterizer": raster,
                   "ms_per_call": ms, "fps": b / (ms / 1e3) if ms else None, "peak_mem_mib": mem,
                   "fused_mlp": animators[dtype].fused_mlp if dtype in animators else False, **extra}
            rows.append(row)
            log(f"  batch {b:>3} {pipeline:<18} {'graph' if graph else 'eager':<5} "
                + (f"{ms:9.3f} ms  {row['fps']:>10.1f} FPS" if ms else f"  {extra.get('error', '')}"))

        def measure(pipeline, dtype, graph, raster, make_fn):
            """One row; a failure is recorded (with its message) instead of ending the run."""
            if late():
                add(pipeline, dtype, graph, raster, None, None, error=skipped)
                return
            peak_reset()
            try:
                fn = make_fn()
                ms = median_ms(fn, device, warmup, repeats)
                add(pipeline, dtype, graph, raster, ms, peak())
            except Exception as exc:  # noqa: BLE001 - report, keep going
                add(pipeline, dtype, graph, raster, None, None, error=f"{type(exc).__name__}: {exc}")
            finally:
                fn = None

        # the ordinary path, as `flashavatar render` runs it
        def forward():
            g = avatar(codes)
            return rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"][:, :, :k], views,
                                       ks, width, height, sh_degree=d, backgrounds=bg)

        measure("forward", "fp32", False, "ours", lambda: forward)

        for dt, an in animators.items():
            # eager fast path, then its stages
            measure(f"fast {dt}", dt, False, "ours",
                    lambda: (lambda: an.render(codes, views, ks, width, height, backgrounds=bg)))
            verts = an.vertices(codes)
            raw, color = an.mlp_outputs(cond)  # color: None unless the avatar has a colour head
            g = an.assemble(verts, raw, None, color)
            stage_fns = {"flame": lambda: an.vertices(codes), "flame_torch": lambda: _torch_flame(an, codes),
                         "mlp": lambda: an.mlp_outputs(cond),
                         "assembly": lambda: an.assemble(verts, raw, None, color),
                         # the torch path of the assembly, for comparison when the fused op is in use
                         "assembly_torch": lambda: an._assemble_fn(verts, raw),
                         "raster": lambda: rasterize_with(None, g, views, ks, width, height, bg)}
            if gsplat_fn is not None:
                stage_fns["raster_gsplat"] = lambda: rasterize_with(gsplat_fn, g, views, ks, width, height, bg)
            modes = ["eager"] + (["graph"] if graphs else [])
            for mode in modes:
                st = {"batch": b, "mlp_dtype": dt, "mode": mode}
                for name, fn in stage_fns.items():
                    if mode == "graph" and name == "raster_gsplat":
                        continue  # not capturable
                    if late():
                        st[name], st[f"{name}_error"] = None, skipped
                        continue
                    try:
                        st[name] = median_ms(fn if mode == "eager" else capture(fn, device), device, warmup, repeats)
                    except Exception as exc:  # noqa: BLE001 - keep the other numbers
                        st[name] = None
                        st[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                mlp_ms = st.get("mlp")
                st["mlp_tflops"] = mlp_flops_per_frame(avatar) * b / (mlp_ms * 1e-3) / 1e12 if mlp_ms else None
                stage_rows.append(st)
            del verts, raw, g, stage_fns
            if gsplat_fn is not None:
                measure(f"fast {dt} + gsplat", dt, False, "gsplat",
                        lambda: (lambda: an.render(codes, views, ks, width, height, backgrounds=bg,
                                                   rasterizer=gsplat_fn)))
            if graphs and cuda:
                from .animate import GraphedRenderer

                measure(f"fast {dt}", dt, True, "ours",
                        lambda: GraphedRenderer(an, b, width, height, viewmats=views, Ks=ks, backgrounds=bg,
                                                codes=codes, warmup=warmup).replay)
    return rows, stage_rows


@torch.no_grad()
def bench_mlp_rows(avatar, base_codes: dict[str, torch.Tensor], width: int, height: int, batch_sizes: list[int],
                   device: torch.device, *, dtypes: list[str], rows_list: list[int], warmup: int, repeats: int,
                   graphs: bool, log: Callable[[str], None] = print, deadline: float | None = None) -> list[dict]:
    """MLP chunk size sweep: per batch size, MLP dtype and ``mlp_rows``, the MLP stage alone and the whole
    animate + render step (both replayed from a CUDA graph when ``graphs``, else eager)."""
    from .animate import Animator, GraphedRenderer, mlp_chunks
    from .model import FlameCodes

    view, K = front_camera(width, height)
    cuda = device.type == "cuda"
    use_graph = graphs and cuda
    out = []
    for b in batch_sizes:
        codes, views, ks, bg = batch_inputs(base_codes, b, view, K, device)
        cond = FlameCodes.from_any(codes).condition()
        for dt in dtypes:
            an = Animator(avatar, mlp_dtype=dt, fused_mlp=False)  # the chunked GEMMs: the fused MLP has no chunks
            for rows in rows_list:
                row = {"batch": b, "mlp_dtype": dt, "mlp_rows": rows, "graph": use_graph,
                       "chunks": len(mlp_chunks(b, avatar.n_gaussians, rows)), "mlp_ms": None, "ms_per_call": None}
                if deadline is not None and time.perf_counter() > deadline:
                    row["error"] = "skipped: time budget (--max-seconds) used up"
                    out.append(row)
                    continue
                an.mlp_rows = rows
                try:
                    mlp = lambda: an.mlp(cond)  # noqa: E731
                    row["mlp_ms"] = median_ms(capture(mlp, device) if use_graph else mlp, device, warmup, repeats)
                    row["mlp_tflops"] = mlp_flops_per_frame(avatar) * b / (row["mlp_ms"] * 1e-3) / 1e12
                    if use_graph:
                        step = GraphedRenderer(an, b, width, height, viewmats=views, Ks=ks, backgrounds=bg,
                                               codes=codes, warmup=warmup).replay
                    else:
                        step = lambda: an.render(codes, views, ks, width, height, backgrounds=bg)  # noqa: E731
                    row["ms_per_call"] = median_ms(step, device, warmup, repeats)
                    row["fps"] = b / (row["ms_per_call"] / 1e3)
                    step = None
                except Exception as exc:  # noqa: BLE001 - report, keep going
                    row["error"] = f"{type(exc).__name__}: {exc}"
                out.append(row)
                log(f"  mlp_rows {rows:>8} batch {b:>3} {dt:<4} chunks {row['chunks']:>4}: "
                    + (f"MLP {row['mlp_ms']:8.3f} ms  step {row['ms_per_call']:8.3f} ms  {row['fps']:>9.1f} FPS"
                       if row.get("ms_per_call") else row.get("error", "")[:120]))
    return out


@torch.no_grad()
def bench_compiled(avatar, base_codes: dict[str, torch.Tensor], width: int, height: int, batch: int,
                   device: torch.device, *, dtype: str, warmup: int, repeats: int,
                   log: Callable[[str], None] = print, backend: bool | str = True) -> tuple[dict, dict]:
    """The fast path with FLAME and the assembly through ``torch.compile`` (fused element-wise kernels), replayed
    from a CUDA graph: (row, stage row of the compiled stages)."""
    from .animate import Animator, GraphedRenderer
    from .model import FlameCodes

    view, K = front_camera(width, height)
    codes, views, ks, bg = batch_inputs(base_codes, batch, view, K, device)
    row = {"batch": batch, "pipeline": f"fast {dtype} compiled", "mlp_dtype": dtype, "graph": True,
           "rasterizer": "ours", "ms_per_call": None, "fps": None, "peak_mem_mib": None}
    st = {"batch": batch, "mlp_dtype": dtype, "mode": "graph+compile"}
    t0 = time.perf_counter()
    try:
        cuda = device.type == "cuda"
        an = Animator(avatar, mlp_dtype=dtype, compile=backend)
        verts = an.vertices(codes)  # compiles
        raw = an.mlp(FlameCodes.from_any(codes).condition())
        an.assemble(verts, raw)  # compiles
        row["compile_s"] = time.perf_counter() - t0
        graphed = (lambda fn: capture(fn, device)) if cuda else (lambda fn: fn)
        st["flame"] = median_ms(graphed(lambda: an.vertices(codes)), device, warmup, repeats)
        st["assembly"] = median_ms(graphed(lambda: an.assemble(verts, raw)), device, warmup, repeats)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        renderer = GraphedRenderer(an, batch, width, height, viewmats=views, Ks=ks, backgrounds=bg, codes=codes,
                                   warmup=warmup)
        row["ms_per_call"] = median_ms(renderer.replay, device, warmup, repeats)
        row["fps"] = batch / (row["ms_per_call"] / 1e3)
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        row["graph"] = renderer.graph is not None
        log(f"  batch {batch:>3} {row['pipeline']:<18} graph {row['ms_per_call']:9.3f} ms  {row['fps']:>10.1f} FPS"
            f"  (compile {row['compile_s']:.0f} s)")
    except Exception as exc:  # noqa: BLE001 - torch.compile may be unavailable (no Triton): report, keep going
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  batch {batch:>3} {row['pipeline']:<18} graph failed: {row['error'][:200]}")
    return row, st


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}" + ("" if result["device_type"] == "cuda" else
                                               "  [CPU figures: a smoke test, not the GPU target]"),
             f"animate + render at {result['resolution']}x{result['resolution']}, {result['source']}"]
    for cfg in result["configs"]:
        lines.append(f"\nuv_size {cfg['uv_size']}: {cfg['gaussians']} Gaussians, MLP {cfg['mlp_gflop_per_frame']:.2f}"
                     " GFLOP/frame")
        lines.append(f"{'batch':>5} {'pipeline':<20} {'mode':<5} {'ms/call':>9} {'FPS':>10} {'peak MiB':>9}")
        for r in cfg["rows"]:
            peak = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else "-"
            if r["ms_per_call"] is None:
                lines.append(f"{r['batch']:>5} {r['pipeline']:<20} {'graph' if r['graph'] else 'eager':<5} "
                             + ("" if r.get("error", "").startswith("skipped") else "failed: ")
                             + r.get("error", "")[:80])
                continue
            lines.append(f"{r['batch']:>5} {r['pipeline']:<20} {'graph' if r['graph'] else 'eager':<5} "
                         f"{r['ms_per_call']:>9.3f} {r['fps']:>10.1f} {peak:>9}")
        lines.append(f"stages (ms per call): {'batch':>5} {'dtype':<5} {'mode':<5} "
                     + " ".join(f"{s:>13}" for s in STAGES) + f" {'MLP TFLOP/s':>12}")
        for s in cfg["stages"]:
            vals = " ".join(f"{s[n]:>13.3f}" if s.get(n) is not None else f"{'-':>13}" for n in STAGES)
            tf = f"{s['mlp_tflops']:>12.1f}" if s.get("mlp_tflops") else f"{'-':>12}"
            lines.append(f"{'':21} {s['batch']:>5} {s['mlp_dtype']:<5} {s['mode']:<5} {vals} {tf}")
        if cfg.get("mlp_rows_sweep"):
            lines.append(f"MLP chunk sweep ({'graph' if cfg['mlp_rows_sweep'][0]['graph'] else 'eager'}): "
                         f"{'batch':>5} {'dtype':<5} {'mlp_rows':>9} {'chunks':>6} {'MLP ms':>9} {'TFLOP/s':>8} "
                         f"{'step ms':>9} {'FPS':>10}")
            for r in cfg["mlp_rows_sweep"]:
                if r.get("ms_per_call") is None:
                    lines.append(f"{'':38}{r['batch']:>5} {r['mlp_dtype']:<5} {r['mlp_rows']:>9} {r['chunks']:>6} "
                                 + r.get("error", "")[:80])
                    continue
                lines.append(f"{'':38}{r['batch']:>5} {r['mlp_dtype']:<5} {r['mlp_rows']:>9} {r['chunks']:>6} "
                             f"{r['mlp_ms']:>9.3f} {r['mlp_tflops']:>8.1f} {r['ms_per_call']:>9.3f} {r['fps']:>10.1f}")
    return "\n".join(lines)


def format_summary(result: dict[str, Any]) -> str:
    """A few lines per avatar: FPS of the ordinary path, the best eager fast path, the best graph replay and the
    gsplat-rasterised fast path, per batch size."""
    def best(rows, pred):
        ok = [r for r in rows if pred(r) and r.get("ms_per_call")]
        return max(ok, key=lambda r: r["fps"]) if ok else None

    def cell(r):
        return f"{r['fps']:>9.0f} ({r['mlp_dtype']})" if r else f"{'-':>16}"

    lines = [f"summary, frames/s at {result['resolution']}x{result['resolution']} on {result['device']}:",
             f"{'uv':>4} {'N':>6} {'batch':>5} {'forward':>9} {'fast eager':>16} {'fast graph':>16} "
             f"{'fast + gsplat':>16} {'graph / gsplat':>14}"]
    for cfg in result["configs"]:
        for b in sorted({r["batch"] for r in cfg["rows"]}):
            rows = [r for r in cfg["rows"] if r["batch"] == b]
            fwd = best(rows, lambda r: r["pipeline"] == "forward")
            eager = best(rows, lambda r: r["pipeline"].startswith("fast") and not r["graph"]
                         and r["rasterizer"] == "ours")
            graph = best(rows, lambda r: r["graph"])
            gs = best(rows, lambda r: r["rasterizer"] == "gsplat")
            ratio = f"{graph['fps'] / gs['fps']:>13.2f}x" if graph and gs else f"{'-':>14}"
            fwd_fps = f"{fwd['fps']:.0f}" if fwd else "-"
            lines.append(f"{cfg['uv_size']:>4} {cfg['gaussians']:>6} {b:>5} {fwd_fps:>9} "
                         f"{cell(eager)} {cell(graph)} {cell(gs)} {ratio}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", default=None,
                        help="trained run folder (default: an untrained avatar on the procedural head)")
    parser.add_argument("--head-model", metavar="PKL", default=None,
                        help="head model of the untrained avatar (default: the procedural head, written to "
                             "~/.cache/flashavatar/head_model when absent); its template OBJ must be beside it")
    parser.add_argument("--resolution", type=int, default=None, help="square image size in pixels (default 512 on a "
                                                                      "GPU, 128 on a CPU)")
    parser.add_argument("--uv-size", type=int, nargs="+", default=None,
                        help="UV grid(s) of the untrained avatar (default 128 256 on a GPU, 32 on a CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="frames per call (default 1 16 64 on a GPU, 1 4 on a CPU)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                        help="MLP precisions of the fast path (default fp32 bf16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    parser.add_argument("--no-gsplat", action="store_true", help="skip the gsplat rows")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile row (batch 1, graph replay; compiling takes ~tens of seconds)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget of the measurements; later rows are skipped and marked (default 150 on a "
                             "GPU, none on a CPU)")
    parser.add_argument("--mlp-rows", type=int, default=None, metavar="ROWS",
                        help="(frame, Gaussian) rows per MLP chunk in the main rows (default "
                             "flashavatar.animate.default_mlp_rows: 2^20 on a GPU, 32768 on the CPU)")
    parser.add_argument("--fused-mlp", choices=["on", "off"], default="off",
                        help="the reduced-precision MLP as one kernel (flashavatar.ops.fused_mlp; needs an sm_80+ GPU "
                             "with 198 KB of shared memory per block) instead of one cuBLAS GEMM per layer (default)")
    parser.add_argument("--sweep-mlp-rows", type=int, nargs="+", default=None, metavar="ROWS",
                        help="also time the MLP stage and the whole step (graph-replayed on a GPU) for each of these "
                             "chunk sizes, per avatar, batch size and reduced-precision dtype (fp32 when only fp32 "
                             "is asked for), e.g. 16384 32768 65536 131072 2000000")
    parser.add_argument("--sweep-only", action="store_true",
                        help="with --sweep-mlp-rows: skip the main rows and the compile row (a quick sweep)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", metavar="FILE", default=None, help="JSON output (default benchmarks/results/"
                                                                    "end_to_end_<device>.json)")


def _headline(configs: list[dict], batches: list[int]) -> list[dict]:
    """Per batch size of the first avatar: the fastest pipeline (and the ordinary path's FPS)."""
    out = []
    for b in batches:
        cand = [r for r in configs[0]["rows"] if r["batch"] == b and r["ms_per_call"]]
        if not cand:
            continue
        best = min(cand, key=lambda r: r["ms_per_call"])
        fwd = next((r for r in cand if r["pipeline"] == "forward"), None)
        out.append({"batch": b, "fps": best["fps"], "ms_per_call": best["ms_per_call"],
                    "pipeline": best["pipeline"] + (" graph" if best["graph"] else ""),
                    "fps_forward": fwd["fps"] if fwd else None, "uv_size": configs[0]["uv_size"]})
    return out


def _load_avatars(args, device, gpu):
    """[(uv_size or None, avatar, base codes, source)]."""
    if args.run:
        from .session import load_run

        session, _ = load_run(args.run, device, load_frames=False)
        avatar = session.avatar
        frames = session.train_frames if len(session.train_frames) else session.test_frames
        codes = {k: v[:1] for k, v in frames.codes.items()}
        avatar.active_sh_degree = avatar.max_sh_degree
        return [(avatar.uv_size, avatar.eval(), codes, f"run {args.run}")]
    from .model import FLAME, FlameCodes, GaussianAvatar

    pkl = Path(args.head_model) if args.head_model else default_head_model()
    if not pkl.is_file():
        raise FileNotFoundError(f"--head-model: file not found: {pkl}")
    flame = FLAME(pkl)
    out = []
    for uv in args.uv_size or ([128, 256] if gpu else [32]):
        avatar = GaussianAvatar(flame, pkl.parent / "head_template.obj", uv_size=uv)
        avatar.active_sh_degree = avatar.max_sh_degree
        codes = FlameCodes.neutral(1, flame.n_shape, flame.n_expr).as_dict()
        out.append((uv, avatar.to(device).eval(), codes,
                    f"untrained avatar on the procedural head ({pkl.parent})"))
    return out


def _default_mlp_rows(device: torch.device) -> int:
    from .animate import default_mlp_rows

    return default_mlp_rows(device)


def _fused_ops(device: torch.device) -> bool:
    """Whether the Animator runs FLAME and the assembly through the compiled ops here."""
    from .animate import _fused_assembly_available

    return _fused_assembly_available(device)


def run(args: argparse.Namespace) -> int:
    from .session import resolve_device

    try:
        device = resolve_device(args.device)
        gpu = device.type == "cuda"
        res = args.resolution or (512 if gpu else 128)
        batches = args.batch_sizes or ([1, 16, 64] if gpu else [1, 4])
        repeats = args.repeats or (20 if gpu else 3)
        warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
        dtypes = args.dtypes or ["fp32", "bf16"]
        if res < 8 or min(batches) < 1 or repeats < 1 or warmup < 0:
            raise ValueError("--resolution must be >= 8, --batch-sizes and --repeats >= 1, --warmup >= 0")
        sweep = getattr(args, "sweep_mlp_rows", None) or []
        mlp_rows = getattr(args, "mlp_rows", None)
        if min(sweep + ([mlp_rows] if mlp_rows is not None else []), default=1) < 1:
            raise ValueError("--mlp-rows and --sweep-mlp-rows must be >= 1")
        sweep_only = bool(getattr(args, "sweep_only", False))
        if sweep_only and not sweep:
            raise ValueError("--sweep-only needs --sweep-mlp-rows")
        avatars = _load_avatars(args, device, gpu)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"flashavatar bench: error: {exc}")
        return 2
    label = device_label(device)
    gsplat_fn, gsplat_note = (None, "skipped (--no-gsplat)") if args.no_gsplat else (
        (None, "skipped (needs CUDA)") if not gpu else gsplat_rasterizer())
    print(f"flashavatar bench on {label}; gsplat: {gsplat_note}", flush=True)
    t0 = time.perf_counter()
    budget = args.max_seconds if args.max_seconds is not None else (150.0 if gpu else None)
    deadline = None if budget is None or budget <= 0 else t0 + budget
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"end_to_end_{device.type}.json"
    configs = []
    result: dict[str, Any] = {}
    keep_first = None
    for uv, avatar, codes, source in avatars:
        print(f"uv_size {uv}: {avatar.n_gaussians} Gaussians", flush=True)
        rows, stages = [], []
        if not sweep_only:
            rows, stages = bench_avatar(avatar, codes, res, res, batches, device, dtypes=dtypes, warmup=warmup,
                                        repeats=repeats, graphs=gpu and not args.no_graphs, gsplat_fn=gsplat_fn,
                                        log=lambda s: print(s, flush=True), deadline=deadline, mlp_rows=mlp_rows,
                                        fused_mlp=getattr(args, "fused_mlp", "off") == "on")
        cfg = {"uv_size": uv, "gaussians": avatar.n_gaussians,
               "mlp_gflop_per_frame": mlp_flops_per_frame(avatar) / 1e9, "rows": rows, "stages": stages}
        configs.append(cfg)
        if sweep:
            sweep_dtypes = [dt for dt in dtypes if dt != "fp32"] or dtypes
            cfg["mlp_rows_sweep"] = bench_mlp_rows(avatar, codes, res, res, batches, device, dtypes=sweep_dtypes,
                                                   rows_list=sweep, warmup=warmup, repeats=repeats,
                                                   graphs=gpu and not args.no_graphs,
                                                   log=lambda s: print(s, flush=True), deadline=deadline)
        if (gpu and not args.no_graphs and not args.no_compile and not sweep_only and not configs[1:]
                and min(batches) == 1):
            # last in the run, when at least 60 s of the budget are left (compiling takes a while): the default
            # avatar at batch 1
            keep_first = (avatar, codes)
        del avatar
        result = {"device": label, "device_type": device.type, "resolution": res, "source": avatars[0][3],
                  "rows": _headline(configs, batches), "torch": torch.__version__, "gsplat": gsplat_note,
                  "repeats": repeats, "warmup": warmup, "seconds": time.perf_counter() - t0, "configs": configs,
                  "mlp_rows": mlp_rows or _default_mlp_rows(device), "fused_ops": _fused_ops(device)}
        atomic_write_text(out, json.dumps(result, indent=1))  # after every avatar: a cut-off run keeps its rows
    if keep_first is not None and (deadline is None or time.perf_counter() < deadline - 60):
        reduced = [dt for dt in dtypes if dt != "fp32"] or dtypes
        row, st = bench_compiled(keep_first[0], keep_first[1], res, res, 1, device, dtype=reduced[0], warmup=warmup,
                                 repeats=repeats, log=lambda s: print(s, flush=True))
        configs[0]["rows"].append(row)
        configs[0]["stages"].append(st)
        result["rows"] = _headline(configs, batches)
        result["seconds"] = time.perf_counter() - t0
        atomic_write_text(out, json.dumps(result, indent=1))
    keep_first = None
    print(format_table(result))
    print(format_summary(result))
    print(f"results: {out} ({result['seconds']:.0f} s)")
    return 0
