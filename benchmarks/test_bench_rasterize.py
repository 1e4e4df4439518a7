"""pytest-benchmark cases for the rasteriser (GPU only): ``pytest benchmarks/test_bench_rasterize.py``.

The full side-by-side table with gsplat is ``python benchmarks/bench_rasterize.py``.
"""

import pytest
import torch

from bench_rasterize import H, W, ours_fns, scene

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("n", [15_000, 50_000, 200_000])
@pytest.mark.parametrize("cams", [1, 16])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_rasterize(benchmark, n, cams, mode):
    args = scene(n, cams)
    fwd, fwd_bwd, _ = ours_fns(args, torch.rand(cams, H, W, 3, device="cuda"))
    fn = _sync(fwd if mode == "fwd" else fwd_bwd)
    for _ in range(5):
        fn()
    benchmark.pedantic(fn, rounds=30, iterations=1)
