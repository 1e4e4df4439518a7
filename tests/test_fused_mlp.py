"""flashavatar.ops.fused_mlp: the CPU op equals the pure-torch reference (the same roundings), the CUDA kernel
equals both on shapes whose rows straddle frames and blocks, the Animator's fused MLP (opt-in) equals its chunked
GEMMs, bad input is named."""

import pytest
import torch

import flashavatar.ops as ops
from flashavatar.ops.reference import fused_mlp_reference

pytestmark = pytest.mark.skipif(not ops.available(), reason="flashavatar._C not built")


def _args(B, N, L, O, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h_pe = torch.randn(N, 256, generator=g) * 0.5
    cond = torch.randn(B, 256, generator=g) * 0.5
    w_hidden = torch.randn(L, 256, 256, generator=g) / 12  # keeps activations O(1) through the layers
    b_hidden = torch.randn(L, 256, generator=g) * 0.1
    w_out = torch.randn(O, 256, generator=g) / 16
    b_out = torch.randn(O, generator=g) * 0.1
    lows = [t.to(dtype) for t in (h_pe, cond, w_hidden)]
    return [a.to(device) for a in (lows[0], lows[1], lows[2], b_hidden, w_out.to(dtype), b_out)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,N,L,O", [(1, 1, 0, 1), (3, 70, 1, 10), (2, 300, 5, 13), (4, 33, 2, 16)])
def test_cpu_op_equals_reference(dtype, B, N, L, O):
    args = _args(B, N, L, O, dtype)
    got = ops.fused_mlp(*args)
    assert got.shape == (B, N, O) and got.dtype == torch.float32
    want = fused_mlp_reference(*args)
    # the same roundings; float32 sums in another order can flip an activation's last bit, nothing more
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    # and it is a real MLP: another hidden weight changes the output
    if L:
        args[2] = args[2].clone()
        args[2][-1, 0] += 1.0
        assert (ops.fused_mlp(*args) - got).abs().max() > 1e-3


def test_bad_input_is_named():
    ok = _args(2, 5, 1, 10, torch.bfloat16)
    bad = [
        (0, torch.zeros(5, 128, dtype=torch.bfloat16), "h_pe must have shape \\[N, 256\\]"),
        (1, torch.zeros(2, 256), "cond"),
        (2, torch.zeros(1, 256, 128, dtype=torch.bfloat16), "w_hidden must have shape"),
        (3, torch.zeros(2, 256), "b_hidden must have shape"),
        (4, torch.zeros(17, 256, dtype=torch.bfloat16), "1 <= O <= 16"),
        (5, torch.zeros(10, dtype=torch.float64), "float32"),
    ]
    for i, value, match in bad:
        args = list(ok)
        args[i] = value
        with pytest.raises(RuntimeError, match=match):
            ops.fused_mlp(*args)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        ops.fused_mlp(*[a.float() if i in (0, 1, 2, 4) else a for i, a in enumerate(ok)])


def test_fake_kernel_gives_the_shape():
    args = [a.to("meta") for a in _args(3, 7, 2, 13, torch.bfloat16)]
    out = torch.ops.flashavatar.fused_mlp(*args)
    assert out.shape == (3, 7, 13) and out.dtype == torch.float32 and out.device.type == "meta"


def _avatar(tmp_path, **kwargs):
    """A GaussianAvatar on the procedural head (written to ``tmp_path``)."""
    from flashavatar.model import FLAME, GaussianAvatar
    from flashavatar.model.synthetic import write_head_model

    path = write_head_model(tmp_path)
    return GaussianAvatar(FLAME(path), path.parent / "head_template.obj", **kwargs)


def test_animator_refuses_a_fused_mlp_it_cannot_run(tmp_path):
    from flashavatar.animate import Animator

    a = _avatar(tmp_path, uv_size=16)
    with pytest.raises(RuntimeError, match="fused_mlp=True but .* cannot run here"):
        Animator(a, mlp_dtype="bf16", fused_mlp=True)  # on the CPU
    assert not Animator(a, mlp_dtype="bf16").fused_mlp  # off by default


# ------------------------------------------------------------------------------------------------ CUDA
def _cuda_ok(dtype):
    return torch.cuda.is_available() and ops.fused_mlp_supported(torch.device("cuda"), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,N,L,O", [(1, 1, 0, 1), (1, 14485, 5, 10), (3, 1000, 5, 13), (7, 129, 1, 16)])
def test_cuda_kernel_equals_cpu_op(dtype, B, N, L, O):
    if not _cuda_ok(dtype):
        pytest.skip("the fused MLP needs an sm_80+ GPU with 198 KB of shared memory per block")
    args = _args(B, N, L, O, dtype, seed=B + N)
    want = ops.fused_mlp(*args)  # CPU
    got = ops.fused_mlp(*[a.cuda() for a in args]).cpu()
    assert torch.isfinite(got).all()
    # rows straddle frames (N not a multiple of the 128-row block) and blocks; every row and column is checked
    err = (got - want).abs()
    scale = want.abs().max()
    assert err.max() <= 2e-2 * scale, f"max error {err.max():.3g} of {scale:.3g}"
    assert err.mean() <= 1e-3 * scale, f"mean error {err.mean():.3g} of {scale:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("color_offset", [0.0, 0.2])
def test_animator_fused_mlp_equals_chunked_gemms(tmp_path, color_offset):
    from flashavatar.animate import Animator

    if not _cuda_ok(torch.bfloat16):
        pytest.skip("the fused MLP needs an sm_80+ GPU with 198 KB of shared memory per block")
    torch.manual_seed(0)
    a = _avatar(tmp_path, uv_size=64, color_offset=color_offset)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = a.cuda().eval()
    cond = torch.randn(5, a.cond_dim, device="cuda")
    fused = Animator(a, mlp_dtype="bf16", fused_mlp=True)
    plain = Animator(a, mlp_dtype="bf16", fused_mlp=False)
    raw_f, col_f = fused.mlp_outputs(cond)
    raw_p, col_p = plain.mlp_outputs(cond)
    assert raw_f.shape == raw_p.shape == (5, a.n_gaussians, 10)
    torch.testing.assert_close(raw_f, raw_p, atol=2e-2, rtol=0)
    assert (raw_f - raw_p).abs().mean() < 1e-3
    if color_offset:
        torch.testing.assert_close(col_f, col_p, atol=2e-2 * color_offset, rtol=0)
    else:
        assert col_f is None and col_p is None
