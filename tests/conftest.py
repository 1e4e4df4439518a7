import importlib.util

import pytest
import torch


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
