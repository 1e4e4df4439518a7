"""End-to-end frames per second: FLAME -> avatar -> rasterise -> image (the `flashavatar bench` command).

Usage: python benchmarks/bench_end_to_end.py [--out DIR_OR_FILE] [flashavatar bench options...]

Runs the default avatar (uv_size 128) and, on a GPU, the large one (uv_size 256), at 512x512 on a GPU
(128x128 on a CPU, labelled as CPU figures), prints the tables and writes one JSON per configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashavatar import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder (or .json file) for the results")
    args, rest = parser.parse_known_args(argv)
    out = Path(args.out)
    gpu = torch.cuda.is_available()
    sizes = [128, 256] if gpu else [32]
    status = 0
    for uv in sizes:
        target = out if out.suffix == ".json" and len(sizes) == 1 else (
            out.parent if out.suffix == ".json" else out) / f"end_to_end_{'cuda' if gpu else 'cpu'}_uv{uv}.json"
        sub = argparse.ArgumentParser()
        bench.add_arguments(sub)
        ns = sub.parse_args(["--uv-size", str(uv), "--out", str(target)] + rest)
        status |= bench.run(ns)
    return status


if __name__ == "__main__":
    sys.exit(main())
