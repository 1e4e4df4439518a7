"""Training steps on a GPU: no host synchronisation per step; CUDA-graph steps match eager ones."""

import pytest
import torch

from test_train import tiny_config  # noqa: F401  (the tiny subject fixture comes from there too)
from test_train import subject  # noqa: F401
from flashavatar.train import Trainer

pytestmark = pytest.mark.cuda


def cuda_config(root, **over):
    over.setdefault("train", {}).update({"device": "cuda"})
    return tiny_config(root, **over)


def test_eager_step_never_synchronises_with_the_host(subject, tmp_path):  # noqa: F811
    over = {"loss": {"w2_weight": 0.05, "w2_from": 0, "perceptual_from": 0}, "optim": {"lr_final_factor": 0.5}}
    trainer = Trainer(cuda_config(subject, **over), tmp_path / "run", device="cuda")
    assert trainer.session.train_frames.gt.is_cuda and trainer.sampler.device.type == "cuda"
    for _ in range(4):  # first calls: lazy initialisation, the rasteriser's capacity settles
        trainer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            terms = trainer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v) for v in terms.values())
    # the groups' learning rates are views of one device tensor that follows the schedule
    lrs = torch.stack([g["lr"] for g in trainer.optimizer.param_groups]).cpu()
    want = torch.tensor(trainer.base_lrs) * trainer._lr_factor(trainer.iteration - 1)
    assert torch.allclose(lrs, want, rtol=1e-6)
