import os

import pytest

import flashavatar.ops as ops


def test_extension_loads():
    assert ops.available(), "flashavatar._C did not load; run `make build`"


@pytest.mark.skipif(os.environ.get("FORCE_CUDA") != "1", reason="only checked where FORCE_CUDA=1 (CI)")
def test_cuda_kernels_compiled():
    # CI sets FORCE_CUDA=1: the kernels must have been compiled even without a GPU.
    assert ops.cuda_compiled()
