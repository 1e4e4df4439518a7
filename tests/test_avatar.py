"""Gaussian avatar: UV sampling, canonical placement, deformation conventions, parity switch."""

import math

import numpy as np
import pytest
import torch

from flashavatar.model import FLAME, FlameCodes, GaussianAvatar, rasterize_uv, residual_covariance
from flashavatar.model.camera import axis_angle_to_matrix, quat_to_matrix
from flashavatar.model.flame import read_obj
from flashavatar.model.synthetic import write_head_model


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    path = write_head_model(tmp_path_factory.mktemp("head"))
    return path, path.parent / "head_template.obj"


@pytest.fixture(scope="module")
def flame(head):
    return FLAME(head[0])


def test_uv_samples_inside_their_triangle(head):
    obj = read_obj(head[1])
    S = 96
    s = rasterize_uv(obj.uvs, obj.face_uvs, S)
    tri = obj.uvs[obj.face_uvs[s.face_ids]]  # [N, 3, 2]
    centre = (s.texel + 0.5) / S
    np.testing.assert_allclose(s.uv, centre)
    # independent barycentrics: solve [p1-p0, p2-p0] x = c - p0
    A = np.stack((tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), -1)
    x = np.linalg.solve(A, (centre - tri[:, 0])[..., None])[..., 0]
    bary = np.concatenate((1 - x.sum(-1, keepdims=True), x), -1)
    assert (bary >= -1e-9).all()
    np.testing.assert_allclose(bary, s.barycentrics, atol=1e-9)
    # each texel is used once
    assert len(np.unique(s.texel[:, 1] * S + s.texel[:, 0])) == len(s.face_ids)


def test_uv_counts_scale_with_resolution(head):
    obj = read_obj(head[1])
    counts = {S: len(rasterize_uv(obj.uvs, obj.face_uvs, S).face_ids) for S in (64, 128, 256)}
    density = [counts[S] / S ** 2 for S in (64, 128, 256)]
    assert max(density) / min(density) < 1.05, counts
    # a unit square of two triangles covers every texel exactly once
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    s = rasterize_uv(uv, np.array([[0, 1, 2], [0, 2, 3]]), 17)
    assert len(s.face_ids) == 17 * 17


def test_avatar_outputs_and_initial_state(flame, head):
    avatar = GaussianAvatar(flame, head[1], uv_size=64)
    N = avatar.n_gaussians
    frac = avatar.is_mouth.float().mean().item()
    assert 0.005 < frac < 0.02
    assert (avatar.face_ids[avatar.is_mouth] >= flame.n_mesh_faces).all()
    assert (avatar.face_ids[~avatar.is_mouth] < flame.n_mesh_faces).all()
    # no Gaussian on a face touching the neck boundary
    faces = flame.faces[avatar.face_ids]
    assert not torch.isin(faces, flame.neck_boundary).any()

    codes = FlameCodes.neutral(3)
    out = avatar(codes)
    assert out["means"].shape == (3, N, 3) and out["quats"].shape == (3, N, 4)
    assert out["scales"].shape == (3, N, 3) and out["opacities"].shape == (3, N)
    assert out["sh"].shape == (3, N, 16, 3) and out["sh_degree"] == 0
    torch.testing.assert_close(out["quats"].norm(dim=-1), torch.ones(3, N))
    torch.testing.assert_close(out["opacities"], torch.full((3, N), 0.1))
    # neutral codes: the Gaussians sit (almost) on the canonical surface points
    assert (out["means"] - avatar.canonical_means).norm(dim=-1).max() < 5e-3
    # base scale: mean distance to 3 neighbours, a few mm on this head
    s = out["scales"][0, :, 0]
    assert 1e-4 < s.median() < 1e-2


def test_jaw_moves_lower_face(flame, head):
    avatar = GaussianAvatar(flame, head[1], uv_size=64)
    c = FlameCodes.neutral(2)
    a = 0.3
    c.jaw[1] = torch.tensor([1, 0, 0, 0, math.cos(a), -math.sin(a)])  # first two rows of R_x(a)
    out = avatar(c)
    moved = (out["means"][1] - out["means"][0]).norm(dim=-1)
    chin = avatar.canonical_means[:, 1] < -0.06  # below the mouth, front
    chin &= avatar.canonical_means[:, 2] > 0.04
    top = avatar.canonical_means[:, 1] > 0.05
    assert moved[chin].mean() > 0.01 and moved[top].max() < 1e-3


def _rigid(vertices, R):
    return vertices @ R.T


def test_tangent_frame_rotation_and_parity(flame, head):
    torch.manual_seed(0)
    codes = FlameCodes.neutral(1)
    verts = flame.forward_codes(codes)
    R = axis_angle_to_matrix(torch.tensor([0.3, -0.5, 0.2]))
    for parity in (False, True):
        avatar = GaussianAvatar(flame, head[1], uv_size=48, parity=parity)
        with torch.no_grad():
            avatar.mlp_out.bias.uniform_(-0.5, 0.5)  # nonzero rotation / scale deltas
        a = avatar(codes, vertices=verts)
        b = avatar(codes, vertices=_rigid(verts, R))
        Ra, Rb = quat_to_matrix(a["quats"][0]), quat_to_matrix(b["quats"][0])
        if parity:  # the original: the mesh's motion does not turn the Gaussians
            torch.testing.assert_close(Rb, Ra)
        else:  # q_frame ⊗ q_base ⊗ q_Δ turns with the triangle
            torch.testing.assert_close(Rb, R @ Ra, atol=2e-4, rtol=0)
        # scales: additive log-scale vs. the original's multiplied log-scale
        delta = torch.tanh(avatar.mlp_out.bias[7:10])
        base = avatar.log_scale.detach()
        want = torch.exp(base * torch.exp(delta)) if parity else torch.exp(base + delta)
        torch.testing.assert_close(a["scales"][0], want, atol=1e-4, rtol=1e-3)


def test_parameter_groups_and_gradients(flame, head):
    avatar = GaussianAvatar(flame, head[1], uv_size=48)
    groups = avatar.parameter_groups()
    assert set(groups) == {"mlp", "f_dc", "f_rest", "opacity", "scaling", "rotation"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in avatar.parameters())  # every parameter exactly once
    opt = torch.optim.Adam(avatar.optimizer_groups(), eps=1e-15)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["mlp"] == 1e-4 and lrs["f_rest"] == pytest.approx(2.5e-3 / 20)
    c = FlameCodes.neutral(2)
    c.expr.normal_()
    out = avatar(c)
    loss = out["means"].square().sum() + out["scales"].sum() + out["quats"][..., 1].sum() + out["sh"].sum() \
        + out["opacities"].sum()
    loss.backward()
    for name, ps in groups.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ps), name
    assert avatar.set_sh_degree_for_iteration(1200) == 2 and avatar(c)["sh_degree"] == 2


def test_state_dict_round_trip(flame, head):
    a = GaussianAvatar(flame, head[1], uv_size=32, seed=1)
    b = GaussianAvatar(flame, head[1], uv_size=32, shape=torch.full((300,), 0.5), seed=2)
    assert not any(k.startswith("flame.") for k in a.state_dict())  # FLAME comes from its file, not checkpoints
    b.load_state_dict(a.state_dict())
    c = FlameCodes.neutral(1)
    c.expr.normal_()
    torch.testing.assert_close(b(c)["means"], a(c)["means"])


def test_residual_state(flame, head):
    avatar = GaussianAvatar(flame, head[1], uv_size=48)
    with torch.no_grad():
        avatar.mlp_out.bias.uniform_(-0.5, 0.5)
    c = FlameCodes.neutral(2)
    out = avatar(c)
    r = GaussianAvatar.residual_state(out)
    N = avatar.n_gaussians
    assert r["means"].shape == (2, N, 3) and r["quats"].shape == (2, N, 4) and r["scales"].shape == (2, N, 3)
    # the residual does not contain the mesh: means - residual means = surface points Σ b_i V[f_i]
    verts = flame.forward_codes(c)
    tri = verts[:, flame.faces[avatar.face_ids]]
    surface = torch.einsum("bnkc,nk->bnc", tri, avatar.barycentrics)
    torch.testing.assert_close(out["means"] - r["means"], surface, atol=1e-6, rtol=0)
    assert r["means"].abs().max() > 1e-3  # the offsets are really there (bias set above)
    cov = residual_covariance(r["quats"].double(), r["scales"].double() * 1000)  # mm
    torch.testing.assert_close(cov, cov.transpose(-1, -2))
    assert (torch.linalg.eigvalsh(cov.double()) > 0).all()


def test_color_head(flame, head):
    plain = GaussianAvatar(flame, head[1], uv_size=32)
    assert plain.mlp_color is None  # SPEC's 10-output MLP unless asked for
    avatar = GaussianAvatar(flame, head[1], uv_size=32, color_offset=0.1)
    assert avatar.mlp_color is not None and avatar.mlp_color in [m for m in avatar.modules()]
    assert any(p is avatar.mlp_color.weight for p in avatar.parameter_groups()["mlp"])
    c = FlameCodes.neutral(2)
    c.expr.normal_()
    out = avatar(c)
    N = avatar.n_gaussians
    assert out["sh"].shape == (2, N, 16, 3)
    # starts as a zero offset: the initial output equals the free colour
    base = torch.cat((avatar.features_dc, avatar.features_rest), 1)
    torch.testing.assert_close(out["sh"], base.expand(2, -1, -1, -1))
    with torch.no_grad():
        avatar.mlp_color.bias.fill_(10.0)  # saturates: the RGB offset is at most color_offset
    out = avatar(c)
    rgb_shift = (out["sh"][:, :, 0] - avatar.features_dc[None, :, 0]) * 0.28209479177387814
    assert 0.099 < float(rgb_shift.max()) <= 0.1 + 1e-6
    torch.testing.assert_close(out["sh"][:, :, 1:], avatar.features_rest.expand(2, -1, -1, -1))
    # gradients reach the colour head and the free colours through the per-frame SH
    with torch.no_grad():
        avatar.mlp_color.bias.zero_()
    avatar(c)["sh"][..., 0, :].sum().backward()
    assert avatar.mlp_color.weight.grad.abs().sum() > 0 and avatar.features_dc.grad.abs().sum() > 0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="color_offset"):
            GaussianAvatar(flame, head[1], uv_size=32, color_offset=bad)


def _explicit_sh9(n: np.ndarray) -> np.ndarray:
    """Real SH of degree <= 2 written out term by term (x, y, z of unit vectors [..., 3])."""
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    return np.stack([0.5 * np.sqrt(1 / np.pi) * np.ones_like(x),
                     np.sqrt(3 / (4 * np.pi)) * y, np.sqrt(3 / (4 * np.pi)) * z, np.sqrt(3 / (4 * np.pi)) * x,
                     0.5 * np.sqrt(15 / np.pi) * x * y, 0.5 * np.sqrt(15 / np.pi) * y * z,
                     0.25 * np.sqrt(5 / np.pi) * (3 * z * z - 1), 0.5 * np.sqrt(15 / np.pi) * x * z,
                     0.25 * np.sqrt(15 / np.pi) * (x * x - y * y)], axis=-1)


def test_sh9_basis_is_the_orthonormal_real_basis():
    from flashavatar.model.avatar import sh9_basis

    n = torch.randn(4096, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = n / n.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(sh9_basis(n).numpy(), _explicit_sh9(n.numpy()), rtol=1e-12, atol=1e-12)
    # orthonormal on the sphere (Monte Carlo over 200k directions: the Gram matrix is I within sampling noise)
    m = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Y = sh9_basis(m / m.norm(dim=-1, keepdim=True))
    gram = (Y.T @ Y) * (4 * math.pi / len(m))
    assert float((gram - torch.eye(9, dtype=torch.float64)).abs().max()) < 0.02


def test_irradiance_matrix_is_the_basis_sum():
    """The Animator's quadratic form n̂ᵀ M n̂ equals Σ_k L_k Y_k(n) (sh9_basis @ coeffs) for any n, unit or not, in
    float64; a wrong entry of M (one coefficient moved) breaks it."""
    from flashavatar.model.avatar import irradiance_from_matrix, irradiance_matrix, sh9_basis

    g = torch.Generator().manual_seed(3)
    n = torch.randn(50, 3, generator=g, dtype=torch.float64)
    n[:25] = n[:25] / n[:25].norm(dim=-1, keepdim=True)
    coeffs = torch.randn(9, 3, generator=g, dtype=torch.float64)
    want = sh9_basis(n) @ coeffs  # [50, 3]
    m = irradiance_matrix(coeffs)
    assert m.shape == (4, 4, 3)
    torch.testing.assert_close(m, m.transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(irradiance_from_matrix(n, m), want, atol=1e-12, rtol=1e-12)
    for k in range(9):  # each coefficient reaches the form
        moved = coeffs.clone()
        moved[k] += 1.0
        assert (irradiance_from_matrix(n, irradiance_matrix(moved)) - want).abs().max() > 1e-3, k


def test_shading(flame, head):
    plain = GaussianAvatar(flame, head[1], uv_size=32)
    assert plain.shading_sh is None and "canonical_normals" not in plain.state_dict()  # SPEC's colour by default
    avatar = GaussianAvatar(flame, head[1], uv_size=32, shading=True)
    assert any(p is avatar.shading_sh for p in avatar.parameter_groups()["f_dc"])
    assert set(avatar.state_dict()) - set(plain.state_dict()) == {"shading_sh", "canonical_normals"}
    c = FlameCodes.neutral(2)
    c.expr.normal_(generator=torch.Generator().manual_seed(3))
    c.jaw[:, 0] += 0.25  # open the jaw: the chin's normals turn
    N = avatar.n_gaussians
    with torch.no_grad():
        avatar.set_colors(torch.rand(N, 3, generator=torch.Generator().manual_seed(4)))
        avatar.features_rest.normal_(0, 0.05)
        # starts unshaded: E = 1 everywhere, so the SH are the free colours
        out = avatar(c)
        base = torch.cat((avatar.features_dc, avatar.features_rest), 1)
        torch.testing.assert_close(out["sh"], base.expand(2, -1, -1, -1), atol=0, rtol=0)
        avatar.shading_sh.copy_(torch.tensor([[3.0, 3.2, 2.8], [0.6, 0.5, 0.7], [1.2, 1.0, 1.1],
                                              [0.4, 0.5, 0.3]] + [[0.1, -0.1, 0.05]] * 5))
        out = avatar(c)
        neutral = avatar.flame(c.shape[:1], torch.zeros_like(c.expr[:1]), FlameCodes.neutral(1).jaw,
                               FlameCodes.neutral(1).eyes, torch.zeros_like(c.eyelids[:1]))
        # at the neutral face the factor is 1 (posed normals = the neutral ones)
        torch.testing.assert_close(avatar.frame_shading(neutral), torch.ones(1, N, 3), atol=1e-4, rtol=0)
    # posed: every Gaussian's colour (any view direction) is E(n) / E(n̄) times the unshaded one, with n the
    # normal of its triangle, computed here from the mesh in float64
    v = out["vertices"].double().numpy()
    faces = avatar.gaussian_faces.numpy()
    tri = v[:, faces]  # [B, N, 3, 3]
    n = np.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    t0 = neutral.double().numpy()[0][faces]
    n0 = np.cross(t0[:, 1] - t0[:, 0], t0[:, 2] - t0[:, 0])
    n0 /= np.linalg.norm(n0, axis=-1, keepdims=True)
    L = avatar.shading_sh.detach().double().numpy()
    ratio = np.maximum(_explicit_sh9(n) @ L, 1e-3) / np.maximum(_explicit_sh9(n0) @ L, 1e-3)  # [B, N, 3]
    ratio[:, avatar.is_mouth.numpy()] = 1.0  # the mouth interior is not shaded
    assert ratio.std() > 0.01  # the check can fail: the factor really varies over the face
    # the colour is 0.5 + Σ_k Y_k c_k with Y_0 = C0 for every view direction; any values of the higher Y_k do
    Y = torch.randn(N, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Y[:, 0] = 0.28209479177387814

    def colour(sh):  # [B, N, 16, 3] -> [B, N, 3]: 0.5 + Σ_k Y_k c_k
        return 0.5 + (sh.double() * Y[None, :, :, None]).sum(2)

    torch.testing.assert_close(colour(out["sh"]), torch.as_tensor(ratio) * colour(base.detach()[None]),
                               atol=1e-4, rtol=1e-4)
    # gradients reach the irradiance coefficients and the free colours
    avatar(c)["sh"].sum().backward()
    assert avatar.shading_sh.grad.abs().sum() > 0 and avatar.features_dc.grad.abs().sum() > 0


def test_template_must_match(flame, head, tmp_path):
    obj = read_obj(head[1])
    lines = [f"v {x} {y} {z}" for x, y, z in obj.vertices] + [f"vt {u} {v}" for u, v in obj.uvs]
    faces = obj.faces[::-1]  # faces in another order
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in faces]
    bad = tmp_path / "bad.obj"
    bad.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="bad.obj: template faces"):
        GaussianAvatar(flame, bad, uv_size=32)
    no_uv = tmp_path / "no_uv.obj"
    no_uv.write_text("\n".join([f"v {x} {y} {z}" for x, y, z in obj.vertices]
                               + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in obj.faces]))
    with pytest.raises(ValueError, match="no_uv.obj: template OBJ has no texture"):
        GaussianAvatar(flame, no_uv, uv_size=32)


def test_avatar_renders_onto_the_subject(tmp_path):
    """End to end with the project's reference rasteriser: an untrained avatar, coloured from the synthetic
    head's texture, lands on the ground-truth head (cameras, FLAME, avatar and reader agree)."""
    reference = pytest.importorskip("flashavatar.ops.reference")
    import imageio.v3 as iio

    from flashavatar.data import FlashAvatarDataset, collate_frames
    from flashavatar.model.synthetic import _sample_texture, make_subject

    H, W = 40, 52
    s = make_subject(tmp_path, "s", n_frames=3, size=(H, W), supersample=2)
    ds = FlashAvatarDataset(s.data_root, s.tracker_root, "s", "all", return_gt=True)
    flame = FLAME(s.model_path)
    avatar = GaussianAvatar(flame, s.template_obj, uv_size=64, shape=ds.codes.shape[0])
    tex = iio.imread(s.model_path.parent / "texture.png")
    rgb = _sample_texture(tex, avatar.uv.clamp(0, 1).numpy())
    rgb[avatar.is_mouth.numpy()] = (0.3, 0.07, 0.09)
    avatar.set_colors(torch.as_tensor(rgb))
    with torch.no_grad():
        avatar.opacity_logit.fill_(4.0)
        b = collate_frames([ds[0], ds[2]])
        out = avatar(b)
        for i in range(2):
            img, alpha, _ = reference.rasterize_reference(
                out["means"][i], out["quats"][i], out["scales"][i], out["opacities"][i], out["sh"][i, :, :1],
                b["viewmat"][i, None], b["K"][i, None], W, H, sh_degree=0, backgrounds=torch.tensor([[0.0, 1.0, 0.0]]))
            splat = alpha[0, ..., 0] > 0.5
            head = b["head_mask"][i]
            iou = (splat & head).sum() / (splat | head).sum()
            assert iou > 0.7, iou  # the splats cover the head (plus the neck the torso hides in the images)
            assert (splat & head).sum() / head.sum() > 0.95
            # colours: the unlit texture correlates with the (Lambert-shaded) image: hair, eyes, lips in place
            inside = head & splat
            # (luminance correlation: ~0.63 here; a flat colour gives ~0.1, a v-flipped texture < 0)
            x, y = img[0].clamp(0, 1)[inside].mean(-1), b["gt"][i][inside].mean(-1)
            corr = torch.corrcoef(torch.stack((x, y)))[0, 1]
            assert corr > 0.5, corr
