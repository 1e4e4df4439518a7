"""Fast animate (+ render) path for a trained :class:`~flashavatar.model.GaussianAvatar` (issue 6).

:class:`Animator` computes the same Gaussians as ``GaussianAvatar.forward`` (to float tolerance in float32)
but does every frame-independent piece once, when it is built:

* the per-Gaussian half of the MLP's first layer, ``W_pe · PE(x̄) + b`` ``[N, hidden]`` (the positional
  encoding of the canonical positions never changes), and the MLP weights cast to the compute dtype;
* FLAME restricted to the ``U`` vertices the Gaussians' triangles touch: shape, expression and pose
  blendshapes, LBS weights and eyelids sliced to those vertices, the joint regressor folded into the
  blendshapes (``J = J_reg v̄ + betas · (J_reg S)``), and one GEMM for ``[betas, pose features]`` →
  (vertex offsets, joints);
* the normalised base rotations, opacities ``sigmoid(logit)``, SH coefficients ``[N, K, 3]``.

The MLP can run in bfloat16 or float16 (``mlp_dtype``); FLAME, the assembly and the rasteriser stay float32.
Hidden layers use cuBLASLt's fused bias + ReLU epilogue (``torch._addmm_activation``) on CUDA, over (frame,
Gaussian) rows in chunks of ``mlp_rows`` (small enough for a chunk's activations to stay in L2 between layers).

Where the compiled extension runs on the device, FLAME is three launches (``flashavatar.ops.flame_lbs``) and the
assembly one kernel (``flashavatar.ops.gaussian_assembly``); the torch versions in this module
(``_vertices_core``, ``_assemble_core``) are the fallback and the tests' oracle.

:class:`GraphedRenderer` captures the whole animate + rasterise step for a fixed batch size into a CUDA graph
with static input buffers; calling it with new FLAME codes copies them in and replays the graph. The
rasteriser (``flashavatar.ops.rasterize_gaussians``) is free of host synchronisation, which is what makes this
possible.

An :class:`Animator` snapshots the avatar's parameters: call :meth:`Animator.refresh` after changing them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .model.avatar import (frame_sh, irradiance_from_matrix, irradiance_matrix, positional_encoding,
                           triangle_normals)
from .model.camera import rot6d_to_matrix
from .model.flame import FlameCodes, kinematic_chain
from .ops import _ext, flame_lbs, gaussian_assembly, rasterize_gaussians
from .ops.mlp import fused_mlp, fused_mlp_supported, mlp_head, mlp_input

__all__ = ["Animator", "GraphedRenderer", "MLP_DTYPES"]

MLP_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


def _as_dtype(mlp_dtype: str | torch.dtype | None) -> torch.dtype:
    if mlp_dtype is None:
        return torch.float32
    if isinstance(mlp_dtype, torch.dtype):
        if mlp_dtype not in MLP_DTYPES.values():
            raise ValueError(f"Animator: mlp_dtype must be float32, bfloat16 or float16, got {mlp_dtype}")
        return mlp_dtype
    if mlp_dtype not in MLP_DTYPES:
        raise ValueError(f"Animator: mlp_dtype must be one of {sorted(MLP_DTYPES)}, got '{mlp_dtype}'")
    return MLP_DTYPES[mlp_dtype]


class _Detached:
    """Attribute view of a module whose tensors come back detached (the animator never builds autograd graphs)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.Tensor):
            return value.detach()
        if isinstance(value, torch.nn.Module):
            return _Detached(value)
        return value

    def __iter__(self):
        return (_Detached(m) if isinstance(m, torch.nn.Module) else m for m in self._module)


# (frame, Gaussian) rows per MLP chunk: whole frames per chunk when a frame has fewer rows, an even split of each
# frame when it has more. On the CPU 32k rows (a chunk's activations stay in cache between layers). On a GPU
# 2^20: one GEMM per layer up to 64 frames of uv 128. Keeping chunks L2-sized (32k rows, 16 MB of bf16) was the
# idea first, but more, smaller GEMMs lost: on the H200 (bf16, graph replay, uv 128) the MLP took 0.789 / 3.116 ms
# at batches 16 / 64 in 32k-row chunks against 0.634 / 2.505 ms unchunked (benchmarks/results/mlp_rows_h200.*).
# Never above ~2M rows: cuBLASLt's fused bias + ReLU epilogue takes at most that many per GEMM.
_MLP_ROWS = 32_768
_MLP_ROWS_CUDA = 1 << 20
_MLP_ROWS_MAX = 2_000_000


def default_mlp_rows(device: torch.device | str) -> int:
    """Rows per MLP chunk when ``Animator(mlp_rows=None)``: :data:`_MLP_ROWS_CUDA` on a GPU, else
    :data:`_MLP_ROWS`."""
    return _MLP_ROWS_CUDA if torch.device(device).type == "cuda" else _MLP_ROWS


def mlp_chunks(batch: int, n: int, rows: int) -> list[tuple[slice, slice]]:
    """``(frames, gaussians)`` slices covering ``[batch, n]`` with at most ``rows`` rows each (capped at
    :data:`_MLP_ROWS_MAX`): whole frames (``rows // n`` of them) when a frame fits, else each frame split into equal
    Gaussian ranges."""
    rows = max(1, min(int(rows), _MLP_ROWS_MAX))
    if n == 0 or batch == 0:
        return [(slice(0, batch), slice(0, n))]
    if rows >= n:
        per = rows // n
        return [(slice(b, min(b + per, batch)), slice(0, n)) for b in range(0, batch, per)]
    parts = -(-n // rows)
    step = -(-n // parts)
    return [(slice(b, b + 1), slice(g, min(g + step, n))) for b in range(batch) for g in range(0, n, step)]


def _has_mm_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has ``mm(a, b, out_dtype=float32)`` for ``dtype`` operands on ``device``."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


# ------------------------------------------------------------------------------ quaternions in few kernels
# Same functions as model.camera.quat_multiply / matrix_to_quat, written as small matrix products so that a
# frame costs a handful of kernels (what matters at batch 1, where the step is a chain of tiny launches).

def _hamilton_table() -> Tensor:
    """``T [16, 4]`` with ``(q ⊗ p)_i = Σ_kj q_k p_j T[4k + j, i]`` (w, x, y, z)."""
    # L(q) rows as (sign, component of q) per column j of p
    L = (((1, 0), (-1, 1), (-1, 2), (-1, 3)),
         ((1, 1), (1, 0), (-1, 3), (1, 2)),
         ((1, 2), (1, 3), (1, 0), (-1, 1)),
         ((1, 3), (-1, 2), (1, 1), (1, 0)))
    T = torch.zeros(4, 4, 4)
    for i, row in enumerate(L):
        for j, (sign, k) in enumerate(row):
            T[k, j, i] = sign
    return T.reshape(16, 4)


_HAMILTON = _hamilton_table()


def quat_left_matrix(q: Tensor) -> Tensor:
    """``L(q) [..., 4, 4]`` with ``q ⊗ p = L(q) p``."""
    T = _HAMILTON.to(q.device, q.dtype).view(4, 4, 4)  # [k, j, i]
    return torch.einsum("...k,kji->...ij", q, T)


def quat_multiply_fast(q: Tensor, p: Tensor, table: Tensor | None = None) -> Tensor:
    """Hamilton product ``q ⊗ p`` of ``[..., 4]`` quaternions (broadcasting): one outer product, one GEMM.
    ``table``: :data:`_HAMILTON` already on the device (a host copy per call cannot go into a CUDA graph)."""
    outer = (q[..., :, None] * p[..., None, :]).flatten(-2)  # [..., 16]
    return outer @ (_HAMILTON.to(q.device, q.dtype) if table is None else table)


def _quat_from_matrix_table(transposed: bool) -> tuple[Tensor, Tensor]:
    """``(W [9, 20], b [20])``: ``m_flat @ W + b`` = [4·(w², x², y², z²), the 4 candidate quaternions (× 4|c|)]
    of ``matrix_to_quat`` (``m_flat`` = the row-major 3×3 matrix, or its transpose)."""
    W, b = torch.zeros(9, 20), torch.zeros(20)

    def idx(r, c):
        return 3 * c + r if transposed else 3 * r + c

    diag = ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1))  # signs of m00, m11, m22 in 4w², 4x², 4y², 4z²
    for k, signs in enumerate(diag):
        b[k] = 1.0
        for d, sg in enumerate(signs):
            W[idx(d, d), k] = sg
    # off-diagonal combinations, as (+entry, ±entry)
    od = {"21-12": ((2, 1), (1, 2), -1), "02-20": ((0, 2), (2, 0), -1), "10-01": ((1, 0), (0, 1), -1),
          "01+10": ((0, 1), (1, 0), 1), "02+20": ((0, 2), (2, 0), 1), "12+21": ((1, 2), (2, 1), 1)}
    rows = ((0, "21-12", "02-20", "10-01"), ("21-12", 1, "01+10", "02+20"),
            ("02-20", "01+10", 2, "12+21"), ("10-01", "02+20", "12+21", 3))
    for r, row in enumerate(rows):
        for c, entry in enumerate(row):
            col = 4 + 4 * r + c
            if isinstance(entry, int):  # the diagonal candidate component = 4·component²
                W[:, col] = W[:, entry]
                b[col] = b[entry]
            else:
                (a0, a1), (b0, b1), sg = od[entry]
                W[idx(a0, a1), col] += 1.0
                W[idx(b0, b1), col] += sg
    return W, b


_QUAT_TABLES = {t: _quat_from_matrix_table(t) for t in (False, True)}


def matrix_to_quat_fast(R: Tensor, *, transposed: bool = False, tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` (``transposed``: given as Rᵀ) -> unit quaternions ``[..., 4]``, w >= 0.

    The best-conditioned of the four classic formulas per matrix, as ``model.camera.matrix_to_quat`` (the
    candidate is normalised directly: dividing by its positive scale first changes nothing).
    """
    W, b = tables if tables is not None else (t.to(R.device, R.dtype) for t in _QUAT_TABLES[bool(transposed)])
    vals = torch.addmm(b, R.reshape(-1, 9), W)  # [M, 20]
    best = vals[:, :4].argmax(-1)  # [M]
    cands = vals[:, 4:].view(-1, 4, 4)
    q = torch.gather(cands, 1, best[:, None, None].expand(-1, 1, 4))[:, 0]  # [M, 4]
    norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    q = q / torch.copysign(norm, q[:, :1])  # unit, w >= 0
    return q.view(*R.shape[:-2], 4)



def _fused_assembly_available(device: torch.device) -> bool:
    """Whether the compiled ``gaussian_assembly`` op runs on ``device`` (meta: through its fake kernel)."""
    if not _ext.available():
        return False
    return device.type in ("cpu", "meta") or (device.type == "cuda" and _ext.cuda_compiled())


def _has_fused_addmm_relu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._addmm_activation`` (GEMM with a bias + ReLU epilogue) works and is right here."""
    fn = getattr(torch, "_addmm_activation", None)
    if fn is None:
        return False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(64, 32, generator=g).to(device, dtype)
        w = torch.randn(32, 16, generator=g).to(device, dtype)
        b = torch.randn(16, generator=g).to(device, dtype)
        ref = torch.relu(torch.addmm(b, a, w)).float()
        return bool(torch.allclose(fn(b, a, w).float(), ref, rtol=2e-2, atol=2e-2))
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class Animator:
    """Frame-independent precomputation + a lean per-frame path for one avatar (inference only, no autograd).

    Args:
        avatar: a :class:`~flashavatar.model.GaussianAvatar` (any device; the animator lives on its device).
        mlp_dtype: ``"fp32"`` (default: same results as the model), ``"bf16"`` or ``"fp16"`` for the MLP.
        restrict_flame: skin only the vertices the Gaussians' triangles use (same result, less work).
        compile: ``torch.compile`` FLAME and the assembly (True = inductor, or a backend name); the first call
            per batch size compiles.
        fused_assembly: the assembly as one kernel (``flashavatar.ops.gaussian_assembly``); default: where the
            compiled extension runs on the avatar's device, else the torch path.
        fused_flame: FLAME in three launches (``flashavatar.ops.flame_lbs``); default: where the extension runs
            and the kinematic chain is FLAME's flat one, else the torch path.
        mlp_rows: (frame, Gaussian) rows per MLP chunk (default :func:`default_mlp_rows`: 2^20 on a GPU, 32k on
            the CPU; smaller = activations that stay in cache, larger = fewer and larger GEMMs).
        fused_mlp: the MLP as one kernel (``flashavatar.ops.fused_mlp``: activations kept on chip through the
            layers; bf16/fp16 on an sm_80+ GPU with 198 KB of shared memory per block, hidden width 256). Off by
            default: on the H200 the default path (``mlp_input`` + cuBLAS hidden GEMMs + ``mlp_head``) is faster
            (batch 64 of uv 128: 1.71 against 2.57 ms), see benchmarks/NOTES_end_to_end.md.

    Per-frame methods (``B`` frames, ``N`` Gaussians, ``U`` used vertices, ``K`` SH coefficients)::

        vertices(codes)            -> [B, U, 3]  posed FLAME vertices (the used ones)
        mlp(cond [B, C])           -> [B, N, 10] raw tanh outputs (float32)
        assemble(verts, raw)       -> dict means [B,N,3], quats [B,N,4], scales [B,N,3], opacities [B,N],
                                      sh [B,N,K,3] (expanded view), sh_degree
        gaussians(codes)           -> the dict above, all three in a row
        render(codes, viewmats [B,C,4,4], Ks [B,C,3,3], width, height, ...) -> image [B,C,H,W,3], alpha, meta
    """

    def __init__(self, avatar, *, mlp_dtype: str | torch.dtype | None = "fp32", restrict_flame: bool = True,
                 compile: bool | str = False, fused_assembly: bool | None = None, fused_flame: bool | None = None,
                 mlp_rows: int | None = None, fused_mlp: bool = False):
        self.avatar = avatar
        self._fused_mlp_arg = fused_mlp
        self.mlp_dtype = _as_dtype(mlp_dtype)
        self.restrict_flame = bool(restrict_flame)
        if mlp_rows is not None and int(mlp_rows) < 1:
            raise ValueError(f"Animator: mlp_rows must be >= 1, got {mlp_rows}")
        self.refresh()
        self.mlp_rows = default_mlp_rows(self.device) if mlp_rows is None else int(mlp_rows)
        # the assembly as one kernel (flashavatar.ops.gaussian_assembly) where the extension can run it here;
        # the torch path (_assemble_core) is the fallback and the tests' oracle
        can_fuse = _fused_assembly_available(self.device)
        if fused_assembly and not can_fuse:
            raise RuntimeError(f"Animator: fused_assembly=True but flashavatar._C cannot run gaussian_assembly on "
                               f"{self.device} (build the extension: `make build`)")
        self.fused_assembly = can_fuse if fused_assembly is None else bool(fused_assembly)
        # FLAME in three launches (flashavatar.ops.flame_lbs) for the flat chain (FLAME's, the procedural head's)
        can_fuse_flame = can_fuse and self.flat_chain and self.lbs_weights.shape[1] == 5
        if fused_flame and not can_fuse_flame:
            raise RuntimeError("Animator: fused_flame=True needs the compiled extension on this device and FLAME's "
                               f"flat kinematic chain (parents {self.parents})")
        self.fused_flame = can_fuse_flame if fused_flame is None else bool(fused_flame)
        # FLAME and the assembly are chains of small element-wise ops: torch.compile fuses them into a few kernels
        # (what matters at batch 1). ``compile`` = True (inductor) or a backend name; one graph per batch size.
        self.compiled = compile
        self._vertices_fn, self._assemble_fn = self._vertices_core, self._assemble_core
        if compile:
            kw = {} if compile is True else {"backend": compile}
            self._vertices_fn = torch.compile(self._vertices_core, fullgraph=True, dynamic=False, **kw)
            self._assemble_fn = torch.compile(self._assemble_core, fullgraph=True, dynamic=False, **kw)

    # ---------------------------------------------------------------------------------------- precompute
    @torch.no_grad()
    def refresh(self) -> "Animator":
        """(Re)compute everything frame-independent from the avatar's current parameters and buffers."""
        a, flame = _Detached(self.avatar), self.avatar.flame
        f32, dt = torch.float32, self.mlp_dtype
        self.device = a.canonical_means.device
        self.parity = a.parity
        self.offset_scale = a.offset_scale
        self.n_gaussians = a.n_gaussians
        self.cond_dim = a.cond_dim

        # MLP: first layer's per-Gaussian half once; weights in the compute dtype, transposed for addmm
        pe = positional_encoding(a.canonical_means.to(f32), a.n_freqs)  # [N, 51]
        self.h_pe = torch.addmm(a.mlp_in_pe.bias.to(f32), pe, a.mlp_in_pe.weight.to(f32).t()).to(dt)  # [N, H]
        self.w_cond_t = a.mlp_in_cond.weight.to(f32).t().contiguous()  # [C, H] (per frame: tiny, float32)
        self.hidden = [(layer.weight.to(dt).t().contiguous(), layer.bias.to(dt))  # ([H, H], [H])
                       for layer in a.mlp_hidden if isinstance(layer._module, torch.nn.Linear)]
        # output layer: reduced-precision operands but a float32 result (rounding the 10 outputs to bf16
        # would be the largest error of the path); on CUDA through mm(..., out_dtype=float32)
        self.w_out_t = a.mlp_out.weight.to(dt).t().contiguous()  # [H, 10]
        self.w_out_t32 = a.mlp_out.weight.to(f32).t().contiguous()  # [H, 10]
        self.b_out = a.mlp_out.bias.to(f32)  # [10]
        # optional colour head (GaussianAvatar(color_offset > 0)): same treatment, RGB offset per frame
        self.color_offset = float(getattr(a, "color_offset", 0.0))
        color_head = getattr(a, "mlp_color", None)
        self.has_color = color_head is not None
        if self.has_color:
            self.w_col_t = color_head.weight.to(dt).t().contiguous()  # [H, 3]
            self.w_col_t32 = color_head.weight.to(f32).t().contiguous()  # [H, 3]
            self.b_col = color_head.bias.to(f32)  # [3]
        if dt == torch.float16:  # float16 tops out at 65504: refuse weights it cannot hold (bf16 has the range)
            tensors = [self.h_pe, self.w_out_t] + [w for pair in self.hidden for w in pair]
            big = max(float(t.abs().max()) for t in tensors)
            if not big < 6e4:
                raise ValueError(f"Animator: MLP values up to {big:.3g} overflow float16; use mlp_dtype='bf16'")
        self._mm_out_dtype = dt != f32 and self.device.type == "cuda" and _has_mm_out_dtype(self.device, dt)
        # both heads as one [O, H] matrix (10 raw outputs, then the colour head's 3) for the one-pass output layer
        outs = [(self.w_out_t, self.b_out)] + ([(self.w_col_t, self.b_col)] if self.has_color else [])
        self.head_w = torch.cat([w.t() for w, _ in outs]).contiguous()  # [10 (+3), H] in the MLP dtype
        self.head_b = torch.cat([b for _, b in outs]).contiguous()  # [10 (+3)] float32
        # First and last layers through flashavatar.ops.mlp_input / mlp_head (one pass over memory each) on a GPU
        # in bf16/fp16: at batch 64 of uv 128 the torch ops took 0.82 + 0.29 ms of a 2.5 ms MLP. On the CPU the
        # torch path stays (same values; tests switch this on there to check the ops' branch).
        self.mlp_layer_ops = dt != f32 and self.device.type == "cuda" and _ext.cuda_compiled()
        self._fused_relu = self.device.type == "cuda" and _has_fused_addmm_relu(self.device, dt)
        # the MLP as one kernel when asked for (the same roundings as the GEMMs below: weights and biases in the
        # MLP dtype, the biases then widened to float32 for the kernel's epilogue)
        want = bool(self._fused_mlp_arg)
        can_fuse_mlp = want and self.h_pe.shape[1] == 256 and fused_mlp_supported(self.device, dt)
        if want and not can_fuse_mlp:
            raise RuntimeError(f"Animator: fused_mlp=True but flashavatar.ops.fused_mlp cannot run here "
                               f"({self.device}, {dt}, hidden width {self.h_pe.shape[1]}): it needs bf16/fp16, width "
                               f"256 and an sm_80+ GPU with 198 KB of shared memory per block")
        self.fused_mlp = can_fuse_mlp
        if self.fused_mlp:
            self.mlp_w_hidden = torch.stack([w.t() for w, _ in self.hidden]).contiguous()  # [L, H, H] [out, in]
            self.mlp_b_hidden = torch.stack([b.to(f32) for _, b in self.hidden]).contiguous()  # [L, H]

        # per-Gaussian constants
        self.barycentrics = a.barycentrics.to(f32)  # [N, 3]
        # one small matmul per Gaussian gives [surface point, edge v0->v1, edge v0->v2] from its triangle
        edges = torch.tensor([[-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], device=self.device).expand(self.n_gaussians, 2, 3)
        self.tri_weights = torch.cat((self.barycentrics[:, None], edges), dim=1).contiguous()  # [N, 3, 3]
        rot = a.rotation.to(f32)
        self.q_base = rot / rot.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [N, 4]
        self.L_base = quat_left_matrix(self.q_base).contiguous()  # [N, 4, 4]: q_base ⊗ p = L_base p
        self.hamilton = _HAMILTON.to(self.device)  # constant tables on the device
        self.quat_tables = tuple(t.to(self.device) for t in _QUAT_TABLES[True])
        self.log_scale = a.log_scale.to(f32)  # [N, 3]
        self.rotation = rot.contiguous()  # [N, 4] as the avatar has it (the fused op normalises)
        self.opacities = torch.sigmoid(a.opacity_logit.to(f32))  # [N]
        self.sh = torch.cat((a.features_dc, a.features_rest), dim=1).to(f32).contiguous()  # [N, K, 3]
        # optional shading (GaussianAvatar(shading=True)), the model's irradiance_ratio with its frame-independent
        # half done once: the irradiance as a quadratic form M [4, 4, 3] (irradiance_matrix), 1 / E(neutral
        # normal) [N, 3] (0 for the unshaded mouth Gaussians) and the mouth's factor 1 [N, 3], so a frame's factor
        # is max(E(n), 1e-3) * inv_canon + mouth_one
        shading = getattr(a, "shading_sh", None)
        self.shading = None
        if shading is not None:
            matrix = irradiance_matrix(shading.to(f32))
            e_canon = irradiance_from_matrix(a.canonical_normals.to(f32), matrix).clamp_min(1e-3)  # [N, 3]
            mouth = a.is_mouth[:, None].expand(-1, 3)
            self.shading = (matrix, torch.where(mouth, 0.0, 1.0 / e_canon), mouth.to(f32).contiguous())

        # FLAME restricted to the used vertices
        V = flame.n_vertices
        faces = a.gaussian_faces  # [N, 3] vertex ids
        used = torch.unique(faces) if self.restrict_flame else torch.arange(V, device=faces.device)  # [U] sorted
        self.used_vertices = used
        self.local_faces = torch.searchsorted(used, faces)  # [N, 3] indices into the used vertices
        self.local_faces_i32 = self.local_faces.to(torch.int32).contiguous()  # [N, 3] for the fused op
        U = used.numel()
        nb = flame.n_shape + flame.n_expr
        M = lambda name: getattr(flame, name).to(f32)  # noqa: E731 (float32 model arrays)
        shapedirs = M("shapedirs").view(nb, V, 3)
        posedirs = M("posedirs").view(36, V, 3)
        J_reg = M("J_regressor")  # [5, V]
        v_template = M("v_template")  # [V, 3]
        # one matrix for [betas, pose_feature] -> [vertex offsets (U*3), joints (15)]
        # (vertices get a 4th, homogeneous coordinate: base 1, no blendshape, so skinning is one matmul)
        dirs = torch.zeros(nb + 36, U, 4, dtype=f32, device=used.device)
        dirs[:nb, :, :3] = shapedirs[:, used]
        dirs[nb:, :, :3] = posedirs[:, used]
        j_dirs = torch.einsum("jv,bvc->bjc", J_reg, shapedirs).reshape(nb, 15)
        self.flame_dirs = torch.cat((dirs.reshape(nb + 36, U * 4),
                                     torch.cat((j_dirs, j_dirs.new_zeros(36, 15)))), dim=1)  # [nb + 36, U*4 + 15]
        v_h = torch.cat((v_template[used], v_template.new_ones(U, 1)), dim=1)  # [U, 4]
        self.flame_base = torch.cat((v_h.reshape(-1), (J_reg @ v_template).reshape(-1)))  # [U*4 + 15]
        self.lbs_weights = M("lbs_weights")[used].contiguous()  # [U, 5]
        self.has_eyelids = bool(flame.has_eyelids)
        self.eyelid_dirs = M("eyelid_dirs")[:, used].reshape(2, U * 3).contiguous()  # [2, U*3]
        self.parents = list(flame.parents)
        # device index tensor (indexing with a Python list would copy from host memory on every call, which a
        # CUDA graph capture does not allow)
        self.parent_index = torch.tensor(self.parents[1:], dtype=torch.long, device=used.device)  # [4]
        # FLAME's chain: neck under the root, jaw and eyes under the neck (or the root). With identity root and
        # neck rotations every joint's world transform is then (R_j, J_j - R_j J_j): no loop over the chain.
        self.flat_chain = self.parents[1] == 0 and all(p in (0, 1) for p in self.parents[2:])
        self.eye3 = torch.eye(3, dtype=f32, device=used.device)
        self.n_shape, self.n_expr, self.n_used = flame.n_shape, flame.n_expr, U
        return self

    # ------------------------------------------------------------------------------------------- stages
    def vertices(self, codes) -> Tensor:
        """Posed FLAME vertices ``[B, U, 3]`` of the used vertices (float32), same math as ``FLAME.forward``."""
        c = FlameCodes.from_any(codes)
        f32 = torch.float32
        expr = c.expr.to(f32)
        B = expr.shape[0]
        shape = c.shape.to(f32)
        shape = shape[None] if shape.dim() == 1 else shape
        if expr.shape[1] != self.n_expr or shape.shape[1] != self.n_shape or shape.shape[0] not in (1, B):
            raise ValueError(f"Animator: expr {tuple(expr.shape)} / shape {tuple(shape.shape)} do not match "
                             f"[B, {self.n_expr}] / [1 or B, {self.n_shape}]")
        if tuple(c.jaw.shape) != (B, 6) or tuple(c.eyes.shape) != (B, 12) or tuple(c.eyelids.shape) != (B, 2):
            raise ValueError(f"Animator: jaw {tuple(c.jaw.shape)}, eyes {tuple(c.eyes.shape)}, eyelids "
                             f"{tuple(c.eyelids.shape)} must be [{B}, 6], [{B}, 12], [{B}, 2]")
        if self.fused_flame and self.flat_chain:
            return flame_lbs(shape, expr, c.jaw.to(f32), c.eyes.to(f32), c.eyelids.to(f32), self.flame_dirs,
                             self.flame_base, self.lbs_weights, self.eyelid_dirs, self.has_eyelids)
        return self._vertices_fn(shape, expr, c.jaw.to(f32), c.eyes.to(f32), c.eyelids.to(f32))

    def _vertices_core(self, shape: Tensor, expr: Tensor, jaw: Tensor, eyes: Tensor, eyelids: Tensor) -> Tensor:
        """FLAME on the used vertices for float32 ``shape [1|B, S]``, ``expr [B, E]``, ``jaw [B, 6]``, ``eyes [B, 12]``,
        ``eyelids [B, 2]`` -> ``[B, U, 3]``."""
        B = expr.shape[0]
        U = self.n_used
        rot = rot6d_to_matrix(torch.cat((jaw, eyes), dim=1).view(B, 3, 6))  # [B, 3, 3, 3]
        eye = self.eye3
        pose_feature = (rot - eye).reshape(B, 27)
        # joints 1 (neck) is the identity: its 9 pose features are zero, joints 2..4 follow
        feats = torch.cat((shape.expand(B, -1), expr, pose_feature.new_zeros(B, 9), pose_feature), dim=1)
        lin = torch.addmm(self.flame_base, feats, self.flame_dirs)  # [B, U*4 + 15]
        v_posed = lin[:, :U * 4].view(B, U, 4)  # homogeneous
        J = lin[:, U * 4:].view(B, 5, 3)

        rots = torch.cat((eye.expand(B, 2, 3, 3), rot), dim=1)  # [B, 5, 3, 3] (global = neck = identity)
        if self.flat_chain:
            A_R = rots
        else:  # general chain: world rotations and translations joint by joint
            A_R, J = kinematic_chain(rots, J, self.parents, self.parent_index)  # J: world joint positions
        # [R | t] per joint with t = world_t - R J_rest; for the flat chain world_t = J_rest
        A_t = J[..., None] - A_R @ lin[:, U * 4:].view(B, 5, 3, 1)  # [B, 5, 3, 1]
        A = torch.cat((A_R, A_t), dim=-1).reshape(B, 5, 12)  # [B, 5, 3x4]
        T = torch.matmul(self.lbs_weights, A).view(B, U, 3, 4)  # blended transforms
        verts = (T @ v_posed[..., None]).view(B, U * 3)
        if self.has_eyelids:
            verts = torch.addmm(verts, eyelids, self.eyelid_dirs)
        return verts.view(B, U, 3)

    def mlp(self, cond: Tensor) -> Tensor:
        """Raw tanh outputs ``[B, N, 10]`` (float32) for conditions ``cond [B, cond_dim]``."""
        return self.mlp_outputs(cond)[0]

    def mlp_outputs(self, cond: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(raw [B, N, 10], colour offset [B, N, 3] RGB or None)`` (float32) for ``cond [B, cond_dim]``; the
        colour offset exists when the avatar has a colour head."""
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"Animator.mlp: cond has shape {tuple(cond.shape)}, expected [B, {self.cond_dim}]")
        B, N = cond.shape[0], self.n_gaussians
        c = (cond.to(torch.float32) @ self.w_cond_t).to(self.mlp_dtype)  # [B, H]
        if self.fused_mlp:
            both = fused_mlp(self.h_pe, c, self.mlp_w_hidden, self.mlp_b_hidden, self.head_w, self.head_b)
            if not self.has_color:
                return torch.tanh_(both), None  # [B, N, 10]
            return (torch.tanh(both[..., :10]),  # [B, N, 10], [B, N, 3]
                    torch.tanh(both[..., 10:]).mul_(self.color_offset))
        if self.mlp_layer_ops:
            return self._mlp_with_layer_ops(c)
        out = torch.empty(B, N, 10, dtype=torch.float32, device=c.device)
        color = torch.empty(B, N, 3, dtype=torch.float32, device=c.device) if self.has_color else None
        # (frame, Gaussian) rows in chunks of about mlp_rows: a chunk's activations (mlp_rows x 256 x 2 B in bf16,
        # in and out of each layer) stay in L2 between the layers instead of making a round trip through HBM
        for frames, gauss in mlp_chunks(B, N, self.mlp_rows):
            self._mlp_chunk(c[frames], gauss, out[frames, gauss].view(-1, 10),
                            None if color is None else color[frames, gauss].view(-1, 3))
        if color is not None:
            color = torch.tanh_(color).mul_(self.color_offset)
        return torch.tanh_(out), color

    def _hidden_layers(self, h: Tensor) -> Tensor:
        """``[rows, H]`` activations through the hidden layers (in the MLP dtype)."""
        for w_t, b in self.hidden:
            if self._fused_relu:  # cuBLASLt bias + ReLU epilogue: one pass over the activations instead of two
                h = torch._addmm_activation(b, h, w_t)
            else:
                h = torch.relu_(torch.addmm(b, h, w_t))
        return h

    def _mlp_with_layer_ops(self, c: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`mlp_outputs` with the first and last layers as ``flashavatar.ops.mlp_input`` / ``mlp_head``
        (``c [B, H]``: the frames' halves of the first layer, in the MLP dtype)."""
        B, N, O = c.shape[0], self.n_gaussians, self.head_w.shape[0]
        chunks = mlp_chunks(B, N, self.mlp_rows)
        both = None if len(chunks) == 1 else torch.empty(B, N, O, dtype=torch.float32, device=c.device)
        for frames, gauss in chunks:
            h = mlp_input(self.h_pe[gauss], c[frames])  # [b, n, H]
            b, n = h.shape[:2]
            y = mlp_head(self._hidden_layers(h.view(b * n, -1)), self.head_w, self.head_b, apply_tanh=True)
            if both is None:
                both = y.view(B, N, O)  # [B, N, 10 (+3)]
            else:
                both[frames, gauss] = y.view(b, n, O)
        if not self.has_color:
            return both, None
        return both[..., :10].contiguous(), both[..., 10:].mul(self.color_offset)  # [B, N, 10], [B, N, 3]

    def _mlp_chunk(self, c: Tensor, gauss: slice, out: Tensor, color: Tensor | None = None) -> None:
        """Pre-tanh outputs of frames ``c [b, H]`` (their per-frame first-layer parts) and Gaussians ``gauss``,
        written into ``out [b * n, 10]`` and (colour head) ``color [b * n, 3]`` (float32, contiguous)."""
        h = self._hidden_layers(torch.relu_(self.h_pe[None, gauss] + c[:, None]).view(out.shape[0], -1))  # [b*n, H]
        self._output_layer(h, self.w_out_t, self.w_out_t32, self.b_out, out)
        if color is not None:
            self._output_layer(h, self.w_col_t, self.w_col_t32, self.b_col, color)

    def _output_layer(self, h: Tensor, w_t: Tensor, w_t32: Tensor, bias: Tensor, out: Tensor) -> None:
        """``out = h @ w + bias`` in float32 from activations ``h`` in the MLP dtype."""
        if h.dtype == torch.float32:
            torch.addmm(bias, h, w_t32, out=out)
        elif self._mm_out_dtype:
            torch.add(torch.mm(h, w_t, out_dtype=torch.float32), bias, out=out)
        else:  # products of the rounded activations, accumulated and returned in float32
            torch.addmm(bias, h.to(torch.float32), w_t.to(torch.float32), out=out)

    def assemble(self, verts: Tensor, raw: Tensor, sh_degree: int | None = None,
                 color: Tensor | None = None) -> dict[str, Any]:
        """Gaussians from the posed used vertices ``[B, U, 3]``, the MLP outputs ``[B, N, 10]`` and (colour
        head) the RGB offsets ``color [B, N, 3]``; with a shaded avatar the colours are shaded from ``verts``."""
        B, N = raw.shape[0], self.n_gaussians
        if tuple(raw.shape) != (B, N, 10) or tuple(verts.shape) != (B, self.n_used, 3):
            raise ValueError(f"Animator.assemble: verts {tuple(verts.shape)} / raw {tuple(raw.shape)}, expected "
                             f"[{B}, {self.n_used}, 3] / [{B}, {N}, 10]")
        if self.fused_assembly:
            means, quats, scales, _ = gaussian_assembly(verts, self.local_faces_i32, self.barycentrics, self.rotation,
                                                        self.log_scale, raw, offset_scale=self.offset_scale,
                                                        parity=self.parity)
        else:
            means, quats, scales = self._assemble_fn(verts, raw)
        d = self.avatar.active_sh_degree if sh_degree is None else int(sh_degree)
        k = (d + 1) ** 2
        if color is not None and tuple(color.shape) != (B, N, 3):
            raise ValueError(f"Animator.assemble: color has shape {tuple(color.shape)}, expected [{B}, {N}, 3]")
        shade = None
        if self.shading is not None:  # the triangle normals of the posed used vertices
            matrix, inv_canon, mouth_one = self.shading
            e_posed = irradiance_from_matrix(triangle_normals(verts[:, self.local_faces]), matrix)  # [B, N, 3]
            shade = torch.addcmul(mouth_one, e_posed.clamp_min(1e-3), inv_canon)  # [B, N, 3]
        sh = frame_sh(self.sh[:, :k], color, B, shade)  # [B, N, k, 3]
        return {"means": means, "quats": quats, "scales": scales,
                "opacities": self.opacities.expand(B, N), "sh": sh, "sh_degree": d}

    def _assemble_core(self, verts: Tensor, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tri = verts[:, self.local_faces]  # [B, N, 3 corners, 3]
        # [B, N, 3, 3]: surface point, edge 0->1, edge 0->2. Written as three broadcast multiply-adds, not
        # `tri_weights @ tri`: a matmul here is a batched GEMM of one 3x3 matrix per Gaussian (slow on GPUs).
        w = self.tri_weights[..., None]  # [N, 3 outputs, 3 corners, 1]
        pts = w[:, :, 0] * tri[:, :, None, 0] + w[:, :, 1] * tri[:, :, None, 1] + w[:, :, 2] * tri[:, :, None, 2]
        means = torch.add(pts[:, :, 0], raw[..., :3], alpha=self.offset_scale)
        q_delta = torch.cat((torch.exp(raw[..., 3:4]), raw[..., 4:7]), dim=-1)
        q_delta = q_delta / q_delta.norm(dim=-1, keepdim=True)
        q_local = (self.L_base * q_delta[..., None, :]).sum(-1)  # q_base ⊗ q_delta [B, N, 4] (no tiny GEMMs)
        delta_scale = raw[..., 7:10]
        if self.parity:
            quats = q_local
            log_s = self.log_scale * torch.exp(delta_scale)
        else:
            e1, e2 = pts[:, :, 1], pts[:, :, 2]
            n = torch.cross(e1, e2, dim=-1)
            e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            frame_t = torch.stack((e1, torch.cross(n, e1, dim=-1), n), dim=-2)  # rows = the frame's columns
            frame = matrix_to_quat_fast(frame_t, transposed=True, tables=self.quat_tables)
            quats = quat_multiply_fast(frame, q_local, self.hamilton)
            log_s = self.log_scale + delta_scale
        return means, quats, torch.exp(log_s)

    def gaussians(self, codes, sh_degree: int | None = None) -> dict[str, Any]:
        """FLAME → MLP → Gaussians for ``B`` frames of codes (:class:`FlameCodes` or dict)."""
        c = FlameCodes.from_any(codes)
        with torch.no_grad():
            verts = self.vertices(c)
            raw, color = self.mlp_outputs(c.condition())
            return self.assemble(verts, raw, sh_degree, color)

    def render(self, codes, viewmats: Tensor, Ks: Tensor, width: int, height: int, *, sh_degree: int | None = None,
               backgrounds: Tensor | None = None, rasterizer=None, check_finite: bool = False):
        """Animate and rasterise: ``viewmats [B, C, 4, 4]``, ``Ks [B, C, 3, 3]``, ``backgrounds [B, C, 3]`` ->
        ``(render [B, C, H, W, 3], alpha [B, C, H, W, 1], meta)``. ``rasterizer`` defaults to
        ``flashavatar.ops.rasterize_gaussians`` (any function with its signature works, e.g. gsplat's
        ``rasterization``)."""
        g = self.gaussians(codes, sh_degree)
        with torch.no_grad():
            return rasterize_with(rasterizer, g, viewmats, Ks, width, height, backgrounds, check_finite)


def rasterize_with(rasterizer, g: dict[str, Any], viewmats: Tensor, Ks: Tensor, width: int, height: int,
                   backgrounds: Tensor | None = None, check_finite: bool = False):
    """Rasterise an avatar output ``g`` with ``rasterizer`` (default: our op, validation read-back off)."""
    if rasterizer is None:
        return rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmats, Ks,
                                   width, height, sh_degree=g["sh_degree"], backgrounds=backgrounds,
                                   check_finite=check_finite)
    return rasterizer(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmats, Ks, width, height,
                      sh_degree=g["sh_degree"], backgrounds=backgrounds)


class GraphedRenderer:
    """Animate + rasterise ``batch`` frames replayed from one CUDA graph.

    ``renderer = GraphedRenderer(animator, batch, width, height, viewmats=[B, C, 4, 4], Ks=[B, C, 3, 3])``;
    ``image = renderer(codes)`` copies the codes (and, if given, new cameras) into the static input buffers,
    replays the graph and returns the static output ``[B, C, H, W, 3]`` (overwritten by the next call:
    clone it to keep it). Without CUDA it runs the same step eagerly (no graph).
    """

    def __init__(self, animator: Animator, batch: int, width: int, height: int, *, viewmats: Tensor, Ks: Tensor,
                 sh_degree: int | None = None, backgrounds: Tensor | None = None, warmup: int = 3,
                 rasterizer=None, codes=None):
        dev = animator.device
        if viewmats.dim() != 4 or viewmats.shape[0] != batch or viewmats.shape[-2:] != (4, 4):
            raise ValueError(f"GraphedRenderer: viewmats has shape {tuple(viewmats.shape)}, "
                             f"expected [{batch}, C, 4, 4]")
        C = viewmats.shape[1]
        if tuple(Ks.shape) != (batch, C, 3, 3):
            raise ValueError(f"GraphedRenderer: Ks has shape {tuple(Ks.shape)}, expected [{batch}, {C}, 3, 3]")
        self.animator, self.batch, self.width, self.height = animator, int(batch), int(width), int(height)
        self.sh_degree = animator.avatar.active_sh_degree if sh_degree is None else int(sh_degree)
        self.rasterizer = rasterizer
        if codes is None:
            codes = FlameCodes.neutral(batch, animator.n_shape, animator.n_expr, device=dev)
        c = FlameCodes.from_any(codes)
        # static inputs (float32, contiguous, [B, ...])
        self.static = {k: v.to(dev, torch.float32).expand(batch, -1).contiguous().clone()
                       for k, v in c.as_dict().items()}
        self.viewmats = viewmats.to(dev, torch.float32).contiguous().clone()
        self.Ks = Ks.to(dev, torch.float32).contiguous().clone()
        bg = torch.zeros(batch, C, 3, device=dev) if backgrounds is None else backgrounds.to(dev, torch.float32)
        self.backgrounds = bg.expand(batch, C, 3).contiguous().clone()
        self.graph = None
        self.output = None
        if dev.type == "cuda":
            self._capture(warmup)

    def _step(self) -> Tensor:
        g = self.animator.gaussians(self.static, self.sh_degree)
        render, _, _ = rasterize_with(self.rasterizer, g, self.viewmats, self.Ks, self.width, self.height,
                                      self.backgrounds)
        return render

    def _capture(self, warmup: int) -> None:
        # Warm up on a side stream (cuBLAS handles, the rasteriser's intersection capacity: synchronising
        # after each call lets its asynchronous read-back land, so the captured capacity fits these frames).
        side = torch.cuda.Stream(self.animator.device)
        side.wait_stream(torch.cuda.current_stream(self.animator.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(max(1, warmup)):
                self._step()
                torch.cuda.synchronize(self.animator.device)
        torch.cuda.current_stream(self.animator.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.output = self._step()

    @torch.no_grad()
    def __call__(self, codes=None, viewmats: Tensor | None = None, Ks: Tensor | None = None) -> Tensor:
        if codes is not None:
            c = FlameCodes.from_any(codes)
            for k, v in c.as_dict().items():
                dst = self.static[k]
                if v.shape[-1] != dst.shape[-1] or v.shape[0] not in (1, self.batch):
                    raise ValueError(f"GraphedRenderer: codes['{k}'] has shape {tuple(v.shape)}, expected "
                                     f"[{self.batch} or 1, {dst.shape[-1]}]")
                dst.copy_(v.expand_as(dst), non_blocking=True)
        for name, new in (("viewmats", viewmats), ("Ks", Ks)):
            if new is not None:
                dst = getattr(self, name)
                if tuple(new.shape) != tuple(dst.shape):
                    raise ValueError(f"GraphedRenderer: {name} has shape {tuple(new.shape)}, expected "
                                     f"{tuple(dst.shape)}")
                dst.copy_(new, non_blocking=True)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.output

    def replay(self) -> Tensor:
        """Replay with the inputs as they are (for timing)."""
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.output
