"""The fused SSIM op (flashavatar.ops.fused_ssim_map): values and VJPs against the PyTorch formulation
(metrics.ssim_map(blur="conv"), the reference), float64 gradcheck on the CPU path, CUDA against the CPU path,
the loss and the trainer's config hooks, bad input."""

import pytest
import torch

from flashavatar import losses, metrics
from flashavatar.ops import _ext, fused_ssim_map
from flashavatar.ops.reference import ssim_map_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason="flashavatar._C is not built")
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.cuda_compiled()), reason="needs a CUDA build and GPU")


def image_pair(shape, dtype=torch.float64, seed=0, device="cpu"):
    """A smooth image plus noise and a noisy copy of it: SSIM well inside (0, 1), neither trivial nor constant."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(*shape, generator=g, dtype=dtype)
    smooth = torch.nn.functional.avg_pool2d(base.movedim(-1, -3).reshape(-1, shape[-1], *shape[-3:-1]), 3, 1, 1)
    smooth = smooth.reshape(*shape[:-3], shape[-1], *shape[-3:-1]).movedim(-3, -1)
    pred = (0.7 * smooth + 0.3 * base).clamp(0, 1)
    gt = (pred + 0.1 * torch.randn(*shape, generator=g, dtype=dtype)).clamp(0, 1)
    return pred.to(device), gt.to(device)


@pytest.mark.parametrize("shape", [(2, 20, 37, 3), (1, 6, 6, 1), (3, 7, 33, 4), (1, 40, 17, 3)])
def test_values_match_reference_float64(shape):
    pred, gt = image_pair(shape)
    ref = ssim_map_reference(pred, gt)
    out = fused_ssim_map(pred, gt)
    assert out.shape == ref.shape == shape[:-1]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert 0.2 < out.mean() < 0.99  # a non-trivial comparison


def test_leading_dims_and_float32():
    pred, gt = image_pair((2, 3, 24, 30, 3), dtype=torch.float32)
    out = fused_ssim_map(pred, gt)
    assert out.shape == (2, 3, 24, 30)
    torch.testing.assert_close(out, ssim_map_reference(pred, gt), rtol=0, atol=2e-5)


def test_sigma_is_used():
    pred, gt = image_pair((1, 16, 16, 3))
    assert not torch.allclose(fused_ssim_map(pred, gt, sigma=1.5), fused_ssim_map(pred, gt, sigma=3.0))
    ref = ssim_map_reference(pred, gt, sigma=3.0)
    torch.testing.assert_close(fused_ssim_map(pred, gt, sigma=3.0), ref, rtol=0, atol=1e-12)


def test_gradcheck_float64_both_images():
    pred, gt = image_pair((2, 8, 11, 2))
    pred.requires_grad_(True)
    gt.requires_grad_(True)
    assert torch.autograd.gradcheck(fused_ssim_map, (pred, gt), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(2, 19, 23, 3), (1, 6, 9, 1)])
def test_vjp_matches_reference(shape):
    pred, gt = image_pair(shape, seed=3)
    cot = torch.randn(shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (fused_ssim_map, ssim_map_reference):
        a, b = pred.clone().requires_grad_(True), gt.clone().requires_grad_(True)
        torch.autograd.backward(fn(a, b), cot)
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)
    assert grads[0][0].abs().max() > 1e-3


def test_only_the_needed_gradient_and_no_moments_without_grad():
    pred, gt = image_pair((1, 12, 12, 3))
    with torch.no_grad():
        _, moments = torch.ops.flashavatar.ssim_fwd(pred, gt, 1.5, False)
    assert moments.numel() == 0
    a = pred.clone().requires_grad_(True)
    fused_ssim_map(a, gt).sum().backward()
    assert a.grad is not None and gt.grad is None


def test_loss_and_metric_use_the_fused_op_by_default():
    pred, gt = image_pair((2, 16, 20, 3), dtype=torch.float32)
    mask = torch.rand(2, 16, 20) > 0.3
    torch.testing.assert_close(losses.ssim_loss(pred, gt, mask), losses.ssim_loss(pred, gt, mask, blur="conv"),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics.ssim(pred, gt), metrics.ssim(pred, gt, blur="fused"), rtol=0, atol=0)
    # "auto" falls back to the convolutions where the kernel does not apply (5 pixels: no reflection padding)
    small_pred, small_gt = image_pair((1, 5, 9, 3))
    torch.testing.assert_close(metrics.ssim_map(small_pred, small_gt),
                               metrics.ssim_map(small_pred, small_gt, blur="conv"))
    with pytest.raises(ValueError, match="blur='fused'"):
        metrics.ssim_map(small_pred, small_gt, blur="fused")


def test_bad_input():
    pred, gt = image_pair((1, 12, 12, 3))
    with pytest.raises(ValueError, match=r"same shape"):
        fused_ssim_map(pred, gt[:, :11])
    with pytest.raises(ValueError, match=r"at least 6 x 6.*\[1, 5, 12, 3\]"):
        fused_ssim_map(pred[:, :5], gt[:, :5])
    with pytest.raises(ValueError, match="float32 or float64"):
        fused_ssim_map(pred.half(), gt.half())
    with pytest.raises(ValueError, match="float32"):
        fused_ssim_map(pred.float(), gt)
    with pytest.raises(ValueError, match="sigma"):
        fused_ssim_map(pred, gt, sigma=0.0)
    with pytest.raises(TypeError, match="gt must be a torch.Tensor"):
        fused_ssim_map(pred, gt.numpy())
    # the raw ops name the argument and its shape too
    with pytest.raises(RuntimeError, match=r"ssim_fwd: gt must have pred's shape"):
        torch.ops.flashavatar.ssim_fwd(pred, gt[:, :10], 1.5, True)
    with pytest.raises(RuntimeError, match=r"ssim_bwd: moments must have shape \[5, N, H, W, C\]"):
        torch.ops.flashavatar.ssim_bwd(pred[..., 0], pred, gt, pred.new_empty(0), 1.5, True, False)


def test_opcheck():
    pred, gt = image_pair((2, 9, 10, 3))
    torch.library.opcheck(torch.ops.flashavatar.ssim_fwd.default, (pred.requires_grad_(True), gt, 1.5, True))
    _, moments = torch.ops.flashavatar.ssim_fwd(pred.detach(), gt, 1.5, True)
    torch.library.opcheck(torch.ops.flashavatar.ssim_bwd.default,
                          (torch.randn(2, 9, 10, dtype=torch.float64), pred.detach(), gt, moments, 1.5, True, True))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 512, 512, 3), (2, 37, 70, 1), (1, 6, 6, 4)])
def test_cuda_matches_cpu(dtype, shape):
    pred, gt = image_pair(shape, dtype=dtype, seed=5)
    cot = torch.randn(shape[:-1], dtype=dtype, generator=torch.Generator().manual_seed(2))
    results = []
    for device in ("cpu", "cuda"):
        a = pred.detach().to(device).requires_grad_(True)
        b = gt.detach().to(device).requires_grad_(True)
        out = fused_ssim_map(a, b)
        torch.autograd.backward(out, cot.to(device))
        results.append([t.cpu() for t in (out, a.grad, b.grad)])
    tol = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 2e-5}
    for cpu_t, cuda_t in zip(*results):
        torch.testing.assert_close(cuda_t, cpu_t, **tol)
    # and against the reference formulation on the GPU
    ref = ssim_map_reference(pred.cuda(), gt.cuda()).cpu()
    torch.testing.assert_close(results[1][0], ref, **tol)


@cuda
def test_cuda_graph_capture():
    pred, gt = image_pair((2, 64, 48, 3), dtype=torch.float32, device="cuda")
    a = pred.clone().requires_grad_(True)
    cot = torch.randn(2, 64, 48, device="cuda")

    def step():
        out = fused_ssim_map(a, gt)
        return (out,) + torch.autograd.grad((out * cot).sum(), a)

    # No eager call on the default stream before the capture: autograd would keep its stream for `a`.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        a.mul_(0.9)  # new input into the static tensor, then replay
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    torch.testing.assert_close(captured[0], eager[0])
    torch.testing.assert_close(captured[1], eager[1])
