"""Training steps on a GPU: no host synchronisation per step; CUDA-graph steps match eager ones."""

import pytest
import torch

from test_train import subject  # noqa: F401  (the tiny synthetic subject fixture)
from test_train import tiny_config

from flashavatar.train import Trainer

pytestmark = pytest.mark.cuda


def cuda_config(root, **over):
    over.setdefault("train", {}).update({"device": "cuda"})
    return tiny_config(root, **over)


def test_eager_step_never_synchronises_with_the_host(subject, tmp_path):  # noqa: F811
    over = {"loss": {"w2_weight": 0.05, "w2_from": 0, "perceptual_from": 0}, "optim": {"lr_final_factor": 0.5},
            "train": {"cuda_graph": False}}
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


def test_graph_steps_match_eager_steps_and_never_synchronise(subject, tmp_path):  # noqa: F811
    from flashavatar import metrics

    def config(graph):
        return cuda_config(subject, train={"iterations": 20, "sh_increase_every": 3, "cuda_graph_refresh": 0,
                                           "cuda_graph": graph},
                           loss={"w2_weight": 0.05, "w2_from": 4, "perceptual_from": 4},
                           optim={"lr_final_factor": 0.5})

    eager = Trainer(config(False), tmp_path / "eager", device="cuda")
    graphed = Trainer(config(True), tmp_path / "graph", device="cuda")
    assert eager._graphs is None and graphed._graphs is not None, graphed.graph_note
    # warm-up 0-2, capture at 3 (SH degree 1); perceptual + W2 from 4: warm-up 4-6, capture at 7, replays on
    replayed = []
    for it in range(12):
        a, b = eager.step(), graphed.step()
        replayed.append(graphed.graph_active)
        assert set(a) == set(b), it
        # the same frames, the same kernels; the rasteriser's atomic sums leave float noise only
        assert torch.allclose(a["total"], b["total"], rtol=5e-3), (it, float(a["total"]), float(b["total"]))
    assert replayed == [False] * 3 + [True] + [False] * 3 + [True] * 5, (replayed, graphed.graph_note)
    assert graphed.captures == 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            graphed.step()
            eager.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(eager.sampler.get_state(), graphed.sampler.get_state())
    with torch.no_grad():
        batch = eager.session.test_frames.batch(torch.arange(2), torch.device("cuda"))
        img_a = eager.session.render(batch)["image"]
        img_b = graphed.session.render(batch)["image"]
    assert float(metrics.psnr(img_a, img_b).min()) >= 40.0
