"""The fused Gaussian assembly op (flashavatar.ops.gaussian_assembly): forward and VJPs against the pure-torch
reference (= GaussianAvatar.forward's math), float64 gradcheck, the Animator's fused path against its torch path,
CUDA against CPU."""

import pytest
import torch

from flashavatar.ops import _ext, gaussian_assembly
from flashavatar.ops.reference import gaussian_assembly_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason="flashavatar._C is not built")


def random_inputs(B=3, V=40, N=200, dtype=torch.float64, seed=0, index_dtype=torch.int64, device="cpu"):
    """Non-degenerate triangles in every orientation (all four matrix->quaternion branches), unnormalised base
    rotations, raw values over tanh's range."""
    g = torch.Generator().manual_seed(seed)
    verts = torch.randn(B, V, 3, generator=g, dtype=dtype)
    faces = torch.stack([torch.randperm(V, generator=g)[:3] for _ in range(N)]).to(index_dtype)
    bary = torch.rand(N, 3, generator=g, dtype=dtype) + 0.05
    bary = bary / bary.sum(-1, keepdim=True)
    rotation = torch.randn(N, 4, generator=g, dtype=dtype)
    log_scale = -4.0 + 0.5 * torch.randn(N, 3, generator=g, dtype=dtype)
    raw = 2 * torch.rand(B, N, 10, generator=g, dtype=dtype) - 1
    return [t.to(device) for t in (verts, faces, bary, rotation, log_scale, raw)]


def frame_branches(verts, faces) -> set[int]:
    """Which of matrix_to_quat's four formulas the triangle frames pick (so a test can check it covers all)."""
    tri = verts[:, faces]
    e1 = torch.nn.functional.normalize(tri[:, :, 1] - tri[:, :, 0], dim=-1)
    n = torch.nn.functional.normalize(torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1),
                                      dim=-1)
    R = torch.stack((e1, torch.cross(n, e1, dim=-1), n), dim=-1)
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    four = torch.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), -1)
    return set(four.argmax(-1).flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_forward_matches_reference(dtype, parity, index_dtype):
    verts, faces, bary, rot, ls, raw = random_inputs(dtype=dtype, index_dtype=index_dtype)
    assert frame_branches(verts, faces) == {0, 1, 2, 3}
    out = gaussian_assembly(verts, faces, bary, rot, ls, raw, offset_scale=0.3, parity=parity)
    ref = gaussian_assembly_reference(verts, faces.long(), bary, rot, ls, raw, 0.3, parity)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(("means", "quats", "scales", "local_quats"), out, ref):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)


def test_noncontiguous_inputs_and_empty_batch():
    verts, faces, bary, rot, ls, raw = random_inputs(N=60)
    ref = gaussian_assembly(verts, faces, bary, rot, ls, raw)
    nc = [torch.cat((t, t), dim=-1)[..., : t.shape[-1]] for t in (verts, faces, bary, rot, ls, raw)]
    assert not any(t.is_contiguous() for t in nc)
    for a, b in zip(gaussian_assembly(*nc), ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    empty = gaussian_assembly(verts[:0], faces, bary, rot, ls, raw[:0])
    assert [tuple(t.shape) for t in empty] == [(0, 60, 3), (0, 60, 4), (0, 60, 3), (0, 60, 4)]


def test_out_of_range_face_gives_nan_only_there():
    verts, faces, bary, rot, ls, raw = random_inputs(N=20)
    faces = faces.clone()
    faces[5, 1] = verts.shape[1]  # one past the end
    faces[7, 0] = -1
    means, quats, scales, local = gaussian_assembly(verts, faces, bary, rot, ls, raw)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[5, 7]] = True
    for t in (means, quats, scales, local):
        assert torch.isnan(t[:, bad]).all() and torch.isfinite(t[:, ~bad]).all()


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_float64(parity, seed):
    verts, faces, bary, rot, ls, raw = random_inputs(B=2, V=12, N=10, seed=seed)
    inputs = [t.requires_grad_() for t in (verts, rot, ls, raw)]

    def fn(v, r, l_, w):
        return gaussian_assembly(v, faces, bary, r, l_, w, offset_scale=0.7, parity=parity)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("parity", [False, True])
def test_vjp_matches_reference_autograd(parity):
    verts, faces, bary, rot, ls, raw = random_inputs(seed=4)
    g = torch.Generator().manual_seed(9)
    cot = [torch.randn(3, 200, w, generator=g, dtype=torch.float64) for w in (3, 4, 3, 4)]
    grads = []
    for fn in (lambda *a: gaussian_assembly(*a, offset_scale=0.4, parity=parity),
               lambda *a: gaussian_assembly_reference(*a, 0.4, parity)):
        leaves = [t.clone().requires_grad_() for t in (verts, rot, ls, raw)]
        out = fn(leaves[0], faces, bary, leaves[1], leaves[2], leaves[3])
        loss = sum((o * c).sum() for o, c in zip(out, cot))
        grads.append(torch.autograd.grad(loss, leaves))
    for name, a, b in zip(("verts", "rotation", "log_scale", "raw"), *grads):
        assert float(b.abs().max()) > 0, name  # every input matters
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)
    # a constant mesh (the usual case in training): the other gradients are unchanged
    leaves = [t.clone().requires_grad_() for t in (rot, ls, raw)]
    out = gaussian_assembly(verts, faces, bary, *leaves, offset_scale=0.4, parity=parity)
    loss = sum((o * c).sum() for o, c in zip(out, cot))
    for a, b in zip(torch.autograd.grad(loss, leaves), grads[1][1:]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_opcheck():
    verts, faces, bary, rot, ls, raw = random_inputs(B=2, V=10, N=8)
    for t in (verts, rot, ls, raw):
        t.requires_grad_()
    for parity in (False, True):
        torch.library.opcheck(torch.ops.flashavatar.gaussian_assembly, (verts, faces, bary, rot, ls, raw, 0.5, parity))


def test_bad_inputs_are_named():
    verts, faces, bary, rot, ls, raw = random_inputs(N=10)
    with pytest.raises(ValueError, match=r"raw must have shape \[3, 10, 10\], got \[3, 10, 9\]"):
        gaussian_assembly(verts, faces, bary, rot, ls, raw[..., :9])
    with pytest.raises(ValueError, match="rotation must have shape"):
        gaussian_assembly(verts, faces, bary, rot[:, :3], ls, raw)
    with pytest.raises(ValueError, match="faces must be int32 or int64"):
        gaussian_assembly(verts, faces.float(), bary, rot, ls, raw)
    with pytest.raises(ValueError, match="log_scale is torch.float32 but verts is torch.float64"):
        gaussian_assembly(verts, faces, bary, rot, ls.float(), raw)
    with pytest.raises(ValueError, match="verts must be float32 or float64"):
        gaussian_assembly(verts.half(), faces, bary.half(), rot.half(), ls.half(), raw.half())
    with pytest.raises(ValueError, match="barycentrics"):
        gaussian_assembly(verts, faces, bary.requires_grad_(), rot, ls, raw)
    with pytest.raises(TypeError, match="verts must be a torch.Tensor"):
        gaussian_assembly(verts.numpy(), faces, bary, rot, ls, raw)


def test_animator_fused_assembly_matches_torch_path(tmp_path):
    from flashavatar.animate import Animator
    from flashavatar.model import FLAME, GaussianAvatar
    from flashavatar.model.synthetic import write_head_model

    path = write_head_model(tmp_path)
    flame = FLAME(path)
    for parity in (False, True):
        torch.manual_seed(0)
        a = GaussianAvatar(flame, path.parent / "head_template.obj", uv_size=32, parity=parity, offset_scale=0.01)
        with torch.no_grad():
            a.mlp_out.weight.normal_(0, 0.05)
            a.mlp_out.bias.normal_(0, 0.3)
            a.rotation.add_(0.3 * torch.randn_like(a.rotation))
        fused, torch_path = Animator(a, fused_assembly=True), Animator(a, fused_assembly=False)
        assert fused.fused_assembly and not torch_path.fused_assembly
        verts = fused.vertices({"shape": torch.zeros(1, flame.n_shape), "expr": torch.randn(2, flame.n_expr),
                                "jaw": torch.tensor([[1.0, 0, 0, 0, 1, 0]]).repeat(2, 1) + 0.1 * torch.randn(2, 6),
                                "eyes": torch.tensor([1.0, 0, 0, 0, 1, 0] * 2).repeat(2, 1),
                                "eyelids": torch.rand(2, 2)})
        raw = torch.tanh(torch.randn(2, a.n_gaussians, 10))
        g1, g2 = fused.assemble(verts, raw), torch_path.assemble(verts, raw)
        for k, tol in (("means", 1e-6), ("scales", 1e-6), ("quats", 1e-3)):  # quats: mm-sized triangles in fp32
            torch.testing.assert_close(g1[k], g2[k], atol=tol, rtol=1e-5, msg=k)


@pytest.mark.parametrize("parity", [False, True])
def test_avatar_forward_fused_matches_torch_path_values_and_gradients(tmp_path, parity):
    from flashavatar.model import FLAME, GaussianAvatar
    from flashavatar.model.synthetic import write_head_model

    path = write_head_model(tmp_path)
    flame = FLAME(path)
    torch.manual_seed(1)
    a = GaussianAvatar(flame, path.parent / "head_template.obj", uv_size=24, parity=parity, offset_scale=0.01)
    with torch.no_grad():
        a.mlp_out.weight.normal_(0, 0.05)
        a.mlp_out.bias.normal_(0, 0.3)
        a.rotation.add_(0.3 * torch.randn_like(a.rotation))
    codes = {"shape": torch.zeros(1, flame.n_shape), "expr": torch.randn(2, flame.n_expr),
             "jaw": torch.tensor([[1.0, 0, 0, 0, 1, 0]]).repeat(2, 1), "eyes": torch.tensor([1.0, 0, 0, 0, 1, 0] * 2)
             .repeat(2, 1), "eyelids": torch.rand(2, 2)}
    g = torch.Generator().manual_seed(2)
    results = []
    for fused in (True, False):
        a.fused_assembly = fused
        a.zero_grad()
        out = a(codes)
        res = out["residual"]
        tensors = (out["means"], out["quats"], out["scales"], res["means"], res["quats"])
        g.manual_seed(2)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in tensors)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in a.named_parameters() if p.grad is not None}
        results.append(([t.detach() for t in tensors], grads))
    (fused_out, fused_grads), (ref_out, ref_grads) = results
    for x, y in zip(fused_out, ref_out):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert set(fused_grads) == set(ref_grads) and {"rotation", "log_scale", "mlp_out.weight"} <= set(ref_grads)
    for name in ref_grads:
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-5 * scale, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parity", [False, True])
def test_cuda_matches_cpu(dtype, parity):
    if not _ext.cuda_compiled():
        pytest.skip("flashavatar._C built without CUDA")
    cpu = random_inputs(B=4, V=500, N=5000, dtype=dtype, seed=3, index_dtype=torch.int32)
    gpu = [t.cuda() for t in cpu]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(gaussian_assembly(*gpu, offset_scale=0.2, parity=parity),
                    gaussian_assembly(*cpu, offset_scale=0.2, parity=parity)):
        torch.testing.assert_close(a.cpu(), b, atol=tol, rtol=tol)
    # VJPs with random cotangents (grad_verts is accumulated with atomics on CUDA: float tolerance)
    g = torch.Generator().manual_seed(5)
    cot = [torch.randn(4, 5000, w, generator=g, dtype=dtype) for w in (3, 4, 3, 4)]
    grads = []
    for inputs, dev in ((cpu, "cpu"), (gpu, "cuda")):
        verts, faces, bary, rot, ls, raw = inputs
        leaves = [t.clone().requires_grad_() for t in (verts, rot, ls, raw)]
        out = gaussian_assembly(leaves[0], faces, bary, leaves[1], leaves[2], leaves[3], offset_scale=0.2,
                                parity=parity)
        loss = sum((o * c.to(dev)).sum() for o, c in zip(out, cot))
        grads.append([t.cpu() for t in torch.autograd.grad(loss, leaves)])
    gtol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, a, b in zip(("verts", "rotation", "log_scale", "raw"), *grads):
        torch.testing.assert_close(a, b, atol=gtol, rtol=gtol, msg=name)


@pytest.mark.cuda
def test_cuda_op_is_capturable_in_a_graph():
    if not _ext.cuda_compiled():
        pytest.skip("flashavatar._C built without CUDA")
    inputs = [t.cuda() for t in random_inputs(B=2, V=100, N=1000, dtype=torch.float32, index_dtype=torch.int32)]
    eager = gaussian_assembly(*inputs)
    graph = torch.cuda.CUDAGraph()
    gaussian_assembly(*inputs)  # warm-up
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = gaussian_assembly(*inputs)
    inputs[5].mul_(0.5)  # new MLP outputs in the static buffer
    graph.replay()
    new = gaussian_assembly(*inputs)
    for a, b, c in zip(out, new, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(out[0], eager[0])
