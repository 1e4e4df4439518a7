"""SSIM loss forward + backward: the fused op (``csrc/ssim/``) against the PyTorch formulation (pads and
separable convolutions, ``metrics.ssim_map(blur="conv")``) and the float64 banded-GEMM blur ("matmul64").

The training step's perceptual term: ``1 - SSIM`` of [frames, 512, 512, 3] float32 images, masked images in the
trainer. Prints a table and writes JSON (atomically) with the device name; median of timed calls after warm-up
(CUDA events on a GPU).

    python benchmarks/bench_ssim.py --out benchmarks/results/ssim_<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashavatar import losses  # noqa: E402
from flashavatar.bench import device_label, median_ms  # noqa: E402
from flashavatar.io_utils import atomic_write_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--blurs", nargs="+", default=["fused", "conv", "matmul64"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (50 if device.type == "cuda" else 3)
    rows = []
    print(f"device: {device_label(device)}; 1 - SSIM, forward + backward, float32, {args.size}x{args.size}x3")
    print(f"{'frames':>6} {'blur':>9} {'ms':>9} {'x fused':>8}")
    for frames in args.frames:
        gen = torch.Generator().manual_seed(frames)
        pred = torch.rand(frames, args.size, args.size, 3, generator=gen).to(device).requires_grad_(True)
        gt = torch.rand(frames, args.size, args.size, 3, generator=gen).to(device)
        fused_ms = None
        for blur in args.blurs:
            def step(blur=blur):
                pred.grad = None
                losses.ssim_loss(pred, gt, blur=blur).backward()

            ms = median_ms(step, device, warmup=3, repeats=repeats)
            fused_ms = ms if blur == "fused" else fused_ms
            ratio = ms / fused_ms if fused_ms else float("nan")
            rows.append({"frames": frames, "blur": blur, "ms": ms})
            print(f"{frames:>6} {blur:>9} {ms:>9.3f} {ratio:>8.1f}")
    if args.out:
        result = {"device": device_label(device), "torch": torch.__version__, "size": args.size, "rows": rows}
        atomic_write_text(args.out, json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
