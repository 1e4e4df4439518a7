"""bench_rasterize's trained-run scene (``--run DIR``) on the CPU: built from a real run folder, shaped like the
synthetic scenes, and rendered as the avatar's own fast path renders it (speed is not asserted here)."""

import pytest
import torch

BENCH_SCRIPT = "bench_rasterize"  # loaded by the `bench` fixture (conftest.py)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from flashavatar.cli import main
    from flashavatar.model.synthetic import make_subject

    root = tmp_path_factory.mktemp("bench_scene")
    make_subject(root / "data", "synthetic", n_frames=6, size=40)
    args = ["train", "--data", str(root / "data"), "--out", str(root / "run"), "--preset", "cpu", "--device", "cpu",
            "--no-progress", "--iterations", "3", "--set", "model.uv_size=12", "--set", "model.mlp_hidden=32",
            "--set", "model.mlp_layers=2", "--set", "data.n_test=2", "--set", "train.tensorboard=false"]
    assert main(args) == 0
    return root / "run"


def test_trained_scene_is_the_avatars_first_training_frame(bench, run_dir):
    from flashavatar.animate import Animator
    from flashavatar.session import load_run

    args, (w, h) = bench.trained_scene(run_dir, device="cpu")
    means, quats, scales, opac, colors, vm, K = args
    n = means.shape[0]
    assert (w, h) == (40, 40) and n > 0
    assert quats.shape == (n, 4) and scales.shape == (n, 3) and opac.shape == (n,) and colors.shape == (n, 3)
    assert vm.shape == (1, 4, 4) and K.shape == (1, 3, 3)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in args)
    assert (colors >= 0).all() and ((opac > 0) & (opac < 1)).all()
    # the same Gaussians and camera as the fast path's render of that frame at SH degree 0
    session, _ = load_run(run_dir, "cpu", load_frames=False)
    codes = {k: v[:1] for k, v in session.train_frames.codes.items()}
    ref = Animator(session.avatar).render(codes, session.train_frames.viewmats[:1, None],
                                          session.train_frames.Ks[:1, None], w, h, sh_degree=0)[0]
    from flashavatar.ops import rasterize_gaussians

    img = rasterize_gaussians(*args, w, h, check_finite=False)[0]
    torch.testing.assert_close(img.reshape(ref.shape), ref, atol=1e-5, rtol=1e-5)
    assert float(img.std()) > 0.01  # not an empty frame


def test_short_kernel_names(bench):
    name = "void flashavatar::(anonymous namespace)::render_fwd_part_kernel<3>(flashavatar::(anonymous namespace)::P)"
    assert bench.short_kernel_name(name) == "render_fwd_part_kernel<3>"
