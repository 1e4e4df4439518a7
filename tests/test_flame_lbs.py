"""flashavatar.ops.flame_lbs (FLAME in three launches) against the Animator's torch FLAME, which
test_fast_path.py ties to FLAME.forward; CUDA against CPU."""

import pytest
import torch

from flashavatar.animate import Animator
from flashavatar.model import FLAME, GaussianAvatar
from flashavatar.model.synthetic import write_head_model
from flashavatar.ops import _ext, flame_lbs

pytestmark = pytest.mark.skipif(not _ext.available(), reason="flashavatar._C is not built")


@pytest.fixture(scope="module")
def animator(tmp_path_factory):
    path = write_head_model(tmp_path_factory.mktemp("head"))
    flame = FLAME(path)
    avatar = GaussianAvatar(flame, path.parent / "head_template.obj", uv_size=32)
    return Animator(avatar, fused_flame=False)


def random_codes(an, B, seed, per_frame_shape=False):
    g = torch.Generator().manual_seed(seed)
    eye6 = torch.tensor([1.0, 0, 0, 0, 1, 0])
    return {"shape": 0.5 * torch.randn(B if per_frame_shape else 1, an.n_shape, generator=g),
            "expr": torch.randn(B, an.n_expr, generator=g),
            "jaw": eye6 + 0.3 * torch.randn(B, 6, generator=g),  # unnormalised 6D codes, as trackers write them
            "eyes": eye6.repeat(2) + 0.2 * torch.randn(B, 12, generator=g),
            "eyelids": torch.rand(B, 2, generator=g)}


def op_args(an, c, dtype=torch.float32, device="cpu"):
    tensors = [c["shape"], c["expr"], c["jaw"], c["eyes"], c["eyelids"], an.flame_dirs, an.flame_base,
               an.lbs_weights, an.eyelid_dirs]
    return [t.to(device, dtype) for t in tensors]


@pytest.mark.parametrize("per_frame_shape", [False, True])
def test_matches_the_animator_torch_flame(animator, per_frame_shape):
    an = animator
    assert an.flat_chain and an.has_eyelids
    c = random_codes(an, 5, seed=1, per_frame_shape=per_frame_shape)
    ref = an._vertices_core(c["shape"], c["expr"], c["jaw"], c["eyes"], c["eyelids"])  # [B, U, 3]
    out = flame_lbs(*op_args(an, c), use_eyelids=True)
    assert out.shape == ref.shape == (5, an.n_used, 3)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # float64 agrees with float32 to float32 rounding, and the eyelids matter
    out64 = flame_lbs(*op_args(an, c, torch.float64), use_eyelids=True)
    torch.testing.assert_close(out64.float(), ref, atol=1e-6, rtol=1e-5)
    no_lids = flame_lbs(*op_args(an, c), use_eyelids=False)
    assert float((no_lids - out).abs().max()) > 1e-4


def test_animator_uses_it_by_default_and_gives_the_same_vertices(animator):
    fused = Animator(animator.avatar)
    assert fused.fused_flame and not animator.fused_flame
    c = random_codes(animator, 3, seed=2)
    torch.testing.assert_close(fused.vertices(c), animator.vertices(c), atol=1e-6, rtol=1e-5)


def test_bad_inputs_are_named(animator):
    args = op_args(animator, random_codes(animator, 2, seed=3))
    bad = list(args)
    bad[2] = bad[2][:, :5]
    with pytest.raises(ValueError, match=r"jaw must have shape \[2, 6\], got \[2, 5\]"):
        flame_lbs(*bad)
    bad = list(args)
    bad[6] = bad[6][:-1]
    with pytest.raises(ValueError, match="base must have shape"):
        flame_lbs(*bad)
    bad = list(args)
    bad[1] = bad[1].double()
    with pytest.raises(ValueError, match="one float dtype"):
        flame_lbs(*bad)


@pytest.mark.cuda
def test_cuda_matches_cpu(animator):
    if not _ext.cuda_compiled():
        pytest.skip("flashavatar._C built without CUDA")
    c = random_codes(animator, 16, seed=4)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        cpu = flame_lbs(*op_args(animator, c, dtype), use_eyelids=True)
        gpu = flame_lbs(*op_args(animator, c, dtype, "cuda"), use_eyelids=True)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=tol, rtol=tol)


def test_opcheck(animator):
    args = op_args(animator, random_codes(animator, 2, seed=5))
    torch.library.opcheck(torch.ops.flashavatar.flame_lbs, (*args, True))
