"""The fast animate path (flashavatar.animate): same Gaussians as GaussianAvatar.forward in float32, reduced-
precision MLPs within 45 dB PSNR of float32 renders, CUDA-graph replay equal to the eager step."""

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashavatar.animate import Animator, GraphedRenderer, rasterize_with
from flashavatar.bench import front_camera
from flashavatar.model import FLAME, FlameCodes, GaussianAvatar
from flashavatar.model.synthetic import write_head_model


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    path = write_head_model(tmp_path_factory.mktemp("head"))
    return FLAME(path), path.parent / "head_template.obj"


def trained_like(head, *, parity=False, uv_size=32, seed=0, color_offset=0.0, shading=False) -> GaussianAvatar:
    """An avatar whose MLP output, rotations, scales, opacities and colours (and the colour head's per-frame
    offsets, with ``color_offset > 0``, or the shading, with ``shading``) all matter for the image."""
    flame, template = head
    torch.manual_seed(seed)
    # a copy of the module-scoped FLAME: `avatar.to("cuda")` moves its FLAME in place, which would leave the
    # fixture's FLAME on the GPU for the tests that follow
    a = GaussianAvatar(copy.deepcopy(flame), template, uv_size=uv_size, parity=parity, offset_scale=0.01,
                       shape=0.5 * torch.randn(flame.n_shape), color_offset=color_offset,
                       shading=shading)
    with torch.no_grad():
        a.mlp_out.weight.normal_(0, 0.05)
        a.mlp_out.bias.normal_(0, 0.3)
        if a.mlp_color is not None:
            a.mlp_color.weight.normal_(0, 0.05)
            a.mlp_color.bias.normal_(0, 0.3)
        a.rotation.add_(0.3 * torch.randn_like(a.rotation))
        a.log_scale.add_(0.2 * torch.randn_like(a.log_scale))
        a.set_colors(torch.rand(a.n_gaussians, 3))
        a.features_rest.normal_(0, 0.1)
        a.opacity_logit.normal_(0, 2)
        if a.shading_sh is not None:  # a light from the upper front (E = 1 at the start)
            a.shading_sh[1:4] += torch.tensor([0.8, 1.5, 0.4])[:, None]
    a.active_sh_degree = 3
    return a.eval()


def random_codes(flame, batch, seed=1, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    c = FlameCodes.neutral(batch, flame.n_shape, flame.n_expr).as_dict()
    c["shape"] = 0.5 * torch.randn(1, flame.n_shape, generator=g)
    c["expr"] = torch.randn(batch, flame.n_expr, generator=g)
    c["jaw"] = c["jaw"] + 0.2 * torch.randn(batch, 6, generator=g)
    c["eyes"] = c["eyes"] + 0.1 * torch.randn(batch, 12, generator=g)
    c["eyelids"] = torch.rand(batch, 2, generator=g)
    return {k: v.to(device) for k, v in c.items()}


def psnr(a, b) -> float:
    mse = float((a.float() - b.float()).square().mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def cameras(batch, size, device="cpu"):
    view, K = front_camera(size, size)
    return view.expand(batch, 1, 4, 4).to(device), K.expand(batch, 1, 3, 3).to(device)


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("restrict", [True, False])
def test_fp32_fast_path_matches_the_model_forward(head, parity, restrict):
    a = trained_like(head, parity=parity)
    codes = random_codes(head[0], 3)
    a.fused_assembly = False  # the reference: the model's own torch path
    with torch.no_grad():
        ref = a(codes)
    g = Animator(a, restrict_flame=restrict).gaussians(codes)
    for k, tol in (("means", 1e-6), ("scales", 1e-6), ("opacities", 0.0), ("quats", 1e-3)):
        err = float((g[k] - ref[k]).abs().max())
        assert err <= tol, f"{k}: max error {err}"
    assert torch.equal(g["sh"], ref["sh"])


def fast_and_reference(a, codes, fused):
    """(Animator, its Gaussians, the model forward's) for ``codes``, with the fused assembly or the torch one."""
    with torch.no_grad():
        ref = a(codes)
    an = Animator(a)
    an.fused_assembly = fused and an.fused_assembly
    return an, an.gaussians(codes), ref


@pytest.mark.parametrize("fused", [True, False])
def test_color_head_fast_path_matches_the_model_forward(head, fused):
    a = trained_like(head, color_offset=0.15)
    codes = random_codes(head[0], 3, seed=5)
    an, g, ref = fast_and_reference(a, codes, fused)
    assert g["sh"].shape == ref["sh"].shape == (3, a.n_gaussians, 16, 3)
    torch.testing.assert_close(g["sh"], ref["sh"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g["means"], ref["means"], atol=1e-6, rtol=1e-5)
    # the offsets are per frame, bounded by color_offset, and only in the DC band
    raw, color = an.mlp_outputs(FlameCodes.from_any(codes).condition())
    assert color.shape == (3, a.n_gaussians, 3) and float(color.abs().max()) <= 0.15
    assert float((color[0] - color[1]).abs().max()) > 1e-3
    torch.testing.assert_close(g["sh"][:, :, 1:], an.sh[None, :, 1:].expand(3, -1, -1, -1))
    # lower SH degrees keep the shifted DC band
    g1 = an.gaussians(codes, sh_degree=0)
    torch.testing.assert_close(g1["sh"], g["sh"][:, :, :1])


@pytest.mark.parametrize("fused", [True, False])
def test_shading_fast_path_matches_the_model_forward(head, fused):
    a = trained_like(head, shading=True, color_offset=0.1)
    codes = random_codes(head[0], 3, seed=6)
    an, g, ref = fast_and_reference(a, codes, fused)
    # the normals come from the Animator's own FLAME (float32, ~1e-7 m apart on mm-sized triangles), and the
    # factor E(n) / E(n̄) amplifies that where E(n̄) is small (normals facing away from the light)
    torch.testing.assert_close(g["sh"], ref["sh"], atol=2e-3, rtol=5e-3)
    assert float((g["sh"] - ref["sh"]).abs().mean()) < 1e-5
    # the check can fail: unshaded, the SH differ by far more
    unshaded = Animator(a)
    unshaded.shading = None
    assert float((unshaded.gaussians(codes)["sh"] - ref["sh"]).abs().max()) > 0.05
    lo = Animator(a, mlp_dtype="bf16")
    vm, Ks = cameras(3, 96)
    assert psnr(lo.render(codes, vm, Ks, 96, 96)[0], an.render(codes, vm, Ks, 96, 96)[0]) >= 45.0


def test_color_head_reduced_precision_within_45db_and_matters(head):
    a = trained_like(head, color_offset=0.15)
    codes = random_codes(head[0], 2, seed=4)
    vm, Ks = cameras(2, 96)
    an32 = Animator(a)
    ref = an32.render(codes, vm, Ks, 96, 96)[0]
    low = Animator(a, mlp_dtype="bf16").render(codes, vm, Ks, 96, 96)[0]
    assert psnr(low, ref) >= 45.0
    # the check can fail: without the colour offsets the image is clearly different
    verts, raw = an32.vertices(codes), an32.mlp(FlameCodes.from_any(codes).condition())
    plain = rasterize_with(None, an32.assemble(verts, raw), vm, Ks, 96, 96)[0]
    assert psnr(plain, ref) < 40.0


def test_restricted_flame_matches_full_flame_on_used_vertices(head):
    flame = head[0]
    a = trained_like(head)
    an = Animator(a)
    assert an.n_used <= flame.n_vertices
    codes = random_codes(flame, 4, seed=7)
    full = flame.forward_codes(codes)
    assert an.flat_chain  # FLAME's kinematic tree (and the procedural head's)
    torch.testing.assert_close(an.vertices(codes), full[:, an.used_vertices], atol=1e-6, rtol=1e-5)
    an.flat_chain = False  # the general joint-by-joint chain gives the same
    torch.testing.assert_close(an.vertices(codes), full[:, an.used_vertices], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("parity", [False, True])
def test_reduced_precision_render_within_45db_of_fp32_cpu(head, dtype, parity):
    a = trained_like(head, parity=parity)
    codes = random_codes(head[0], 2, seed=3)
    vm, Ks = cameras(2, 96)
    an32 = Animator(a)
    ref = an32.render(codes, vm, Ks, 96, 96)[0]
    low = Animator(a, mlp_dtype=dtype).render(codes, vm, Ks, 96, 96)[0]
    assert torch.isfinite(low).all()
    assert psnr(low, ref) >= 45.0
    # the check can fail: the image depends strongly on the MLP output
    g0 = an32.assemble(an32.vertices(codes), torch.zeros(2, a.n_gaussians, 10))
    assert psnr(rasterize_with(None, g0, vm, Ks, 96, 96)[0], ref) < 35.0


def test_graphed_renderer_runs_eagerly_without_cuda_and_takes_new_codes(head):
    a = trained_like(head)
    an = Animator(a)
    vm, Ks = cameras(2, 64)
    r = GraphedRenderer(an, 2, 64, 64, viewmats=vm, Ks=Ks)
    for seed in (5, 6):
        codes = random_codes(head[0], 2, seed=seed)
        out = r(codes).clone()
        ref = an.render(codes, vm, Ks, 64, 64, backgrounds=torch.zeros(2, 1, 3))[0]
        torch.testing.assert_close(out, ref)


def test_compiled_stages_trace_without_graph_breaks_and_match(head):
    """torch.compile(fullgraph=True) of FLAME and the assembly (aot_eager here: the tracing, not the codegen)."""
    a = trained_like(head)
    codes = random_codes(head[0], 2, seed=8)
    ref = Animator(a).gaussians(codes)
    g = Animator(a, compile="aot_eager").gaussians(codes)
    for k in ("means", "quats", "scales"):
        torch.testing.assert_close(g[k], ref[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mlp_in_chunks_equals_one_pass(head, dtype):
    a = trained_like(head)
    N = a.n_gaussians
    cond = FlameCodes.from_any(random_codes(head[0], 5)).condition()
    whole = Animator(a, mlp_dtype=dtype, mlp_rows=5 * N).mlp(cond)
    # 2 frames per chunk (2 + 2 + 1), and 3 Gaussian ranges per frame
    for rows in (2 * N, -(-N // 3)):
        torch.testing.assert_close(Animator(a, mlp_dtype=dtype, mlp_rows=rows).mlp(cond), whole, atol=1e-6, rtol=0)


def test_mlp_chunks_cover_every_row_once():
    from flashavatar.animate import mlp_chunks

    for batch, n, rows in ((5, 100, 250), (3, 100, 30), (2, 100, 100), (4, 7, 1), (1, 100, 10**9), (3, 10, 10)):
        seen = torch.zeros(batch, n, dtype=torch.int64)
        for frames, gauss in mlp_chunks(batch, n, rows):
            seen[frames, gauss] += 1
            assert (frames.stop - frames.start) * (gauss.stop - gauss.start) <= max(rows, 1)
        assert bool((seen == 1).all()), (batch, n, rows)
    assert len(mlp_chunks(64, 14485, 32768)) == 32  # uv 128: 2 frames per chunk
    assert len(mlp_chunks(1, 57559, 32768)) == 2  # uv 256: each frame in two halves


def test_bad_inputs_are_named(head):
    a = trained_like(head)
    an = Animator(a)
    with pytest.raises(ValueError, match="mlp_dtype"):
        Animator(a, mlp_dtype="int8")
    huge = trained_like(head)
    with torch.no_grad():
        huge.mlp_hidden[0].weight.mul_(1e6)
    with pytest.raises(ValueError, match="float16"):
        Animator(huge, mlp_dtype="fp16")
    with pytest.raises(ValueError, match="cond"):
        an.mlp(torch.zeros(2, 7))
    codes = random_codes(head[0], 2)
    codes["jaw"] = codes["jaw"][:, :5]
    with pytest.raises(ValueError, match="jaw"):
        an.vertices(codes)
    vm, Ks = cameras(2, 32)
    with pytest.raises(ValueError, match="viewmats"):
        GraphedRenderer(an, 3, 32, 32, viewmats=vm, Ks=Ks)


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("fused_mlp", [True, False])
def test_reduced_precision_render_within_45db_of_fp32_cuda(head, dtype, fused_mlp):
    from flashavatar.ops import fused_mlp_supported

    dev = torch.device("cuda")
    if fused_mlp and not fused_mlp_supported(dev, torch.bfloat16 if dtype == "bf16" else torch.float16):
        pytest.skip("the fused MLP needs an sm_80+ GPU with 198 KB of shared memory per block")
    a = trained_like(head, uv_size=128).to(dev)
    codes = random_codes(head[0], 4, seed=11, device=dev)
    vm, Ks = cameras(4, 512, dev)
    ref = Animator(a).render(codes, vm, Ks, 512, 512)[0]
    an = Animator(a, mlp_dtype=dtype, fused_mlp=fused_mlp)
    assert an.fused_mlp == fused_mlp
    low = an.render(codes, vm, Ks, 512, 512)[0]
    assert torch.isfinite(low).all()
    assert psnr(low, ref) >= 45.0


@pytest.mark.cuda
def test_fp32_fast_path_matches_the_model_forward_cuda(head):
    dev = torch.device("cuda")
    a = trained_like(head, uv_size=128).to(dev)
    codes = random_codes(head[0], 3, device=dev)
    a.fused_assembly = False  # the reference: the model's own torch path
    with torch.no_grad():
        ref = a(codes)
    g = Animator(a).gaussians(codes)
    torch.testing.assert_close(g["means"], ref["means"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g["scales"], ref["scales"], atol=1e-6, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_replay_equals_eager_for_new_codes(head, dtype):
    dev = torch.device("cuda")
    a = trained_like(head, uv_size=128).to(dev)
    an = Animator(a, mlp_dtype=dtype)
    B = 4
    vm, Ks = cameras(B, 256, dev)
    r = GraphedRenderer(an, B, 256, 256, viewmats=vm, Ks=Ks, codes=random_codes(head[0], B, seed=1, device=dev))
    assert r.graph is not None
    for seed in (2, 3):
        codes = random_codes(head[0], B, seed=seed, device=dev)
        out = r(codes).clone()
        ref = an.render(codes, vm, Ks, 256, 256, backgrounds=torch.zeros(B, 1, 3, device=dev))[0]
        assert psnr(out, ref) >= 60.0


def test_few_kernel_quaternion_helpers_match_camera_module():
    from flashavatar.animate import matrix_to_quat_fast, quat_left_matrix, quat_multiply_fast
    from flashavatar.model.camera import matrix_to_quat, quat_multiply, quat_to_matrix

    g = torch.Generator().manual_seed(4)
    q, p = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g)
    torch.testing.assert_close(quat_multiply_fast(q, p), quat_multiply(q, p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((quat_left_matrix(q) @ p[..., None])[..., 0], quat_multiply(q, p), atol=1e-5, rtol=1e-5)
    unit = torch.nn.functional.normalize(torch.randn(2000, 4, generator=g), dim=-1)
    unit[:20, 0] = 0.0  # 180-degree rotations: w = 0, another formula is the best-conditioned one
    unit = torch.nn.functional.normalize(unit, dim=-1)
    R = quat_to_matrix(unit)
    ref = matrix_to_quat(R)
    torch.testing.assert_close(matrix_to_quat_fast(R), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(matrix_to_quat_fast(R.transpose(-1, -2), transposed=True), ref, atol=1e-5, rtol=0)
    assert (matrix_to_quat_fast(R)[:, 0] >= 0).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_per_frame_path_uses_only_device_tensors(head, dtype):
    """With every precomputed tensor on the meta device the per-frame path still runs: it builds no host
    tensors (a host->device copy per frame would break CUDA-graph capture and synchronise)."""
    an = Animator(trained_like(head), mlp_dtype=dtype)
    meta = lambda t: t.to("meta")  # noqa: E731
    for name, value in list(vars(an).items()):
        if isinstance(value, torch.Tensor):
            setattr(an, name, meta(value))
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (tuple, torch.Tensor)):
            setattr(an, name, type(value)(tuple(map(meta, v)) if isinstance(v, tuple) else meta(v) for v in value))
    an.device = torch.device("meta")
    codes = {k: meta(v) for k, v in random_codes(head[0], 2).items()}
    with _HostTensorSpy() as spy:
        g = an.gaussians(codes)
    assert spy.ops == [], f"per-frame ops reading host tensors: {spy.ops}"
    assert g["means"].device.type == "meta" and g["quats"].shape == (2, an.n_gaussians, 4)


class _HostTensorSpy(TorchDispatchMode):
    """Records every ATen op that gets a CPU tensor as an input."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
