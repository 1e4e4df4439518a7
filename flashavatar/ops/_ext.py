"""Loading of the compiled extension ``flashavatar._C``.

The extension registers its ops under ``torch.ops.flashavatar`` when it is imported. It is imported once,
here, at import time of ``flashavatar.ops``; a missing or CPU-only build is remembered and reported only when
an op actually needs it, with a message that says how to fix it.
"""

from __future__ import annotations

import torch

_C = None
_LOAD_ERROR: BaseException | None = None

try:  # pragma: no branch
    from flashavatar import _C  # noqa: F401  (import registers the ops)
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = exc

_BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `make build`); set CUDA_HOME to the CUDA toolkit root (the folder above nvcc's bin/) "
    "so the CUDA kernels are compiled"
)


def available() -> bool:
    """True when the compiled extension loaded."""
    return _C is not None


def cuda_compiled() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_compiled())


def require(op: str, device: torch.device | None = None) -> None:
    """Raise a clear error if ``op`` cannot run on ``device`` with the extension as built."""
    if _C is None:
        raise RuntimeError(
            f"flashavatar.{op}: the compiled extension flashavatar._C is not available "
            f"({type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}); {_BUILD_HINT}"
        )
    if device is not None and device.type == "cuda" and not cuda_compiled():
        raise RuntimeError(
            f"flashavatar.{op}: got CUDA tensors but flashavatar._C was built without CUDA kernels "
            f"(nvcc was not found at build time); {_BUILD_HINT}"
        )
