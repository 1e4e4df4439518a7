"""flashavatar.ops.mlp_input / mlp_head (the Animator's first and last MLP layers): the CPU ops equal the pure-torch
references, the CUDA kernels equal the CPU ops (the tensor-core head on rows that are no multiple of its 16-row
tiles, every output width up to 16, and the shapes it hands to ATen), the Animator's branch through them equals
its torch path, bad input is named."""

import pytest
import torch

import flashavatar.ops as ops
from flashavatar.ops.reference import mlp_head_reference, mlp_input_reference

pytestmark = pytest.mark.skipif(not ops.available(), reason="flashavatar._C not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _input_args(B, N, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g).to(dtype), torch.randn(B, H, generator=g).to(dtype))


def _head_args(R, H, O, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, H, generator=g).relu_().to(dtype)
    return h, (torch.randn(O, H, generator=g) / H**0.5).to(dtype), torch.randn(O, generator=g) * 0.3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,H", [(1, 1, 256), (3, 70, 256), (2, 5, 20), (0, 4, 8)])
def test_mlp_input_cpu_equals_reference(dtype, B, N, H):
    h_pe, cond = _input_args(B, N, H, dtype)
    got = ops.mlp_input(h_pe, cond)
    assert got.shape == (B, N, H) and got.dtype == dtype
    assert torch.equal(got, mlp_input_reference(h_pe, cond))
    # and what the Animator's torch path computes, bit for bit
    assert torch.equal(got, torch.relu(h_pe[None] + cond[:, None]))
    if B and N:
        assert (got == 0).any() and (got > 0).any()  # the ReLU acts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,H,O", [(1, 256, 1), (37, 256, 10), (100, 256, 13), (16, 256, 16), (9, 64, 17),
                                   (0, 256, 10)])
@pytest.mark.parametrize("apply_tanh", [False, True])
def test_mlp_head_cpu_equals_reference(dtype, R, H, O, apply_tanh):
    h, w, b = _head_args(R, H, O, dtype)
    got = ops.mlp_head(h, w, b, apply_tanh=apply_tanh)
    assert got.shape == (R, O) and got.dtype == torch.float32
    torch.testing.assert_close(got, mlp_head_reference(h, w, b, apply_tanh), atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    h_pe, cond = _input_args(2, 5, 256, torch.bfloat16)
    with pytest.raises(RuntimeError, match="h_pe must have shape \\[N, H\\]"):
        ops.mlp_input(h_pe[0], cond)
    with pytest.raises(RuntimeError, match="cond must have shape \\[B, H\\] = \\[B, 256\\], got \\[2, 128\\]"):
        ops.mlp_input(h_pe, cond[:, :128])
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.mlp_input(h_pe, cond.float())
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.mlp_input(h_pe.double(), cond.double())
    h, w, b = _head_args(8, 256, 10, torch.bfloat16)
    with pytest.raises(RuntimeError, match="h must have shape \\[R, H\\]"):
        ops.mlp_head(h[0], w, b)
    with pytest.raises(RuntimeError, match="w must have shape \\[O, H\\] = \\[O, 256\\]"):
        ops.mlp_head(h, w[:, :100], b)
    with pytest.raises(RuntimeError, match="b must have shape \\[O\\] = \\[10\\], got \\[3\\]"):
        ops.mlp_head(h, w, b[:3])
    with pytest.raises(RuntimeError, match="b must be float32"):
        ops.mlp_head(h, w, b.double())


def test_fake_kernels_give_the_shapes():
    h_pe, cond = (t.to("meta") for t in _input_args(3, 7, 256, torch.bfloat16))
    x = torch.ops.flashavatar.mlp_input(h_pe, cond)
    assert x.shape == (3, 7, 256) and x.dtype == torch.bfloat16 and x.device.type == "meta"
    h, w, b = (t.to("meta") for t in _head_args(21, 256, 13, torch.bfloat16))
    y = torch.ops.flashavatar.mlp_head(h, w, b, True)
    assert y.shape == (21, 13) and y.dtype == torch.float32 and y.device.type == "meta"


def _avatar(tmp_path, **kwargs):
    """test_fused_mlp's avatar on the procedural head, its MLP output not near zero (perturbed parameters)."""
    from test_fused_mlp import _avatar as head_avatar

    torch.manual_seed(0)
    a = head_avatar(tmp_path, **kwargs)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return a.eval()


@pytest.mark.parametrize("color_offset", [0.0, 0.2])
@pytest.mark.parametrize("mlp_rows", [None, 500])  # one chunk / frames split into Gaussian ranges
def test_animator_layer_ops_branch_equals_torch_path_cpu(tmp_path, color_offset, mlp_rows):
    from flashavatar.animate import Animator

    a = _avatar(tmp_path, uv_size=32, color_offset=color_offset)
    an = Animator(a, mlp_dtype="bf16", mlp_rows=mlp_rows)
    assert not an.mlp_layer_ops  # the CPU default: the torch path
    cond = torch.randn(3, a.cond_dim)
    raw_t, col_t = an.mlp_outputs(cond)
    an.mlp_layer_ops = True
    raw_o, col_o = an.mlp_outputs(cond)
    assert raw_o.shape == (3, a.n_gaussians, 10) and raw_o.is_contiguous()
    assert raw_t.abs().max() > 0.1  # a real output, not tanh(0)
    torch.testing.assert_close(raw_o, raw_t, atol=1e-5, rtol=1e-5)
    if color_offset:
        assert col_o.shape == (3, a.n_gaussians, 3)
        torch.testing.assert_close(col_o, col_t, atol=1e-5, rtol=1e-5)
    else:
        assert col_o is None and col_t is None


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,H", [(1, 1, 256), (64, 1449, 256), (3, 7, 20), (2, 5, 12)])
def test_mlp_input_cuda_equals_cpu(dtype, B, N, H):
    h_pe, cond = _input_args(B, N, H, dtype, seed=N)
    want = ops.mlp_input(h_pe, cond)
    got = ops.mlp_input(h_pe.cuda(), cond.cuda()).cpu()
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,H,O", [(1, 256, 1), (14485 * 3 + 5, 256, 10), (1000, 256, 13), (77, 256, 16),
                                   (50, 256, 17), (40, 64, 10)])  # the last two: handed to ATen
@pytest.mark.parametrize("apply_tanh", [False, True])
def test_mlp_head_cuda_equals_cpu(dtype, R, H, O, apply_tanh):
    h, w, b = _head_args(R, H, O, dtype, seed=R)
    want = ops.mlp_head(h, w, b, apply_tanh=apply_tanh)
    got = ops.mlp_head(h.cuda(), w.cuda(), b.cuda(), apply_tanh=apply_tanh).cpu()
    assert torch.isfinite(got).all()
    # the same products summed in float32 in another order: every row and column checked
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # a non-contiguous h (every other row) goes through a contiguous copy and gives the same rows
    if R > 2:
        got2 = ops.mlp_head(h.cuda()[::2], w.cuda(), b.cuda(), apply_tanh=apply_tanh).cpu()
        torch.testing.assert_close(got2, want[::2], atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("color_offset", [0.0, 0.2])
@pytest.mark.parametrize("mlp_rows", [None, 5000])
def test_animator_layer_ops_equal_torch_path_cuda(tmp_path, color_offset, mlp_rows):
    from flashavatar.animate import Animator

    a = _avatar(tmp_path, uv_size=64, color_offset=color_offset).cuda()
    an = Animator(a, mlp_dtype="bf16", mlp_rows=mlp_rows)
    assert an.mlp_layer_ops  # the GPU default in bf16
    cond = torch.randn(5, a.cond_dim, device="cuda")
    raw_o, col_o = an.mlp_outputs(cond)
    an.mlp_layer_ops = False
    raw_t, col_t = an.mlp_outputs(cond)
    assert raw_t.abs().max() > 0.1
    # the same bf16 roundings of the first layer; the hidden GEMMs are the same calls; the head sums in float32
    torch.testing.assert_close(raw_o, raw_t, atol=1e-4, rtol=1e-4)
    if color_offset:
        torch.testing.assert_close(col_o, col_t, atol=1e-4, rtol=1e-4)
