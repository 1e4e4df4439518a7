"""The `flashavatar` command: help texts, clear errors for bad arguments and paths, a tiny run end to end."""

import json

import pytest

from flashavatar.cli import main

MINE = ["train", "render", "reenact", "export", "bench", "demo"]


@pytest.mark.parametrize("command", MINE)
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: flashavatar {command}")
    # every option has a help text (argparse prints the option, then its explanation)
    import argparse
    import importlib

    from flashavatar.cli import COMMANDS

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_missing_required_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from flashavatar.model.synthetic import make_subject

    root = tmp_path_factory.mktemp("cli")
    make_subject(root / "data", "synthetic", n_frames=8, size=40)
    return root


TINY = ["--preset", "cpu", "--set", "model.uv_size=12", "--set", "model.mlp_hidden=32", "--set", "model.mlp_layers=2",
        "--set", "data.n_test=2", "--set", "data.image_scale=1.0", "--set", "train.tensorboard=false",
        "--no-progress", "--device", "cpu"]


def test_bad_paths_and_settings_give_clear_errors(subject, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")] + TINY) == 2
    out = capsys.readouterr().out
    assert "subject folder not found" in out and "nowhere" in out
    assert main(["train", "--data", str(subject / "data"), "--out", str(tmp_path / "r"), "--set",
                 "train.iterations=abc"] + TINY) == 2
    assert "train.iterations" in capsys.readouterr().out
    assert main(["train", "--data", str(subject / "data"), "--out", str(tmp_path / "r"), "--set",
                 "train.iteratons=3"] + TINY) == 2
    assert "unknown key 'train.iteratons'" in capsys.readouterr().out
    assert main(["train", "--data", str(subject / "data"), "--out", str(tmp_path / "r"),
                 "--head-model", str(tmp_path / "missing.pkl")] + TINY) == 2
    assert "missing.pkl" in capsys.readouterr().out
    for cmd in (["render", "--run", str(tmp_path / "nope")], ["export", "--run", str(tmp_path / "nope")],
                ["reenact", "--run", str(tmp_path / "nope"), "--driver-tracker", str(tmp_path),
                 "--driver-subject", "x"]):
        assert main(cmd) == 2
        assert "not a trained run folder" in capsys.readouterr().out
    assert main(["bench", "--head-model", str(tmp_path / "none.pkl"), "--device", "cpu"]) == 2
    assert "none.pkl" in capsys.readouterr().out


@pytest.mark.video
def test_train_render_export_reenact_bench_through_the_command(subject, tmp_path, capsys):
    run = tmp_path / "run"
    data = str(subject / "data")
    assert main(["train", "--data", data, "--out", str(run), "--iterations", "3"] + TINY) == 0
    assert "trained to iteration 3" in capsys.readouterr().out
    assert main(["train", "--data", data, "--out", str(run), "--iterations", "5"] + TINY) == 0  # resumes
    assert "trained to iteration 5" in capsys.readouterr().out
    assert main(["render", "--run", str(run), "--device", "cpu", "--no-frames"]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "masking" in out
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["frames"] == 2
    assert (run / "eval" / "test_side_by_side.mp4").stat().st_size > 0
    assert not (run / "eval" / "frames").exists()
    assert main(["export", "--run", str(run), "--device", "cpu", "--frame", "6"]) == 0
    assert (run / "export" / "frame_00006.ply").is_file()
    assert main(["export", "--run", str(run), "--device", "cpu", "--frame", "99"]) == 2
    assert "--frame 99" in capsys.readouterr().out
    assert main(["reenact", "--run", str(run), "--device", "cpu", "--driver-tracker", str(subject / "data" / "tracker"),
                 "--driver-subject", "synthetic", "--max-frames", "2", "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "reenactment.mp4").is_file()
    assert main(["reenact", "--run", str(run), "--device", "cpu", "--driver-tracker", str(subject / "data" / "tracker"),
                 "--driver-subject", "synthetic", "--driver-neutral", "50"]) == 2
    assert "--driver-neutral 50" in capsys.readouterr().out
    bench_json = tmp_path / "bench.json"
    assert main(["bench", "--head-model", str(subject / "data" / "flame" / "generic_model.pkl"), "--device", "cpu",
                 "--resolution", "32", "--uv-size", "8", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0",
                 "--out", str(bench_json)]) == 0
    assert "CPU figures" in capsys.readouterr().out
    rows = json.loads(bench_json.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["fps"] > 0 for r in rows)
