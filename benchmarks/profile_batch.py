"""Where a batched animate + render call spends its GPU time (issue 6: 20,000 frames/s at batch 64).

1. Per-kernel split of one eager ``Animator.render`` call (torch.profiler, CUDA kernels only), for the untrained
   benchmark avatar (procedural head, ``--uv-size``) at each ``--batch-sizes``.
2. The MLP's hidden layer in isolation at the batch-64 row count: the bf16 GEMM with cuBLASLt's bias + ReLU
   epilogue (what the Animator runs), the fused MLP kernel (all layers), and fp8 e4m3 GEMMs through
   ``torch._scaled_mm`` (bf16 output, fp8 output), with the ReLU + fp8 cast they would need between layers.

Prints tables; ``--out`` writes them as JSON with the device name. GPU only.

    python benchmarks/profile_batch.py --batch-sizes 1 64 --out profile.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from flashavatar.bench import batch_inputs, default_head_model, frame_codes, front_camera, median_ms
from flashavatar.io_utils import atomic_write_text


def kernel_split(fn, device, calls: int = 5) -> list[tuple[str, float, float]]:
    """[(kernel name, µs per call, launches per call)] of ``fn``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            count[ev.name] += 1
    rows = [(name, t / calls, count[name] / calls) for name, t in total.items()]
    return sorted(rows, key=lambda r: -r[1])


def print_split(title: str, rows) -> None:
    s = sum(r[1] for r in rows)
    print(f"\n{title}: {s:.1f} us of kernels per call")
    for name, us, n in rows[:22]:
        print(f"  {us:9.1f} us {100 * us / s:5.1f}%  x{n:5.1f}  {name[:110]}")


def mlp_layer_variants(rows: int, device, warmup: int, repeats: int) -> dict[str, float]:
    """ms per hidden layer (256 -> 256) over ``rows`` rows, each variant; errors as strings."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, 256, device=device, generator=g).relu_().to(torch.bfloat16)
    w = (torch.randn(256, 256, device=device, generator=g) / 16).to(torch.bfloat16)  # [out, in]
    b = torch.randn(256, device=device, generator=g).to(torch.bfloat16)
    out: dict[str, float | str] = {}

    def run(name, fn):
        try:
            out[name] = median_ms(fn, device, warmup, repeats)
        except Exception as exc:  # noqa: BLE001 - a variant torch does not have here: note it, keep going
            out[name] = f"{type(exc).__name__}: {str(exc)[:160]}"

    wt = w.t()
    run("bf16 addmm+relu (cuBLASLt epilogue)", lambda: torch._addmm_activation(b, h, wt))
    run("bf16 mm only", lambda: torch.mm(h, wt))
    f8 = torch.float8_e4m3fn
    h8 = h.to(f8)
    w8t = w.to(f8).t()  # column-major [in, out], as _scaled_mm wants its second operand
    one = torch.ones((), device=device)
    run("fp8 scaled_mm -> bf16 + bias", lambda: torch._scaled_mm(h8, w8t, one, one, bias=b, out_dtype=torch.bfloat16))
    run("fp8 scaled_mm -> bf16 + bias, fast accum",
        lambda: torch._scaled_mm(h8, w8t, one, one, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True))
    run("fp8 scaled_mm -> fp8 (no bias)", lambda: torch._scaled_mm(h8, w8t, one, one, scale_result=one, out_dtype=f8))
    run("fp8 scaled_mm -> fp8, fast accum",
        lambda: torch._scaled_mm(h8, w8t, one, one, scale_result=one, out_dtype=f8, use_fast_accum=True))
    y = torch.mm(h, wt)
    run("relu + cast bf16 -> fp8 (eager)", lambda: torch.relu(y).to(f8))
    try:
        relu_cast = torch.compile(lambda t: torch.relu(t).to(f8), dynamic=False)
        run("relu + cast bf16 -> fp8 (compiled)", lambda: relu_cast(y))
    except Exception as exc:  # noqa: BLE001
        out["relu + cast bf16 -> fp8 (compiled)"] = f"{type(exc).__name__}: {exc}"
    rs_a = torch.ones(rows, 1, device=device)
    rs_b = torch.ones(1, 256, device=device)
    run("fp8 scaled_mm rowwise scales -> bf16 + bias",
        lambda: torch._scaled_mm(h8, w8t, rs_a, rs_b, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uv-size", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--kernels-only", action="store_true", help="only the per-kernel split (no MLP variants)")
    args = ap.parse_args()
    device = torch.device("cuda")
    from flashavatar.animate import Animator
    from flashavatar.model import FLAME, FlameCodes, GaussianAvatar

    pkl = default_head_model()
    flame = FLAME(pkl)
    avatar = GaussianAvatar(flame, pkl.parent / "head_template.obj", uv_size=args.uv_size).to(device).eval()
    avatar.active_sh_degree = avatar.max_sh_degree
    base = FlameCodes.neutral(1, flame.n_shape, flame.n_expr).as_dict()
    an = Animator(avatar, mlp_dtype="bf16")
    view, K = front_camera(args.size, args.size)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "uv_size": args.uv_size,
              "n_gaussians": avatar.n_gaussians, "kernels": {}, "mlp_layer_ms": {}}
    for b in args.batch_sizes:
        codes, views, ks, bg = batch_inputs(base, b, view, K, device)
        with torch.no_grad():
            rows = kernel_split(lambda: an.render(codes, views, ks, args.size, args.size, backgrounds=bg), device)
        print_split(f"batch {b}, uv {args.uv_size}, eager render", rows)
        result["kernels"][str(b)] = [{"name": n, "us_per_call": us, "launches": c} for n, us, c in rows]
    if args.kernels_only:
        if args.out:
            atomic_write_text(args.out, json.dumps(result, indent=1))
        return
    rows_mlp = 64 * avatar.n_gaussians
    layer = mlp_layer_variants(rows_mlp, device, warmup=3, repeats=20)
    print(f"\nMLP hidden layer 256 -> 256 over {rows_mlp} rows (batch 64), ms:")
    flop = 2 * rows_mlp * 256 * 256
    for name, v in layer.items():
        print(f"  {name:<48} " + (f"{v:8.3f} ms  {flop / v / 1e9:7.1f} TFLOP/s" if isinstance(v, float) else v))
    result["mlp_layer_ms"] = layer
    if an.h_pe.shape[1] == 256:
        from flashavatar.ops import fused_mlp_supported

        if fused_mlp_supported(device, torch.bfloat16):
            fused = Animator(avatar, mlp_dtype="bf16", fused_mlp=True)
            torch_ends = Animator(avatar, mlp_dtype="bf16")
            torch_ends.mlp_layer_ops = False
            cond = FlameCodes.from_any(frame_codes(base, 64, device)).condition()
            with torch.no_grad():
                for name, a in (("mlp_input + cuBLAS + mlp_head", an), ("torch first/last layers", torch_ends),
                                ("fused kernel", fused)):
                    ms = median_ms(lambda: a.mlp_outputs(cond), device, 3, 20)
                    print(f"  whole MLP, batch 64, {name:<30} {ms:8.3f} ms")
                    result["mlp_layer_ms"][f"whole MLP batch 64, {name}"] = ms
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
