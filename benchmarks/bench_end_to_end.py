"""End-to-end frames per second: FLAME -> MLP -> Gaussians -> rasterise -> image (the `flashavatar bench` command).

Usage: python benchmarks/bench_end_to_end.py [--out DIR_OR_FILE] [flashavatar bench options...]

On a GPU: the default avatar (uv_size 128) and the large one (uv_size 256) at 512x512, batches of 1, 16 and 64
frames per call, the ordinary forward, the fast path (fp32 and bf16 MLP) eager and replayed from a CUDA graph,
and the same with gsplat's rasteriser when gsplat is importable. On a CPU: a small configuration (uv_size 32,
128x128), labelled as CPU figures. Writes ``end_to_end_<device>.json`` into DIR (or the given .json file) and
prints the tables. See benchmarks/NOTES_end_to_end.md for the analysis.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashavatar import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler="resolve",
                                     epilog="Example (H100, the MLP chunk sweep only): python "
                                            "benchmarks/bench_end_to_end.py --sweep-mlp-rows 16384 32768 65536 "
                                            "131072 2000000 --sweep-only --dtypes bf16")
    bench.add_arguments(parser)  # every `flashavatar bench` option, documented in --help
    parser.add_argument("--out", default="benchmarks/results",
                        help="folder (or .json file) for the results (default benchmarks/results; the file is "
                             "end_to_end_<device>.json)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".json":
        if torch.cuda.is_available():
            name = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
        else:
            name = "cpu"
        out = out / f"end_to_end_{name}.json"
    args.out = str(out)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
