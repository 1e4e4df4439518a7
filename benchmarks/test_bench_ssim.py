"""pytest-benchmark cases for the SSIM loss, forward + backward (GPU only): ``pytest benchmarks/test_bench_ssim.py``.

The table with every blur is ``python benchmarks/bench_ssim.py``.
"""

import pytest
import torch

from flashavatar import losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("blur", ["fused", "conv"])
def test_ssim_loss(benchmark, frames, blur):
    pred = torch.rand(frames, 512, 512, 3, device="cuda", requires_grad=True)
    gt = torch.rand(frames, 512, 512, 3, device="cuda")

    def step():
        pred.grad = None
        losses.ssim_loss(pred, gt, blur=blur).backward()
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    benchmark(step)
