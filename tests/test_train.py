"""Training end to end on a tiny synthetic subject (CPU): convergence, exact resume, atomic checkpoints, Ctrl-C."""

import os

import pytest
import torch

from flashavatar import config as config_mod
from flashavatar import io_utils
from flashavatar.train import Trainer


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from flashavatar.model.synthetic import make_subject

    root = tmp_path_factory.mktemp("subject")
    make_subject(root, "synthetic", n_frames=16, size=64)
    return root


def tiny_config(root, **overrides):
    base = {
        "data": {"data_root": str(root), "subject": "synthetic", "n_test": 4},
        "model": {"uv_size": 24, "sh_degree": 1, "mlp_hidden": 64, "mlp_layers": 3},
        "train": {"iterations": 100, "batch_size": 2, "progress": False, "tensorboard": False, "preview_every": 0,
                  "checkpoint_every": 0, "eval_frames": 4, "sh_increase_every": 50, "log_every": 10},
        "loss": {"perceptual_from": 60, "w2_from": 50},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return config_mod.make_config(None, None, base)


def test_test_loss_falls_well_below_start(subject, tmp_path):
    trainer = Trainer(tiny_config(subject), tmp_path / "run", device="cpu")
    result = trainer.run()
    assert result.iteration == 100 and not result.interrupted
    assert result.test_loss_end < 0.6 * result.test_loss_start, (result.test_loss_start, result.test_loss_end)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "previews").glob("*.png")) == []  # previews off in this config


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.avatar.state_dict().items()}


def test_resume_gives_the_same_next_steps(subject, tmp_path):
    # every loss term on (W2 pairs, perceptual, SH schedule) so the RNG and optimiser state all matter
    over = {"train": {"iterations": 8, "sh_increase_every": 3},
            "loss": {"w2_weight": 0.05, "w2_from": 2, "perceptual_from": 3}}
    straight = Trainer(tiny_config(subject, **over), tmp_path / "a", device="cpu")
    straight.run()
    first = Trainer(tiny_config(subject, **over), tmp_path / "b", device="cpu")
    first.run(max_steps=5)
    assert first.iteration == 5
    torch.manual_seed(1234)  # a resumed process starts from unrelated global RNG state
    resumed = Trainer(tiny_config(subject, **over), tmp_path / "b", device="cpu")
    assert resumed.iteration == 5
    resumed.run()
    assert resumed.iteration == 8
    # same frames drawn, same parameters and optimiser moments (up to BLAS summation-order noise)
    assert torch.equal(straight.sampler.get_state(), resumed.sampler.get_state())
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        assert torch.allclose(sa[k]["exp_avg"], sb[k]["exp_avg"], rtol=1e-3, atol=1e-8)
        assert float(sa[k]["step"]) == float(sb[k]["step"]) == 8



def test_color_head_trains_and_reloads(subject, tmp_path):
    cfg = tiny_config(subject, model={"color_offset": 0.1}, train={"iterations": 30})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    result = trainer.run()
    assert result.iteration == 30 and result.test_loss_end < result.test_loss_start
    head = trainer.avatar.mlp_color
    assert head is not None and float(head.weight.detach().abs().max()) > 0  # it learned (it starts at zero)
    # the saved config rebuilds the colour head, so the checkpoint loads into a fresh trainer
    again = Trainer(config_mod.load(tmp_path / "run" / "config.yaml"), tmp_path / "run", device="cpu")
    assert again.iteration == 30
    torch.testing.assert_close(again.avatar.mlp_color.weight, head.weight)
    with pytest.raises(ValueError, match="model.color_offset"):
        tiny_config(subject, model={"color_offset": -1.0})


def test_shading_trains_and_reloads(subject, tmp_path):
    cfg = tiny_config(subject, model={"shading": True}, train={"iterations": 30})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    start = trainer.avatar.shading_sh.detach().clone()
    result = trainer.run()
    assert result.iteration == 30 and result.test_loss_end < result.test_loss_start
    coeffs = trainer.avatar.shading_sh
    assert float((coeffs.detach() - start).abs().max()) > 1e-3  # it learned (at the colour's rate)
    again = Trainer(config_mod.load(tmp_path / "run" / "config.yaml"), tmp_path / "run", device="cpu")
    assert again.iteration == 30
    torch.testing.assert_close(again.avatar.shading_sh, coeffs)


def test_interrupted_checkpoint_write_keeps_the_previous_one(subject, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(subject, train={"iterations": 3}), tmp_path / "run", device="cpu")
    trainer.run(max_steps=2)
    path = trainer.ckpt_path
    before = io_utils.load_checkpoint(path)
    trainer.step()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(torch, "save", real_save)
    after = io_utils.load_checkpoint(path)
    assert after["iteration"] == before["iteration"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind
    # a truncated file under the real name is reported clearly
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="bad.pt cannot be read"):
        io_utils.load_checkpoint(bad)


def test_ctrl_c_saves_and_returns(subject, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(subject, train={"iterations": 20}), tmp_path / "run", device="cpu")
    real_step = trainer.step

    def step_then_interrupt():
        if trainer.iteration == 4:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "step", step_then_interrupt)
    result = trainer.run()
    assert result.interrupted and result.iteration == 4
    assert io_utils.load_checkpoint(trainer.ckpt_path)["iteration"] == 4
    again = Trainer(tiny_config(subject, train={"iterations": 20}), tmp_path / "run", device="cpu")
    assert again.iteration == 4
    with pytest.raises(RuntimeError, match="other model settings"):
        Trainer(tiny_config(subject, model={"uv_size": 20}), tmp_path / "run", device="cpu")


def test_emd_and_w2_terms_are_finite_and_reported(subject, tmp_path):
    cfg = tiny_config(subject, loss={"w2_weight": 0.05, "w2_from": 0, "emd_weight": 0.01, "emd_points": 32,
                                     "perceptual_from": 0})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    terms = trainer.floats(trainer.step(), 1)
    assert {"image", "mouth", "perceptual", "w2", "emd", "total"} <= set(terms)
    assert terms["w2"] >= 0 and terms["emd"] >= 0


def test_bad_data_paths_are_named(tmp_path, subject):
    with pytest.raises(FileNotFoundError, match="subject folder not found"):
        Trainer(tiny_config(tmp_path / "nowhere"), tmp_path / "run", device="cpu")
    cfg = tiny_config(subject)
    cfg.data.tracker_root = str(tmp_path / "no_tracker")
    with pytest.raises(FileNotFoundError, match="no_tracker"):
        Trainer(cfg, tmp_path / "run", device="cpu")
    # a missing image is reported by name
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(subject, broken)
    os.remove(broken / "synthetic" / "imgs" / "00003.jpg")
    with pytest.raises(FileNotFoundError, match="00003.jpg"):
        Trainer(tiny_config(broken), tmp_path / "run", device="cpu")


def test_resume_with_a_sampler_state_from_another_device_kind(subject, tmp_path, caplog):
    # frames are sampled on the device that holds them: a CUDA run's checkpoint carries a 16-byte Philox
    # state that a CPU generator cannot take (and back); resuming must go on with a fresh seed, not fail
    over = {"train": {"iterations": 4}, "optim": {"lr_final_factor": 0.5}}
    first = Trainer(tiny_config(subject, **over), tmp_path / "run", device="cpu")
    first.run(max_steps=2)
    ckpt = io_utils.load_checkpoint(first.ckpt_path)
    ckpt["sampler"] = torch.zeros(16, dtype=torch.uint8)
    io_utils.save_checkpoint(first.ckpt_path, ckpt)
    with caplog.at_level("WARNING", logger="flashavatar.train"):
        resumed = Trainer(tiny_config(subject, **over), tmp_path / "run", device="cpu")
    assert resumed.iteration == 2
    assert "sampler state is from another device kind" in caplog.text
    resumed.run()
    assert resumed.iteration == 4
    # the group learning rates follow the schedule again after the optimiser state was loaded
    assert resumed._lr_factor(3) < 1
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
        [b * resumed._lr_factor(3) for b in resumed.base_lrs])


class FakeGraphs:
    """CPU stand-in for train._CudaGraphs: "capture" keeps the step's body and each "replay" runs it again,
    which is what a CUDA graph does for a body that reads only its static inputs and device tensors (the
    iteration it depends on is fixed at capture, as in a real graph)."""

    def __init__(self, fail: bool = False):
        self.fail, self.captured, self.warmups, self.capacity = fail, 0, 0, 1

    def warmup(self, step):
        self.warmups += 1
        return step()

    def capture(self, body):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        return body

    def capacities(self):
        return {"key": self.capacity}


def _graph_run_config(root):
    # phases change at 3 (SH degree 1), 5 (perceptual on) and 7 (W2 on); capacity re-checks every 4 steps
    return tiny_config(root, train={"iterations": 16, "sh_increase_every": 3, "cuda_graph_refresh": 4},
                       loss={"w2_weight": 0.05, "w2_from": 7, "perceptual_from": 5},
                       optim={"lr_final_factor": 0.5})


def test_cuda_graph_is_off_on_the_cpu(subject, tmp_path):
    trainer = Trainer(tiny_config(subject, train={"cuda_graph": True}), tmp_path / "run", device="cpu")
    assert trainer._graphs is None and "not a CUDA device" in trainer.graph_note
    trainer.step()
    assert not trainer.graph_active
    with pytest.raises(ValueError, match="cuda_graph_refresh"):
        tiny_config(subject, train={"cuda_graph_refresh": -1})


def test_graph_steps_follow_the_phases_and_match_eager_steps(subject, tmp_path):
    eager = Trainer(_graph_run_config(subject), tmp_path / "eager", device="cpu")
    graphed = Trainer(_graph_run_config(subject), tmp_path / "graph", device="cpu")
    fake = graphed._graphs = FakeGraphs()
    replayed, captures = [], []
    for it in range(16):
        a, b = eager.step(), graphed.step()
        replayed.append(graphed.graph_active)
        captures.append(fake.captured)
        assert set(a) == set(b), it  # the same loss terms in every phase
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), (it, k, a[k], b[k])
    # 3 eager warm-up steps, capture at 3 (phase SH 1); perceptual at 5 -> warm-up 5-7, capture at 8 (W2 on
    # since 7); capacity re-check due at 12: warm-up 12-14, capacity unchanged -> the same graph replays at 15
    assert replayed == [False] * 3 + [True] * 2 + [False] * 3 + [True] * 4 + [False] * 3 + [True]
    assert captures[-1] == 2 and captures[3] == 1 and captures[8] == 2
    assert fake.warmups == 9 and eager.iteration == graphed.iteration == 16
    a, b = _params(eager), _params(graphed)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    assert torch.equal(eager.sampler.get_state(), graphed.sampler.get_state())  # the same frames were drawn


def test_graph_recaptures_when_the_raster_capacity_moved(subject, tmp_path):
    trainer = Trainer(_graph_run_config(subject), tmp_path / "run", device="cpu")
    fake = trainer._graphs = FakeGraphs()
    for _ in range(13):  # captures at 3 and 8; the re-check starts at 12
        trainer.step()
    fake.capacity = 2  # the warm-up steps measured another intersection count
    for _ in range(3):
        trainer.step()
    assert fake.captured == 3 and trainer.graph_active


def test_failed_capture_falls_back_to_eager_with_the_reason(subject, tmp_path, caplog):
    eager = Trainer(_graph_run_config(subject), tmp_path / "eager", device="cpu")
    trainer = Trainer(_graph_run_config(subject), tmp_path / "run", device="cpu")
    trainer._graphs = FakeGraphs(fail=True)
    with caplog.at_level("WARNING", logger="flashavatar.train"):
        for _ in range(6):
            a, b = eager.step(), trainer.step()
            assert torch.allclose(a["total"], b["total"], rtol=1e-5)
    assert trainer._graphs is None and not trainer.graph_active
    assert "capture failed (RuntimeError: operation not permitted" in trainer.graph_note
    assert "capture failed" in caplog.text


def test_evaluation_records_head_psnr_over_training_time_and_the_time_to_the_bar(subject, tmp_path, capsys):
    import json

    from flashavatar import render
    from flashavatar.train import report_training

    cfg = tiny_config(subject, train={"iterations": 40, "eval_every": 20, "psnr_bar": 5.0})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    result = report_training(trainer, trainer.run())
    evals = [h for h in result.history if "test_psnr_head" in h]
    assert [h["iteration"] for h in evals] == [20, 40]  # the final evaluation is not repeated
    assert 0 < evals[0]["train_seconds"] < evals[1]["train_seconds"] <= result.train_seconds
    # the same numbers as `flashavatar render` on those frames (mask, clamping, mean over frames)
    same = render.evaluate(trainer.session, trainer.session.test_frames, write_frames=False)
    assert result.final_eval["test_psnr_head"] == pytest.approx(same["mean"]["psnr_head"], rel=1e-5)
    assert result.final_eval["test_ssim_head"] == pytest.approx(same["mean"]["ssim_head"], rel=1e-5)
    assert result.final_eval["test_psnr_full"] == pytest.approx(same["mean"]["psnr_full"], rel=1e-5)
    # a 5 dB bar is passed at the first evaluation
    assert result.time_to_bar["iteration"] == 20 and result.time_to_bar["seconds"] == evals[0]["train_seconds"]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["time_to_bar"]["iteration"] == 20 and summary["psnr_bar"] == 5.0
    assert summary["final"]["test_psnr_head"] == result.final_eval["test_psnr_head"]
    assert "time to the 5 dB head-PSNR bar" in capsys.readouterr().out
    # kept across a resume; an unreachable bar is reported as such
    again = Trainer(tiny_config(subject, train={"iterations": 40, "psnr_bar": 99.0}), tmp_path / "run",
                    device="cpu")
    assert again.time_to_bar == result.time_to_bar and again.train_seconds == result.train_seconds
    other = Trainer(tiny_config(subject, train={"iterations": 20, "eval_every": 20, "psnr_bar": 99.0}),
                    tmp_path / "other", device="cpu")
    res = report_training(other, other.run())
    assert res.time_to_bar is None
    assert "99 dB head-PSNR bar was not reached" in capsys.readouterr().out
