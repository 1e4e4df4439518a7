"""Differentiable Gaussian rasterisation: ``rasterize_gaussians`` (SPEC §6), gsplat-compatible names.

The work is done by the dispatcher op ``torch.ops.flashavatar.rasterize`` (differentiable, autograd kernel in C++)
over the raw kernels ``rasterize_fwd`` / ``rasterize_bwd`` (C++/CUDA in ``csrc/rasterizer``); this module validates
inputs, attaches fake kernels with ``torch.library`` and keeps, per device, the capacity of the tile-intersection
buffer.

The CUDA path never synchronises with the host: the intersection buffer has a capacity chosen here from the
previous call's need (read back asynchronously through pinned memory once its event has completed), the
kernels never write past it, and images whose intersections did not fit are rendered exactly by a fallback
that walks their depth-sorted Gaussian list. So the op can be captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _ext

__all__ = ["rasterize_gaussians"]

_TILE = 16
_OP = "rasterize_gaussians"
# Tests set this to force a tiny intersection capacity (exercises the overflow fallback).
_FORCE_CAPACITY: int | None = None


# ---------------------------------------------------------------------------------------------------------
# Dispatcher registrations (fake kernels), done once the extension has loaded.

def _chunk_state_numel(images: int, tiles: int, height: int, width: int, channels: int, capacity: int) -> int:
    """Size of the forward's chunk state (chunk_state_numel in csrc/rasterizer/rasterizer.cu: keep in step)."""
    slots = (capacity + 255) // 256
    n = (slots * 256 + images * height * width) * (2 + channels)
    return n if images * tiles <= 4096 and n * 4 <= (256 << 20) else 0


def _fwd_fake(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height, sh_degree,
              near_plane, far_plane, eps2d, capacity):
    B, N = means.shape[0], means.shape[1]
    C, D = viewmats.shape[1], colors.shape[3]
    H, W = height, width
    f = means.new_empty
    i = lambda *s: means.new_empty(s, dtype=torch.int32)  # noqa: E731
    if means.device.type == "cuda":
        tiles = ((W + _TILE - 1) // _TILE) * ((H + _TILE - 1) // _TILE)
        tiling = (i(B * C * N), i(capacity), i(B * C * tiles, 2), i(B * C * N),
                  f((_chunk_state_numel(B * C, tiles, H, W, D, capacity),)))
    else:
        tiling = (i(0), i(0), i(0, 2), i(0), f((0,)))
    return (f((B, C, H, W, D)), f((B, C, H, W, 1)), f((B, C, H, W, 1)), i(B, C, N), f((B, C, N, 2)),
            f((B, C, N, 3)), f((B, C, N, D)), f((B, C, N)), i(B, C, H, W), f((B, C, H, W))) + tiling


def _bwd_fake(means, quats, scales, opacities, colors, *rest):
    return (torch.empty_like(means), torch.empty_like(quats), torch.empty_like(scales), torch.empty_like(opacities),
            torch.empty_like(colors))


def _rasterize_fake(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height, sh_degree,
                    near_plane, far_plane, eps2d, capacity):
    # flashavatar::rasterize: rasterize_fwd on the [B, ...] views, user-facing outputs in the caller's batch dims.
    batch, N = tuple(means.shape[:-2]), means.shape[-2]
    B = math.prod(batch)
    C, D = viewmats.shape[-3], colors.shape[-1]
    K = 1 if sh_degree < 0 else colors.shape[-2]
    out = _fwd_fake(means.new_empty((B, N, 3)), None, None, None, colors.new_empty((B, N, K, D)),
                    viewmats.new_empty((B, C, 4, 4)), None, None, width, height, sh_degree, near_plane, far_plane,
                    eps2d, capacity)
    return tuple(t.new_empty(batch + tuple(t.shape[1:])) for t in out[:8]) + out[8:]


_registered = False


def _register() -> None:
    global _registered
    if _registered or not _ext.available():
        return
    torch.library.register_fake("flashavatar::rasterize_fwd")(_fwd_fake)
    torch.library.register_fake("flashavatar::rasterize_bwd")(_bwd_fake)
    torch.library.register_fake("flashavatar::rasterize")(_rasterize_fake)
    # rasterize_fwd / rasterize_bwd are the raw kernels; flashavatar::rasterize is the differentiable op, its
    # autograd kernel in C++ (csrc/rasterizer/rasterize_autograd.cpp): the Python glue cost more host time per call
    # than the GPU work at avatar sizes.
    _registered = True


_register()


# ---------------------------------------------------------------------------------------------------------
# Capacity of the tile-intersection buffer (CUDA), grown without ever synchronising.

class _Capacity:
    """Per (device, images, Gaussians, size) capacity, grown from the need the device reported earlier."""

    def __init__(self, initial: int):
        self.value = initial
        self.pinned: Tensor | None = None
        self.event: Any = None  # set while a read-back is pending
        self._event: Any = None
        self.calls = 0

    def update(self) -> None:
        # Only read the need back once its copy has landed (event.query() does not block).
        if self.event is not None and self.event.query():
            need = int(self.pinned[0])  # host memory: no device sync
            self.event = None
            target = _round_capacity(int(need * 1.25) + 1)
            # Grow on overflow; shrink when far too big (the tile sort's cost follows the capacity).
            if need > self.value or target < self.value // 2:
                self.value = target

    def record(self, offsets: Tensor) -> None:
        # Read the need back on the first calls, then on every 8th (a copy + event record cost ~10 us of host
        # time); a capacity outgrown in between still renders exactly, through the overflow fallback.
        self.calls += 1
        if offsets.numel() == 0 or (self.calls > 8 and self.calls % 8):
            return
        if self.pinned is None:
            self.pinned = torch.empty(1, dtype=torch.int32, pin_memory=True)
        self.pinned.copy_(offsets[-1:], non_blocking=True)  # total intersections wanted
        if self._event is None:
            self._event = torch.cuda.Event()  # one event, re-recorded: query() reports the latest copy
        self._event.record()
        self.event = self._event


_capacities: dict[tuple, _Capacity] = {}


def _round_capacity(n: int) -> int:
    return max(1 << 12, 1 << max(0, (n - 1).bit_length())) if n < (1 << 20) else ((n + (1 << 18) - 1) >> 18) << 18


def _capacity_state(device: torch.device, images: int, n: int, width: int, height: int) -> _Capacity:
    key = (device.index, images, n, width, height)
    st = _capacities.get(key)
    if st is None:
        # First guess: a few tiles per Gaussian per image; an underestimate only costs speed once.
        st = _capacities[key] = _Capacity(_round_capacity(max(4 * images * n, 1)))
    return st


def _capturing() -> bool:
    # Only called for CUDA tensors, so CUDA is available.
    return torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------------------
# Validation

def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_tensor(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{_OP}: {name} must be a floating-point tensor, got dtype {t.dtype} (shape {_shape(t)})")
    return t


def _check_finite(named: dict[str, Tensor], quats: Tensor) -> None:
    """One device->host read for all checks (skipped while capturing a CUDA graph)."""
    flags = [torch.isfinite(t).all() for t in named.values()]
    flags.append((quats.square().sum(-1) > 0).all())
    ok = torch.stack(flags).cpu().tolist()
    for (name, t), good in zip(named.items(), ok):
        if not good:
            raise ValueError(f"{_OP}: {name} (shape {_shape(t)}) contains NaN or inf")
    if not ok[-1]:
        raise ValueError(f"{_OP}: quats (shape {_shape(quats)}) contains a zero quaternion")


def _validate(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height, sh_degree, near,
              far) -> tuple[tuple, int, int, int]:
    """Full argument check with messages that name the argument; returns (batch dims, N, C, D)."""
    named = {n: _check_tensor(n, t) for n, t in (("means", means), ("quats", quats), ("scales", scales),
                                                 ("opacities", opacities), ("colors", colors),
                                                 ("viewmats", viewmats), ("Ks", Ks))}
    if backgrounds is not None:
        named["backgrounds"] = _check_tensor("backgrounds", backgrounds)
    device = means.device
    for n in ("quats", "scales", "opacities", "colors", "backgrounds"):
        if n in named and named[n].dtype != means.dtype:
            raise TypeError(f"{_OP}: {n} has dtype {named[n].dtype} (shape {_shape(named[n])}) but means has "
                            f"{means.dtype}; Gaussian tensors must share one dtype")
    for n, t in named.items():
        if t.device != device:
            raise ValueError(f"{_OP}: {n} is on {t.device} but means is on {device}; put all inputs on one device")
    _ext.require(_OP, device)
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"{_OP}: width and height must be positive, got {width}x{height}")
    if sh_degree is not None and not (0 <= int(sh_degree) <= 3):
        raise ValueError(f"{_OP}: sh_degree must be None or in 0..3, got {sh_degree}")
    if not (0 < near < far):
        raise ValueError(f"{_OP}: need 0 < near < far, got near={near}, far={far}")

    # Shapes: batch dims from means.
    if means.dim() < 2 or means.shape[-1] != 3:
        raise ValueError(f"{_OP}: means must have shape [..., N, 3], got {_shape(means)}")
    batch, N = tuple(means.shape[:-2]), means.shape[-2]
    expect = {"quats": batch + (N, 4), "scales": batch + (N, 3), "opacities": batch + (N,)}
    for n, s in expect.items():
        if tuple(named[n].shape) != s:
            raise ValueError(f"{_OP}: {n} must have shape {list(s)} (means is {_shape(means)}), "
                             f"got {_shape(named[n])}")
    if sh_degree is None:
        if colors.dim() != len(batch) + 2 or tuple(colors.shape[:-1]) != batch + (N,):
            raise ValueError(f"{_OP}: colors must have shape {list(batch + (N,))} + [D] (plain colours), got "
                             f"{_shape(colors)}; pass sh_degree for SH coefficients [..., N, K, 3]")
    else:
        nb = (int(sh_degree) + 1) ** 2
        if colors.dim() != len(batch) + 3 or tuple(colors.shape[:-2]) != batch + (N,) or colors.shape[-2] < nb:
            raise ValueError(f"{_OP}: with sh_degree={sh_degree} colors must have shape {list(batch + (N,))} + "
                             f"[K >= {nb}, D], got {_shape(colors)}")
    if colors.shape[-1] < 1:
        raise ValueError(f"{_OP}: colors needs at least one channel, got {_shape(colors)}")
    if viewmats.dim() != len(batch) + 3 or tuple(viewmats.shape[:-3]) != batch or viewmats.shape[-2:] != (4, 4):
        raise ValueError(f"{_OP}: viewmats must have shape {list(batch)} + [C, 4, 4], got {_shape(viewmats)}")
    C = viewmats.shape[-3]
    if tuple(Ks.shape) != batch + (C, 3, 3):
        raise ValueError(f"{_OP}: Ks must have shape {list(batch + (C, 3, 3))}, got {_shape(Ks)}")
    D = colors.shape[-1]
    if backgrounds is not None and tuple(backgrounds.shape) != batch + (C, D):
        raise ValueError(f"{_OP}: backgrounds must have shape {list(batch + (C, D))}, got {_shape(backgrounds)}")

    return batch, N, C, D


def _fast_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height, sh_degree, near,
                 far) -> tuple[tuple, int, int, int] | None:
    """The common valid call, checked with few Python operations (host time matters at avatar sizes).

    Returns (batch dims, N, C, D), or None when anything differs from the plain case (then ``_validate`` runs
    and either accepts the call or raises with a message naming the argument). Accepts a subset of what
    ``_validate`` accepts, never more.
    """
    try:
        dt, dev = means.dtype, means.device
        if not (means.is_floating_point() and viewmats.is_floating_point() and Ks.is_floating_point()
                and quats.dtype is dt and scales.dtype is dt and opacities.dtype is dt and colors.dtype is dt
                and quats.device == dev and scales.device == dev and opacities.device == dev
                and colors.device == dev and viewmats.device == dev and Ks.device == dev
                and type(width) is int and type(height) is int and width > 0 and height > 0
                and 0 < near < far and _ext._C is not None):
            return None
        if backgrounds is not None and not (backgrounds.dtype is dt and backgrounds.device == dev):
            return None
        if dev.type == "cuda" and not _ext.cuda_compiled():
            return None
        ms = means.shape
        if len(ms) < 2 or ms[-1] != 3:
            return None
        batch, N = ms[:-2], ms[-2]
        bn = ms[:-1]
        C = viewmats.shape[-3] if viewmats.dim() >= 3 else -1
        D = colors.shape[-1]
        lead = batch + (C,)
        if sh_degree is None:
            colors_ok = colors.shape == bn + (D,)
        else:
            colors_ok = (type(sh_degree) is int and 0 <= sh_degree <= 3 and colors.dim() == len(ms) + 1
                         and colors.shape[:-2] == bn and colors.shape[-2] >= (sh_degree + 1) ** 2)
        if (not colors_ok or quats.shape != bn + (4,) or scales.shape != ms or opacities.shape != bn
                or D < 1 or C < 0 or viewmats.shape != lead + (4, 4) or Ks.shape != lead + (3, 3)
                or (backgrounds is not None and backgrounds.shape != lead + (D,))):
            return None
        return tuple(batch), N, C, D
    except (AttributeError, TypeError):
        return None


def _prep(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Each step only when needed: this wrapper's host time matters for small scenes.
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    backgrounds: Tensor | None = None,
    check_finite: bool = True,
    near_plane: float | None = None,
    far_plane: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Render 3D Gaussians into C cameras (gsplat ``rasterization`` classic mode conventions).

    Args (``...`` = optional batch dims, the same on every argument; one Gaussian set per batch entry):
        means: ``[..., N, 3]`` world-space centres.
        quats: ``[..., N, 4]`` rotations (w, x, y, z); normalised inside.
        scales: ``[..., N, 3]`` standard deviations.
        opacities: ``[..., N]`` in [0, 1].
        colors: ``[..., N, D]`` colours/features (any D >= 1), or with ``sh_degree`` set, SH coefficients
            ``[..., N, K, D]`` (D = 3 for RGB), K >= (sh_degree + 1)^2, evaluated in gsplat's convention
            (view direction = mean - camera centre, colour = SH + 0.5 clamped at 0).
        viewmats: ``[..., C, 4, 4]`` world-to-camera (OpenCV: x right, y down, z forward).
        Ks: ``[..., C, 3, 3]`` pinhole intrinsics.
        width, height: image size in pixels.
        sh_degree: None for plain colours, else 0..3.
        near, far: Gaussians whose camera depth is outside [near, far] are culled.
        eps2d: low-pass filter added to the 2D covariance diagonal (pixels^2).
        backgrounds: ``[..., C, D]`` colour behind the Gaussians (default: none, i.e. black).
        near_plane, far_plane: gsplat's names for near and far (take precedence when given).
        CUDA graphs: call once outside capture first (per scene size) so the intersection capacity settles;
            a capacity that turns out too small inside a graph still renders correctly (slower fallback).
        check_finite: raise on NaN/inf inputs. This costs one device-to-host read on CUDA; it is skipped
            automatically while a CUDA graph is being captured (pass False for a fully asynchronous call).

    Returns:
        render ``[..., C, H, W, D]``, alpha ``[..., C, H, W, 1]`` and ``meta`` with
        ``depth`` ``[..., C, H, W, 1]`` (expected depth sum_i w_i z_i, *not* normalised by alpha; divide by alpha
        for the normalised one), ``radii`` ``[..., C, N]`` int32 (pixels, 0 = culled), ``means2d``
        ``[..., C, N, 2]``, ``conics`` ``[..., C, N, 3]``, ``depths`` ``[..., C, N]`` (camera z),
        ``colors`` ``[..., C, N, D]`` (evaluated colours), ``width``, ``height``.
        render, alpha and depth are differentiable w.r.t. means, quats, scales, opacities, colors and
        backgrounds (viewmats and Ks get no gradient; means2d/conics are not differentiable outputs).

    Inputs in float16/bfloat16 are computed in float32; float64 runs in float64 on the CPU (for gradcheck) and
    in float32 on CUDA. Outputs are float32 (float64 for float64 CPU inputs).
    """
    near = near if near_plane is None else near_plane
    far = far if far_plane is None else far_plane
    shapes = _fast_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height,
                          sh_degree, near, far)
    if shapes is None:  # something is off: the full check names the argument and raises
        shapes = _validate(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height,
                           sh_degree, near, far)
    batch, N, C, D = shapes
    width, height = int(width), int(height)
    device = means.device
    capturing = device.type == "cuda" and _capturing()
    if check_finite and not capturing:
        named = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
                 "viewmats": viewmats, "Ks": Ks}
        if backgrounds is not None:
            named["backgrounds"] = backgrounds
        _check_finite(named, quats)

    # Compute dtype: float64 only for float64 on the CPU (gradcheck); float32 otherwise. The op takes the
    # caller's batch dims as they are (reshapes happen in C++).
    dtype = torch.float64 if (device.type == "cpu" and means.dtype == torch.float64) else torch.float32
    m, q, s, o, vm, k = (_prep(t, dtype) for t in (means, quats, scales, opacities, viewmats, Ks))
    # One colour / SH set expanded over a batch dim (the Animator's per-Gaussian SH) goes to the CUDA kernels as it
    # is: they read it in place (64 frames of a uv-128 avatar: a 178 MB copy less per call).
    shared = (device.type == "cuda" and len(batch) == 1 and colors.shape[0] > 1 and colors.dtype == dtype
              and colors.stride(0) == 0 and colors[0].is_contiguous())
    col = colors if shared else _prep(colors, dtype)
    bg = None if backgrounds is None else _prep(backgrounds, dtype)

    cap_state = None
    capacity = 0
    if device.type == "cuda":
        B = math.prod(batch) if batch else 1
        tiles = ((width + _TILE - 1) // _TILE) * ((height + _TILE - 1) // _TILE)
        if B * C * tiles >= 2**31 - 1 or B * C * N >= 2**31 - 1:
            raise ValueError(f"{_OP}: {B * C} images of {N} Gaussians exceed the 32-bit index range")
        cap_state = _capacity_state(device, B * C, N, width, height)
        if not capturing:
            cap_state.update()
        capacity = cap_state.value if _FORCE_CAPACITY is None else int(_FORCE_CAPACITY)

    out = torch.ops.flashavatar.rasterize.default(m, q, s, o, col, vm, k, bg, width, height,
                                                  -1 if sh_degree is None else int(sh_degree), float(near),
                                                  float(far), float(eps2d), capacity)
    render, alpha, depth, radii, means2d, conics, colors_eval, depths = out[:8]
    if cap_state is not None and not capturing:
        cap_state.record(out[13])
    meta = {"depth": depth, "radii": radii, "means2d": means2d, "conics": conics, "depths": depths,
            "colors": colors_eval, "width": width, "height": height}
    return render, alpha, meta
