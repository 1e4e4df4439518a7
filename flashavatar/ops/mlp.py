"""Deformation MLP ops (kernels in ``csrc/mlp/``), inference only.

``mlp_input`` and ``mlp_head`` are the first and last layers of the :class:`~flashavatar.animate.Animator`'s MLP
around its cuBLAS hidden layers, each one pass over memory (``torch.ops.flashavatar.mlp_input`` / ``mlp_head``).

``fused_mlp`` (``torch.ops.flashavatar.fused_mlp``) is the whole MLP over every (frame, Gaussian) row in one
launch: each block keeps its 128 rows' activations in shared memory through all the layers and runs bf16/fp16
tensor-core MMAs, instead of one cuBLAS GEMM per layer whose activations round-trip through memory.
``flashavatar.ops.reference.fused_mlp_reference`` is the pure-torch version. The Animator uses it only when
asked (``Animator(fused_mlp=True)``): on the H200 it is slower than ``mlp_input`` + the cuBLAS GEMMs +
``mlp_head`` (benchmarks/NOTES_end_to_end.md).

All three have shapes for ``torch.compile`` / fake tensors through ``register_fake``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

__all__ = ["fused_mlp", "fused_mlp_supported", "mlp_head", "mlp_input"]

if _ext.available():

    @torch.library.register_fake("flashavatar::fused_mlp")
    def _fused_mlp_fake(h_pe, cond, w_hidden, b_hidden, w_out, b_out):
        return h_pe.new_empty(cond.shape[0], h_pe.shape[0], w_out.shape[0], dtype=torch.float32)

    @torch.library.register_fake("flashavatar::mlp_input")
    def _mlp_input_fake(h_pe, cond):
        return h_pe.new_empty(cond.shape[0], h_pe.shape[0], h_pe.shape[1])

    @torch.library.register_fake("flashavatar::mlp_head")
    def _mlp_head_fake(h, w, b, apply_tanh):
        return h.new_empty(h.shape[0], w.shape[0], dtype=torch.float32)


def mlp_input(h_pe: Tensor, cond: Tensor) -> Tensor:
    """``[B, N, H]``: ``relu(h_pe[g] + cond[f])`` for every frame f and Gaussian g, summed in float32 and rounded to
    the inputs' dtype (what ``torch.relu(h_pe[None] + cond[:, None])`` gives, in one pass).

    Args:
        h_pe: ``[N, H]`` float32, bfloat16 or float16: the per-Gaussian half of the MLP's first layer.
        cond: ``[B, H]`` same dtype: the per-frame half.
    """
    _ext.require("mlp_input", h_pe.device)
    return torch.ops.flashavatar.mlp_input(h_pe, cond)


def mlp_head(h: Tensor, w: Tensor, b: Tensor, *, apply_tanh: bool = False) -> Tensor:
    """``[R, O]`` float32: ``h @ w.T + b`` (then ``tanh`` with ``apply_tanh``), the products of ``h``'s dtype
    summed in float32. Tensor cores on CUDA for bfloat16/float16 with ``H = 256`` and ``O <= 16``.

    Args:
        h: ``[R, H]`` float32, bfloat16 or float16 activations.
        w: ``[O, H]`` same dtype (``torch.nn.Linear`` layout).
        b: ``[O]`` float32.
    """
    _ext.require("mlp_head", h.device)
    return torch.ops.flashavatar.mlp_head(h, w, b, bool(apply_tanh))


def fused_mlp(h_pe: Tensor, cond: Tensor, w_hidden: Tensor, b_hidden: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """Pre-activation outputs ``[B, N, O]`` (float32) of the MLP
    ``W_out relu(W_L ... relu(W_1 relu(h_pe[g] + cond[f]) + b_1) ... + b_L) + b_out`` for every frame f and
    Gaussian g, activations rounded to the input dtype after every layer.

    Args:
        h_pe: ``[N, 256]`` bfloat16 or float16, the per-Gaussian half of the first layer (bias included).
        cond: ``[B, 256]`` same dtype, the per-frame half of the first layer.
        w_hidden: ``[L, 256, 256]`` same dtype, hidden layers in ``torch.nn.Linear`` layout (``[out, in]``).
        b_hidden: ``[L, 256]`` float32.
        w_out: ``[O, 256]`` same dtype, ``1 <= O <= 16``.
        b_out: ``[O]`` float32.
    """
    _ext.require("fused_mlp", h_pe.device)
    return torch.ops.flashavatar.fused_mlp(h_pe, cond, w_hidden, b_hidden, w_out, b_out)


_SUPPORTED: dict[tuple[str, torch.dtype], bool] = {}


def fused_mlp_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the CUDA kernel runs and is right on ``device`` for ``dtype`` (bf16/fp16): it needs an sm_80+ GPU
    that gives a block 198 KB of shared memory (H100/H200 do, A100 does not). Checked once per device and dtype on
    a small problem against :func:`~flashavatar.ops.reference.fused_mlp_reference`."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not _ext.cuda_compiled():
        return False
    key = (str(device), dtype)
    if key not in _SUPPORTED:
        from .reference import fused_mlp_reference

        g = torch.Generator().manual_seed(0)
        args = [torch.randn(200, 256, generator=g) * 0.5, torch.randn(3, 256, generator=g) * 0.5,
                torch.randn(2, 256, 256, generator=g) / 16, torch.randn(2, 256, generator=g) * 0.1,
                torch.randn(10, 256, generator=g) / 16, torch.randn(10, generator=g) * 0.1]
        args = [a.to(device, dtype if i in (0, 1, 2, 4) else torch.float32) for i, a in enumerate(args)]
        try:
            got = fused_mlp(*args)
            want = fused_mlp_reference(*args)
            _SUPPORTED[key] = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
        except RuntimeError:  # an older GPU, too little shared memory
            _SUPPORTED[key] = False
    return _SUPPORTED[key]
