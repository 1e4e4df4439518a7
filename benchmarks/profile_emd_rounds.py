"""Where the auction's time goes on the GPU: time to run the first R bidding rounds (max_iter = R) of one problem.

The rounds are the CPU twin's rounds (same count of bidders in each), so the times of successive prefixes give
the cost of each stretch of rounds. With FLASHAVATAR_EMD_PROFILE=1 in the environment the op also prints, per
item, the kernel's clock cycles in rounds of 1, 2-32 and more bidders and in the certificates; `--sections`
then runs only the full solves of the given sizes (one call each, after a warm-up).

    python benchmarks/profile_emd_rounds.py --n 4096 --b 1
    FLASHAVATAR_EMD_PROFILE=1 python benchmarks/profile_emd_rounds.py --sections --n 1024 2048 4096 --b 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flashavatar.ops as ops  # noqa: E402


def median_ms(fn, repeats=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[4096])
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--sections", action="store_true", help="one full solve per size (kernel cycle split)")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    for n in args.n:
        profile_size(n, args)


def points(n, b):
    gen = torch.Generator().manual_seed(n * 31 + b)  # bench_emd's points (seed 0)
    return torch.rand(b, n, 3, generator=gen).cuda(), torch.rand(b, n, 3, generator=gen).cuda()


def profile_size(n, args):
    x, y = points(n, args.b)
    if args.sections:
        ops.emd(x[:, :64].contiguous(), y[:, :64].contiguous(), tol=args.tol, validate=False)  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        res = ops.emd(x, y, tol=args.tol, return_info=True, validate=False)
        end.record()
        torch.cuda.synchronize()
        print(f"N={n} B={args.b}: {start.elapsed_time(end):.2f} ms, rounds {res.iterations.tolist()}", flush=True)
        return
    full = ops.emd(x, y, tol=args.tol, return_info=True, validate=False)
    total = int(full.iterations.max())
    print(f"N={n} B={args.b}: {total} rounds, converged {bool(full.converged.all())}", flush=True)
    print(f"{'max_iter':>9} {'ms':>9} {'d ms':>8} {'us/round':>9}")
    prev_r, prev_ms = 0, 0.0
    for k in range(1, args.steps + 1):
        r = max(1, total * k // args.steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ms = median_ms(lambda: ops.emd(x, y, tol=args.tol, max_iter=r, validate=False))
        print(f"{r:9d} {ms:9.2f} {ms - prev_ms:8.2f} {1e3 * (ms - prev_ms) / max(1, r - prev_r):9.2f}", flush=True)
        prev_r, prev_ms = r, ms


if __name__ == "__main__":
    main()
