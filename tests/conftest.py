import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench(request):
    """The benchmark script ``benchmarks/<BENCH_SCRIPT>.py`` of the requesting test module, loaded as a module
    (the benchmarks are scripts, not a package)."""
    name = request.module.BENCH_SCRIPT
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    # Tests that need hardware or an optional plugin skip, with the reason, where it is missing.
    skips = {}
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        skips["video"] = pytest.mark.skip(reason="needs imageio-ffmpeg (MP4 encode/decode), a declared dependency")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
