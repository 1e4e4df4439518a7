"""The Gaussian head avatar of FlashAvatar (SPEC §3), with the fixes of SPEC §3.3 behind a parity switch.

Gaussians are attached to the template mesh through its UV chart: every texel centre of a ``uv_size``²
grid that falls inside a UV triangle becomes one Gaussian with a fixed (face, barycentric) slot. Per frame
the posed FLAME mesh gives the surface point p; an MLP conditioned on the expression codes adds an offset,
a rotation delta and a scale change.

Output of :meth:`GaussianAvatar.forward` for ``B`` frames (``N`` Gaussians)::

    means [B, N, 3]  quats [B, N, 4] (w, x, y, z; unit)  scales [B, N, 3] (std-devs, metres)
    opacities [B, N] in [0, 1]  sh [B, N, 16, 3] (an expanded view of one shared [N, 16, 3] tensor)
    sh_degree (int, active degree)  vertices [B, V, 3]  residual (dict, see residual_state)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .camera import matrix_to_quat, quat_multiply
from .flame import FLAME, FlameCodes, ObjMesh, read_obj

__all__ = ["GaussianAvatar", "UVSamples", "rasterize_uv", "sample_mouth_faces", "positional_encoding",
           "DEFAULT_LRS", "residual_covariance", "frame_sh", "shade_sh", "sh9_basis", "triangle_normals",
           "irradiance_ratio"]

# learning rates of the original (SPEC §4); f_rest is colour / 20
DEFAULT_LRS = {"mlp": 1e-4, "f_dc": 2.5e-3, "f_rest": 2.5e-3 / 20, "opacity": 5e-2, "scaling": 5e-3,
               "rotation": 1e-3}
SH_C0 = 0.28209479177387814  # band-0 SH constant: colour = 0.5 + C0 · f_dc (3DGS convention)


def frame_sh(sh: torch.Tensor, color: torch.Tensor | None, batch: int,
             shade: torch.Tensor | None = None) -> torch.Tensor:
    """SH coefficients per frame ``[B, N, K, 3]`` from the per-Gaussian ``sh [N, K, 3]``: an expanded view, or
    with a shading factor ``shade [B, N, 3]`` the colour scaled by it (:func:`shade_sh`), and with a colour
    offset ``color [B, N, 3]`` (RGB) the DC band shifted by it (the DC band's colour is 0.5 + C0 · dc, so an RGB
    offset is offset / C0 in dc)."""
    out = sh.expand(batch, *sh.shape) if shade is None else shade_sh(sh, shade)  # [B, N, K, 3]
    if color is None:
        return out
    return torch.cat((out[:, :, :1] + (color / SH_C0)[:, :, None], out[:, :, 1:]), dim=2)


def shade_sh(sh: torch.Tensor, shade: torch.Tensor) -> torch.Tensor:
    """SH ``[B, N, K, 3]`` whose colour is ``shade [B, N, 3]`` times that of ``sh`` (``[B, N, K, 3]`` or
    ``[N, K, 3]``): the colour is 0.5 + Σ_k Y_k c_k, so every band scales and the DC band also takes
    (shade − 1) · 0.5 / C0."""
    out = sh * shade[:, :, None, :]  # [B, N, K, 3], a new tensor: the DC shift goes in place (no concatenation)
    out[:, :, 0] += (shade - 1.0) * (0.5 / SH_C0)
    return out


# Real SH of degree <= 2 (9 functions) of a unit normal: the irradiance basis (Ramamoorthi & Hanrahan 2001:
# a Lambertian surface's irradiance under any distant light is within a few percent of its 9-term projection).
_SH9 = (0.28209479177387814, 0.4886025119029199, 1.0925484305920792, 0.31539156525252005, 0.5462742152960396)


def sh9_basis(n: torch.Tensor) -> torch.Tensor:
    """``[..., 9]`` real SH basis (degree 0-2) at unit vectors ``n [..., 3]``."""
    x, y, z = n.unbind(-1)
    c0, c1, c2, c3, c4 = _SH9
    return torch.stack((torch.full_like(x, c0), c1 * y, c1 * z, c1 * x, c2 * x * y, c2 * y * z,
                        c3 * (3 * z * z - 1), c2 * x * z, c4 * (x * x - y * y)), dim=-1)


def irradiance_matrix(coeffs: torch.Tensor) -> torch.Tensor:
    """The 9-term irradiance ``coeffs [9, 3]`` as a quadratic form: ``M [4, 4, 3]`` (symmetric in its first two
    dims) with ``n̂ᵀ M[..., c] n̂ = Σ_k L_kc Y_k(n)`` for ``n̂ = (x, y, z, 1)`` and any ``n`` (Ramamoorthi &
    Hanrahan's matrix form; the constant −c3 of Y20 sits in the (w, w) entry). Five small products per normal
    instead of nine basis functions and a 9-wide GEMM."""
    c0, c1, c2, c3, c4 = _SH9
    L = coeffs
    xx, yy, zz, ww = c4 * L[8], -c4 * L[8], 3 * c3 * L[6], c0 * L[0] - c3 * L[6]
    xy, yz, xz = 0.5 * c2 * L[4], 0.5 * c2 * L[5], 0.5 * c2 * L[7]
    xw, yw, zw = 0.5 * c1 * L[3], 0.5 * c1 * L[1], 0.5 * c1 * L[2]
    rows = ((xx, xy, xz, xw), (xy, yy, yz, yw), (xz, yz, zz, zw), (xw, yw, zw, ww))
    return torch.stack([torch.stack(r) for r in rows])  # [4, 4, 3]


def irradiance_from_matrix(normals: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` irradiance n̂ᵀ M n̂ per colour channel at ``normals [..., 3]`` (``matrix`` from
    :func:`irradiance_matrix`)."""
    nh = torch.cat((normals, torch.ones_like(normals[..., :1])), dim=-1)  # [..., 4]
    t = (nh @ matrix.reshape(4, 12)).unflatten(-1, (4, 3))  # [..., 4 (j), 3]: Σ_i n̂_i M_ij
    return (t * nh[..., None]).sum(-2)


def triangle_normals(tri: torch.Tensor) -> torch.Tensor:
    """Unit normals ``[..., 3]`` of triangles ``tri [..., 3 corners, 3]`` (right-handed corner order)."""
    n = torch.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def irradiance_ratio(normals: torch.Tensor, canonical_normals: torch.Tensor, coeffs: torch.Tensor,
                     unshaded: torch.Tensor) -> torch.Tensor:
    """Shading factor ``[B, N, 3]`` = E(n) / E(n̄) with E(n) = max(1e-3, Σ_k L_k Y_k(n)) per colour channel:
    ``normals [B, N, 3]`` posed, ``canonical_normals [N, 3]`` at the neutral face, ``coeffs [9, 3]`` the
    learned irradiance L. ``unshaded [N]`` (bool: the mouth interior) keeps a factor of 1."""
    e_posed = (sh9_basis(normals) @ coeffs).clamp_min(1e-3)  # [B, N, 3]
    e_canon = (sh9_basis(canonical_normals) @ coeffs).clamp_min(1e-3)  # [N, 3]
    return torch.where(unshaded[:, None], torch.ones_like(e_posed), e_posed / e_canon)

# ------------------------------------------------------------------------------------------- UV sampling
@dataclass
class UVSamples:
    face_ids: np.ndarray     # [N] int64, index into the mesh faces
    barycentrics: np.ndarray  # [N, 3] float64, sum to 1, all >= 0
    uv: np.ndarray           # [N, 2] float64 texel-centre UV coordinates
    texel: np.ndarray        # [N, 2] int64 (column i along u, row j along v)


def rasterize_uv(uvs: np.ndarray, face_uvs: np.ndarray, uv_size: int) -> UVSamples:
    """Texel centres ``((i + 0.5) / S, (j + 0.5) / S)`` of an ``S = uv_size`` grid lying inside a UV triangle.

    ``uvs [T, 2]``, ``face_uvs [F, 3]``. A texel covered by several triangles (shared edges, overlapping
    charts) goes to the lowest face index. Degenerate UV triangles get nothing. Fully vectorised: every
    face enumerates the texels of its bounding box.
    """
    if uv_size < 1:
        raise ValueError(f"rasterize_uv: uv_size must be >= 1, got {uv_size}")
    S = int(uv_size)
    tri = np.asarray(uvs, dtype=np.float64)[np.asarray(face_uvs)] * S  # [F, 3, 2] in texel units
    lo = np.clip(np.ceil(tri.min(1) - 0.5), 0, S).astype(np.int64)  # first texel index whose centre >= min
    hi = np.clip(np.floor(tri.max(1) - 0.5), -1, S - 1).astype(np.int64)
    nx, ny = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0), np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area2 = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    counts = np.where(np.abs(area2) > 1e-12, nx * ny, 0)
    total = int(counts.sum())
    empty = UVSamples(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 2), np.int64))
    if total == 0:
        return empty
    face = np.repeat(np.arange(len(tri)), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    local = np.arange(total) - start
    ix = lo[face, 0] + local % nx[face]
    iy = lo[face, 1] + local // nx[face]
    p = np.stack((ix + 0.5, iy + 0.5), -1) - tri[face, 0]
    l1 = (p[:, 0] * e2[face, 1] - p[:, 1] * e2[face, 0]) / area2[face]
    l2 = (e1[face, 0] * p[:, 1] - e1[face, 1] * p[:, 0]) / area2[face]
    l0 = 1.0 - l1 - l2
    bary = np.stack((l0, l1, l2), -1)
    inside = (bary >= -1e-10).all(-1)
    face, ix, iy, bary = face[inside], ix[inside], iy[inside], bary[inside]
    texel_id = iy * S + ix
    order = np.lexsort((face, texel_id))  # by texel, then lowest face first
    texel_id, face, ix, iy, bary = texel_id[order], face[order], ix[order], iy[order], bary[order]
    first = np.ones(len(texel_id), bool)
    first[1:] = texel_id[1:] != texel_id[:-1]
    face, ix, iy, bary = face[first], ix[first], iy[first], bary[first]
    bary = np.clip(bary, 0.0, None)
    bary /= bary.sum(-1, keepdims=True)
    uv = np.stack((ix + 0.5, iy + 0.5), -1) / S
    return UVSamples(face, bary, uv, np.stack((ix, iy), -1))


def _halton(n: int, base: int) -> np.ndarray:
    out = np.zeros(n)
    for k in range(n):
        f, r, i = 1.0, 0.0, k + 1
        while i > 0:
            f /= base
            r += f * (i % base)
            i //= base
        out[k] = r
    return out


def sample_mouth_faces(vertices: np.ndarray, faces: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, area-weighted samples on the mouth faces: ``(face index into faces [count],
    barycentrics [count, 3])``. Every face gets at least one sample when ``count >= len(faces)``; faces of
    zero area (a closed mouth) still get their share through a small area floor."""
    if count <= 0 or len(faces) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3))
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    area = area + 0.05 * area.mean() + 1e-12
    share = area / area.sum() * count
    per_face = np.floor(share).astype(np.int64)
    if count >= len(faces):
        per_face = np.maximum(per_face, 1)
    while per_face.sum() < count:  # largest remainder
        per_face[np.argmax(share - per_face)] += 1
    while per_face.sum() > count:
        per_face[np.argmax(per_face)] -= 1
    face_idx = np.repeat(np.arange(len(faces)), per_face)
    h2, h3 = _halton(int(per_face.max()), 2), _halton(int(per_face.max()), 3)
    local = np.arange(len(face_idx)) - np.repeat(np.cumsum(per_face) - per_face, per_face)
    r1, r2 = h2[local], h3[local]
    s = np.sqrt(r1)
    bary = np.stack((1 - s, s * (1 - r2), s * r2), -1)
    return face_idx, bary


def positional_encoding(x: torch.Tensor, n_freqs: int = 8) -> torch.Tensor:
    """``[..., 3]`` -> ``[..., 3 + 6·n_freqs]``: the input, then sin/cos at 2^0 .. 2^(n_freqs-1) (51-D)."""
    freqs = 2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device)
    xb = x[..., None, :] * freqs[:, None]  # [..., n_freqs, 3]
    enc = torch.cat((torch.sin(xb), torch.cos(xb)), dim=-1).flatten(-2)
    return torch.cat((x, enc), dim=-1)


def _knn_mean_distance(points: np.ndarray, k: int = 3) -> np.ndarray:
    from scipy.spatial import cKDTree

    k_eff = min(k, len(points) - 1)
    if k_eff < 1:
        return np.full(len(points), 1e-3)
    d, _ = cKDTree(points).query(points, k=k_eff + 1)
    return d[:, 1:].mean(-1)


def residual_covariance(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Σ = R diag(s²) Rᵀ ``[..., 3, 3]`` from ``quats [..., 4]`` and std-dev ``scales [..., 3]``."""
    from .camera import quat_to_matrix

    R = quat_to_matrix(quats)
    return (R * scales[..., None, :] ** 2) @ R.transpose(-1, -2)


# -------------------------------------------------------------------------------------------- the avatar
def _refresh_after_load(module, incompatible_keys):  # a module-level function: the avatar stays picklable
    module._refresh_encoding()


class GaussianAvatar(nn.Module):
    """FlashAvatar's Gaussian head.

    Args:
        flame: a :class:`FLAME` layer (its ``faces`` include the mouth faces).
        template: the template OBJ with UVs (path or :class:`ObjMesh`); its first ``flame.n_mesh_faces``
            faces must be FLAME's faces in the same order.
        uv_size: UV grid resolution (128 → ~14.9k Gaussians on FLAME, 256 → ~59k).
        shape: the subject's shape code ``[n_shape]`` for the canonical positions (default zeros).
        mouth_fraction: fraction of all Gaussians placed on the mouth-closing faces (original: ~1%).
        drop_neck_boundary: drop texels on faces touching ``flame.neck_boundary``.
        parity: ``True`` = the original behaviour (no triangle-frame rotation, q = q_base ⊗ q_Δ, and a
            multiplied log-scale s = exp(ŝ · exp(δ))); ``False`` = q = q_frame ⊗ q_base ⊗ q_Δ and
            s = exp(ŝ + δ).
        offset_scale: Δx = offset_scale · tanh(o) (metres).
        color_offset: 0 (default) = SPEC's MLP with 10 outputs and a fixed colour per Gaussian. > 0: a second
            output head on the MLP's last hidden layer adds ``color_offset · tanh(o_rgb)`` (RGB, so at most
            ±color_offset) to each Gaussian's base colour per frame: shading that follows the expression
            (a cheek's normal turning under a smile, wrinkles) which a fixed colour cannot hold.
        shading: False (default) = SPEC's fixed colour. True: each Gaussian's colour is multiplied per frame by
            E(n) / E(n̄), n and n̄ its triangle's normal on the posed and on the neutral mesh and E a learned
            9-coefficient SH irradiance per colour channel (27 parameters in all, light fixed in the head's
            frame; starts as E = 1): diffuse shading that follows the expression, with no per-frame freedom
            (the mouth interior is not shaded). The free SH colour is then the colour at the neutral face.
    """

    def __init__(self, flame: FLAME, template, *, uv_size: int = 128, shape: torch.Tensor | None = None,
                 mouth_fraction: float = 0.01, drop_neck_boundary: bool = True, parity: bool = False,
                 sh_degree: int = 3, hidden: int = 256, layers: int = 6, n_freqs: int = 8,
                 offset_scale: float = 1.0, init_opacity: float = 0.1, seed: int = 0, color_offset: float = 0.0,
                 shading: bool = False):
        super().__init__()
        if not (math.isfinite(color_offset) and color_offset >= 0):
            raise ValueError(f"GaussianAvatar: color_offset must be a finite number >= 0, got {color_offset}")
        self.color_offset = float(color_offset)
        self.flame = flame
        self.parity = bool(parity)
        # forward assembles the Gaussians with the compiled op where it can (False: always the torch path)
        self.fused_assembly = True
        self.max_sh_degree = int(sh_degree)
        self.active_sh_degree = 0
        self.offset_scale = float(offset_scale)
        self.n_freqs = n_freqs
        self.uv_size = int(uv_size)

        obj = template if isinstance(template, ObjMesh) else read_obj(template)
        src = template if not isinstance(template, ObjMesh) else "template mesh"
        F = flame.n_mesh_faces
        mesh_faces = flame.faces[:F].cpu().numpy()
        if obj.uvs is None:
            raise ValueError(f"{src}: template OBJ has no texture coordinates (vt / f v/vt)")
        if len(obj.faces) < F or not np.array_equal(obj.faces[:F], mesh_faces):
            raise ValueError(f"{src}: template faces ({len(obj.faces)}) do not match the FLAME model's "
                             f"{F} faces ({flame.model_path})")

        # 1. UV samples on the mesh faces
        uvs = rasterize_uv(obj.uvs, obj.face_uvs[:F], self.uv_size)
        keep = np.ones(len(uvs.face_ids), bool)
        if drop_neck_boundary and flame.neck_boundary.numel():
            on_boundary = np.isin(mesh_faces, flame.neck_boundary.cpu().numpy()).any(1)
            keep = ~on_boundary[uvs.face_ids]
        face_ids, bary, uv = uvs.face_ids[keep], uvs.barycentrics[keep], uvs.uv[keep]

        # canonical positions: subject shape, zero expression, identity pose
        n_shape = flame.n_shape
        shape = torch.zeros(n_shape) if shape is None else torch.as_tensor(shape, dtype=torch.float32).reshape(-1)
        if shape.numel() != n_shape:
            raise ValueError(f"GaussianAvatar: shape has {shape.numel()} entries, expected {n_shape}")
        with torch.no_grad():
            v_canon = flame.shaped_template(shape[None].to(flame.v_template.device))[0].double().cpu().numpy()

        # 2. the mouth faces get ~mouth_fraction of all Gaussians
        mouth = flame.mouth_faces.cpu().numpy()
        n_mouth = int(round(len(face_ids) * mouth_fraction / max(1e-9, 1 - mouth_fraction))) if len(mouth) else 0
        m_idx, m_bary = sample_mouth_faces(v_canon, mouth, n_mouth)
        face_ids = np.concatenate((face_ids, m_idx + F))
        bary = np.concatenate((bary, m_bary))
        uv = np.concatenate((uv, np.full((len(m_idx), 2), -1.0)))  # mouth Gaussians have no UV
        is_mouth = np.concatenate((np.zeros(len(face_ids) - len(m_idx), bool), np.ones(len(m_idx), bool)))
        N = len(face_ids)
        if N == 0:
            raise ValueError(f"{src}: UV sampling at uv_size={uv_size} produced no Gaussians")

        all_faces = flame.faces.cpu().numpy()
        canon = (v_canon[all_faces[face_ids]] * bary[..., None]).sum(1)  # [N, 3]
        self.register_buffer("face_ids", torch.as_tensor(face_ids, dtype=torch.long))
        # vertex indices of each Gaussian's triangle [N, 3] (non-persistent: derived from the FLAME faces)
        self.register_buffer("gaussian_faces", flame.faces.cpu()[self.face_ids], persistent=False)
        self.register_buffer("barycentrics", torch.as_tensor(bary, dtype=torch.float32))
        self.register_buffer("uv", torch.as_tensor(uv, dtype=torch.float32))
        self.register_buffer("is_mouth", torch.as_tensor(is_mouth))
        self.register_buffer("canonical_means", torch.as_tensor(canon, dtype=torch.float32))
        # the MLP's per-Gaussian input never changes: encode it once [N, 3 + 6 n_freqs]
        self.register_buffer("encoded_means", positional_encoding(self.canonical_means, n_freqs), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.register_buffer("shape_code", shape.clone())

        # 3. the deformation MLP: PE(x̄) (51) + condition (n_expr + 20) -> `layers` × hidden ReLU -> 10, tanh.
        # The first layer is split into a per-Gaussian and a per-frame part (same function as one Linear on
        # the concatenation) so the per-Gaussian half is computed once per batch.
        gen = torch.Generator().manual_seed(seed)
        pe_dim = 3 + 6 * n_freqs
        cond_dim = flame.n_expr + 20
        self.pe_dim, self.cond_dim = pe_dim, cond_dim
        self.mlp_in_pe = nn.Linear(pe_dim, hidden)
        self.mlp_in_cond = nn.Linear(cond_dim, hidden, bias=False)
        self.mlp_hidden = nn.Sequential(*[m for _ in range(layers - 1) for m in (nn.Linear(hidden, hidden), nn.ReLU())])
        self.mlp_out = nn.Linear(hidden, 10)
        with torch.no_grad():  # PyTorch's default Linear init, seeded; a small output layer (starts as the mesh)
            bound = 1.0 / math.sqrt(pe_dim + cond_dim)
            self.mlp_in_pe.weight.uniform_(-bound, bound, generator=gen)
            self.mlp_in_pe.bias.uniform_(-bound, bound, generator=gen)
            self.mlp_in_cond.weight.uniform_(-bound, bound, generator=gen)
            for layer in self.mlp_hidden:
                if isinstance(layer, nn.Linear):
                    b = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-b, b, generator=gen)
                    layer.bias.uniform_(-b, b, generator=gen)
            self.mlp_out.weight.uniform_(-1e-3, 1e-3, generator=gen)
            self.mlp_out.bias.zero_()
        # optional colour head (named mlp_* so it joins the MLP's optimiser group); zero weights: it starts as a
        # zero offset (its gradient h^T g is not zero, so it learns)
        self.mlp_color = nn.Linear(hidden, 3) if self.color_offset > 0 else None
        if self.mlp_color is not None:
            with torch.no_grad():
                self.mlp_color.weight.zero_()
                self.mlp_color.bias.zero_()

        # 4. free per-Gaussian parameters
        n_sh = (self.max_sh_degree + 1) ** 2
        self.features_dc = nn.Parameter(torch.zeros(N, 1, 3))  # SH DC 0 = grey 0.5 after the +0.5 offset
        self.features_rest = nn.Parameter(torch.zeros(N, n_sh - 1, 3))
        self.opacity_logit = nn.Parameter(torch.full((N,), math.log(init_opacity / (1 - init_opacity))))
        base = np.log(np.clip(_knn_mean_distance(canon, 3), 1e-7, None))
        self.log_scale = nn.Parameter(torch.as_tensor(base, dtype=torch.float32)[:, None].repeat(1, 3))
        self.rotation = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(N, 1))

        # 5. optional shading (see the class docstring): irradiance coefficients [9, 3], E = 1 at the start
        self.shading_sh: nn.Parameter | None = None
        if shading:
            coeffs = torch.zeros(9, 3)
            coeffs[0] = 1.0 / _SH9[0]
            self.shading_sh = nn.Parameter(coeffs)
            canon_tri = torch.as_tensor(v_canon[all_faces[face_ids]], dtype=torch.float32)  # [N, 3, 3]
            self.register_buffer("canonical_normals", triangle_normals(canon_tri))  # [N, 3]

    @torch.no_grad()
    def _refresh_encoding(self):  # after load_state_dict (canonical_means may have changed)
        self.encoded_means = positional_encoding(self.canonical_means, self.n_freqs)

    # ------------------------------------------------------------------------------------ parameters
    @property
    def n_gaussians(self) -> int:
        return self.face_ids.numel()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser group: mlp, f_dc (+ the shading coefficients), f_rest, opacity, scaling,
        rotation."""
        mlp = [p for name, p in self.named_parameters() if name.startswith("mlp_")]
        # the shading coefficients learn at the colour's rate (a per-step change of ~lr in E, as in the colours)
        f_dc = [self.features_dc] + ([self.shading_sh] if self.shading_sh is not None else [])
        return {"mlp": mlp, "f_dc": f_dc, "f_rest": [self.features_rest],
                "opacity": [self.opacity_logit], "scaling": [self.log_scale], "rotation": [self.rotation]}

    def optimizer_groups(self, lrs: dict | None = None) -> list[dict]:
        """``[{'name', 'params', 'lr'}]`` for ``torch.optim.Adam(..., eps=1e-15)``; ``lrs`` overrides
        :data:`DEFAULT_LRS` per group."""
        lrs = {**DEFAULT_LRS, **(lrs or {})}
        return [{"name": k, "params": v, "lr": lrs[k]} for k, v in self.parameter_groups().items()]

    @torch.no_grad()
    def set_colors(self, rgb: torch.Tensor) -> None:
        """Set the view-independent colour ``rgb [N, 3]`` in [0, 1] (SH DC; higher bands zeroed)."""
        rgb = torch.as_tensor(rgb, dtype=self.features_dc.dtype, device=self.features_dc.device)
        if rgb.shape != (self.n_gaussians, 3):
            raise ValueError(f"set_colors: rgb has shape {tuple(rgb.shape)}, expected [{self.n_gaussians}, 3]")
        self.features_dc[:, 0] = (rgb - 0.5) / SH_C0
        self.features_rest.zero_()

    def set_sh_degree_for_iteration(self, iteration: int, every: int = 500) -> int:
        """Active SH degree rises by one every ``every`` iterations up to the maximum."""
        self.active_sh_degree = min(self.max_sh_degree, iteration // every)
        return self.active_sh_degree

    # ------------------------------------------------------------------------------------ deformation
    def mlp(self, cond: torch.Tensor) -> torch.Tensor:
        """Raw tanh outputs ``[B, N, 10]`` for conditions ``[B, cond_dim]``."""
        return self.mlp_outputs(cond)[0]

    def mlp_outputs(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(raw [B, N, 10], colour offset [B, N, 3] in RGB or None)`` for conditions ``[B, cond_dim]``; the
        colour offset exists when ``color_offset > 0``."""
        h = torch.relu(self.mlp_in_pe(self.encoded_means)[None] + self.mlp_in_cond(cond)[:, None])  # [B, N, hidden]
        h = self.mlp_hidden(h)  # [B, N, hidden]
        raw = torch.tanh(self.mlp_out(h))
        if self.mlp_color is None:
            return raw, None
        return raw, self.color_offset * torch.tanh(self.mlp_color(h))

    def frame_sh(self, color: torch.Tensor | None, batch: int, shade: torch.Tensor | None = None) -> torch.Tensor:
        """SH coefficients per frame ``[B, N, K, 3]`` (see :func:`frame_sh`; ``shade [B, N, 3]``: times that,
        :func:`shade_sh`)."""
        return frame_sh(torch.cat((self.features_dc, self.features_rest), dim=1), color, batch, shade)

    def frame_shading(self, vertices: torch.Tensor) -> torch.Tensor | None:
        """Per-frame shading factor ``[B, N, 3]`` from the posed ``vertices [B, V, 3]`` (None without shading)."""
        if self.shading_sh is None:
            return None
        normals = triangle_normals(vertices[:, self.gaussian_faces])  # [B, N, 3]
        return irradiance_ratio(normals, self.canonical_normals, self.shading_sh, self.is_mouth)

    def face_frames(self, vertices: torch.Tensor, tri: torch.Tensor | None = None) -> torch.Tensor:
        """Orthonormal tangent frame per Gaussian's triangle as quaternions ``[B, N, 4]``: columns
        (edge v0→v1, normal × edge, normal)."""
        if tri is None:
            tri = vertices[:, self.gaussian_faces]  # [B, N, 3, 3]
        e1 = tri[:, :, 1] - tri[:, :, 0]
        e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n = triangle_normals(tri)
        e2 = torch.cross(n, e1, dim=-1)
        return matrix_to_quat(torch.stack((e1, e2, n), dim=-1))

    def forward(self, codes, *, vertices: torch.Tensor | None = None) -> dict:
        """``codes``: :class:`FlameCodes` or dict (shape, expr, jaw, eyes, eyelids) for ``B`` frames.
        ``vertices [B, V, 3]``: precomputed posed FLAME vertices (optional). Returns the dict described in
        the module docstring."""
        c = FlameCodes.from_any(codes)
        if vertices is None:
            vertices = self.flame(c.shape, c.expr, c.jaw, c.eyes, c.eyelids)  # [B, V, 3]
        B = vertices.shape[0]
        cond = c.condition().to(self.canonical_means.dtype)
        if cond.shape != (B, self.cond_dim):
            raise ValueError(f"GaussianAvatar: condition has shape {tuple(cond.shape)}, "
                             f"expected [{B}, {self.cond_dim}]")
        out, color = self.mlp_outputs(cond)  # [B, N, 10], [B, N, 3] or None
        offset = self.offset_scale * out[..., :3]
        sh = self.frame_sh(color, B, self.frame_shading(vertices))  # [B, N, K, 3]
        N = self.n_gaussians
        if self._use_fused_assembly(vertices, out):
            # one kernel (flashavatar.ops.gaussian_assembly, differentiable) for the same math as below
            from ..ops import gaussian_assembly

            means, quats, scales, q_local = gaussian_assembly(
                vertices, self.gaussian_faces, self.barycentrics, self.rotation, self.log_scale, out,
                offset_scale=self.offset_scale, parity=self.parity)
            return {"means": means, "quats": quats, "scales": scales,
                    "opacities": torch.sigmoid(self.opacity_logit).expand(B, N), "sh": sh,
                    "sh_degree": self.active_sh_degree, "vertices": vertices,
                    "residual": {"means": offset, "quats": q_local, "scales": scales}}

        tri = vertices[:, self.gaussian_faces]  # [B, N, 3 corners, 3]
        surface = (tri * self.barycentrics[None, :, :, None]).sum(2)  # [B, N, 3]
        q_delta = torch.cat((torch.exp(out[..., 3:4]), out[..., 4:7]), dim=-1)
        q_delta = q_delta / q_delta.norm(dim=-1, keepdim=True)
        delta_scale = out[..., 7:10]

        q_local = quat_multiply(self.rotation / self.rotation.norm(dim=-1, keepdim=True).clamp_min(1e-12), q_delta)
        if self.parity:
            quats = q_local
            log_s = self.log_scale * torch.exp(delta_scale)
        else:
            quats = quat_multiply(self.face_frames(vertices, tri), q_local)
            log_s = self.log_scale + delta_scale
        scales = torch.exp(log_s)
        return {
            "means": surface + offset,
            "quats": quats,
            "scales": scales,
            "opacities": torch.sigmoid(self.opacity_logit).expand(B, N),
            "sh": sh,
            "sh_degree": self.active_sh_degree,
            "vertices": vertices,
            "residual": {"means": offset, "quats": q_local, "scales": scales},
        }

    def _use_fused_assembly(self, vertices: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether :meth:`forward` assembles through the compiled op: ``fused_assembly`` is on (the default; set
        it to False for the torch path), the extension runs on this device and every input shares one float
        dtype."""
        if not getattr(self, "fused_assembly", True):
            return False
        from ..ops import _ext

        dev = vertices.device
        if not _ext.available() or (dev.type == "cuda" and not _ext.cuda_compiled()) or dev.type not in ("cpu", "cuda"):
            return False
        dtypes = {t.dtype for t in (vertices, out, self.barycentrics, self.rotation, self.log_scale)}
        return len(dtypes) == 1 and vertices.dtype in (torch.float32, torch.float64) \
            and not (torch.is_grad_enabled() and self.barycentrics.requires_grad)

    @staticmethod
    def residual_state(output: dict) -> dict:
        """The learnable residual per Gaussian (what the temporal Wasserstein regulariser compares between
        adjacent frames), free of the mesh motion: ``means [B, N, 3]`` = the MLP offset Δx (metres),
        ``quats [B, N, 4]`` = q_base ⊗ q_Δ (rotation relative to the triangle frame), ``scales [B, N, 3]``
        = std-devs. Use :func:`residual_covariance` for Σ = R diag(s²) Rᵀ (convert to mm first: the
        Bures term is ~1e-9 in metres)."""
        return output["residual"]
