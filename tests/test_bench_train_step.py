"""The training-step benchmark runs on the CPU and writes its JSON (numbers are not asserted: speed lives there)."""

import json

import pytest

BENCH_SCRIPT = "bench_train_step"  # loaded by the `bench` fixture (conftest.py)


def test_bench_train_step_writes_stages_and_device(bench, tmp_path, capsys):
    out = tmp_path / "train_step.json"
    rc = bench.main(["--device", "cpu", "--frames", "8", "--size", "48", "--n-test", "2", "--warmup", "1",
                     "--steps", "2", "--profile-steps", "1", "--cuda-graph", "off", "--data", str(tmp_path),
                     "--set", "model.uv_size=16", "--set", "model.mlp_hidden=32", "--set", "model.mlp_layers=2",
                     "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["device_type"] == "cpu" and res["device"].startswith("CPU")
    (run,) = res["runs"]
    assert run["mode"] == "eager" and run["steps"] == 2 and run["it_per_s"] > 0
    # the default start is the phase with the full SH degree and the perceptual term on
    assert run["sh_degree"] == res["runs"][0]["config"]["model"]["sh_degree"]
    assert run["start_iteration"] >= run["config"]["loss"]["perceptual_from"]
    stages = run["profile"]["stages"]
    assert set(bench.STAGES) <= set(stages)
    for name in ("flame", "mlp", "raster_fwd", "losses", "backward", "raster_bwd", "optimizer"):
        assert stages[name]["host_ms"] > 0, name  # every stage was seen by the profiler
    assert "per-stage profile" in capsys.readouterr().out


def test_bench_rejects_graph_mode_without_cuda(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--cuda-graph", "on", "--out", str(tmp_path)])
