"""Benchmark of flashavatar.ops.emd (exact, GPU) against POT's ot.emd2 (exact, CPU) and geomloss Sinkhorn (GPU).

N = M in {1024, 2048, 4096, 8192}, B in {1, 8, 16}, d = 3, float32 points uniform in the unit cube.
Prints a table and writes JSON (atomically) with the device name, times (median of CUDA-event timings after a
warm-up), peak memory, iterations and relative errors against POT (computed in parallel CPU processes for the
sizes where POT finishes in reasonable time; elsewhere the certified bound gap/cost is reported).

    python benchmarks/bench_emd.py --out benchmarks/results/emd_h100.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flashavatar.ops as ops  # noqa: E402

SIZES = (1024, 2048, 4096, 8192)
BATCHES = (1, 8, 16)


def make_points(b, n, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed * 1000003 + n * 31 + b)
    return torch.rand(b, n, d, generator=gen), torch.rand(b, n, d, generator=gen)


def pot_solve(args):
    """One exact POT solve (in a worker process): returns (cost, seconds)."""
    import ot

    x, y = args
    n, m = len(x), len(y)
    cost = ((x[:, None, :].astype(np.float64) - y[None, :, :].astype(np.float64)) ** 2).sum(-1)
    t0 = time.perf_counter()
    value = ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost, numItermax=10**8)
    return float(value), time.perf_counter() - t0


def cuda_time(fn, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "emd.json"))
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    parser.add_argument("--tol", type=float, default=1e-5, help="emd tolerance (target: <= 2e-5 relative error)")
    parser.add_argument("--pot-max-n", type=int, default=4096, help="largest N solved by POT (all items)")
    parser.add_argument("--pot-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--no-geomloss", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="point clouds of another seed (same sizes)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip the remaining GPU configs after this")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    dev = torch.device("cuda")
    device_name = torch.cuda.get_device_name(dev)
    print(f"device: {device_name}; torch {torch.__version__}; emd tol {args.tol}", flush=True)

    # POT references in the background, one process per problem (exact; the slowest part of the run).
    pool = cf.ProcessPoolExecutor(max_workers=args.pot_workers, mp_context=multiprocessing.get_context("spawn"))
    pot_jobs = {}
    for n in args.sizes:
        if n > args.pot_max_n:
            continue
        for b in args.batches:
            x, y = make_points(b, n, seed=args.seed)
            for bi in range(b):
                pot_jobs[(n, b, bi)] = pool.submit(pot_solve, (x[bi].numpy(), y[bi].numpy()))

    geomloss = None
    if not args.no_geomloss:
        try:
            from geomloss import SamplesLoss

            geomloss = SamplesLoss("sinkhorn", p=2, blur=0.01, backend="tensorized")
        except Exception as exc:  # pragma: no cover
            print(f"geomloss unavailable: {exc}", flush=True)

    rows = []
    payload = {"device": device_name, "torch": torch.__version__, "host": platform.node(), "tol": args.tol,
               "seed": args.seed,
               "geomloss": "SamplesLoss('sinkhorn', p=2, blur=0.01, backend='tensorized'), cost |x-y|^2/2 -> x2",
               "rows": rows}
    t_start = time.perf_counter()
    for n in args.sizes:
        for b in args.batches:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"N={n} B={b}: skipped (time budget)", flush=True)
                continue
            x, y = make_points(b, n, seed=args.seed)
            xc, yc = x.to(dev), y.to(dev)
            torch.cuda.reset_peak_memory_stats()
            ms, res = cuda_time(lambda: ops.emd(xc, yc, tol=args.tol, return_info=True, validate=False), args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**20
            row = {"n": n, "b": b, "emd_ms": ms, "emd_ms_per_item": ms / b, "emd_peak_mib": peak,
                   "emd_converged": bool(res.converged.all()), "emd_rounds_max": int(res.iterations.max()),
                   "emd_certified_rel_gap_max": float((res.gap / res.cost.double()).max())}
            cost = res.cost.double().cpu()
            if geomloss is not None:
                try:
                    gms, gl = cuda_time(lambda: geomloss(xc, yc), args.repeats)
                    row["geomloss_ms"] = gms
                    row["geomloss_value"] = (2 * gl.double().cpu()).tolist()
                except Exception as exc:  # out of memory at the largest sizes
                    row["geomloss_error"] = str(exc)[:200]
                    torch.cuda.empty_cache()
            row["emd_cost"] = cost.tolist()
            rows.append(row)
            print(f"N={n:5d} B={b:2d}  emd {ms:9.2f} ms ({ms / b:8.2f} ms/item) rounds<= {row['emd_rounds_max']:6d} "
                  f"certified gap <= {row['emd_certified_rel_gap_max']:.1e}"
                  + (f"  geomloss {row['geomloss_ms']:8.2f} ms" if "geomloss_ms" in row else ""), flush=True)
            write_json(args.out, payload)

    # Errors against POT once its solves are in.
    print("\nwaiting for POT...", flush=True)
    print(f"\n{'N':>5} {'B':>3} | {'emd ms':>9} {'emd rel err':>11} | {'POT s/item':>10} | {'geomloss ms':>11} {'geo rel err':>11}")
    for row in rows:
        n, b = row["n"], row["b"]
        refs = []
        for bi in range(b):
            job = pot_jobs.get((n, b, bi))
            if job is None:
                break
            try:
                refs.append(job.result(timeout=900))
            except Exception as exc:
                row["pot_error"] = str(exc)[:200]
                break
        if len(refs) == b:
            ref = np.array([r[0] for r in refs])
            row["pot_cost"] = ref.tolist()
            row["pot_s_per_item"] = float(np.median([r[1] for r in refs]))
            row["emd_rel_err_max"] = float(np.max(np.abs(np.array(row["emd_cost"]) - ref) / ref))
            if "geomloss_value" in row:
                row["geomloss_rel_err_max"] = float(np.max(np.abs(np.array(row["geomloss_value"]) - ref) / ref))
        fmt = lambda v, f: (f % v) if v is not None else "n/a"  # noqa: E731
        print(f"{n:5d} {b:3d} | {row['emd_ms']:9.2f} {fmt(row.get('emd_rel_err_max'), '%11.1e')} | "
              f"{fmt(row.get('pot_s_per_item'), '%10.2f')} | {fmt(row.get('geomloss_ms'), '%11.2f')} "
              f"{fmt(row.get('geomloss_rel_err_max'), '%11.1e')}", flush=True)
        write_json(args.out, payload)
    pool.shutdown(cancel_futures=True)
    print(f"\nwrote {args.out}")


# ---- pytest-benchmark cases (run with `pytest benchmarks/bench_emd.py`; need a GPU) ----
def _bench_case(benchmark, n, b):
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, y = make_points(b, n)
    xc, yc = x.cuda(), y.cuda()

    def run():
        out = ops.emd(xc, yc, tol=1e-5, validate=False)
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_bench_emd_n4096_b1(benchmark):
    _bench_case(benchmark, 4096, 1)


def test_bench_emd_n2048_b16(benchmark):
    _bench_case(benchmark, 2048, 16)


if __name__ == "__main__":
    main()
