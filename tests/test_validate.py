"""``flashavatar validate``: every kind of bad data is caught and the file at fault is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flashavatar import cli
from flashavatar import validate as VAL
from flashavatar.data import masks as M

N = 6
SIZE = (32, 40)  # (h, w): non-square on purpose


def tracker_frame(k, size=SIZE):
    """A metrical-tracker style nested dict with the SPEC §1 keys and shapes."""
    h, w = size
    K = np.array([[[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]]], np.float32)
    return {
        "flame": {"exp": np.zeros((1, 100), np.float32), "shape": np.zeros((1, 300), np.float32),
                  "jaw": np.array([[1, 0, 0, 0, 1, 0]], np.float32),
                  "eyes": np.tile(np.array([[1, 0, 0, 0, 1, 0]], np.float32), (1, 2)),
                  "eyelids": np.zeros((1, 2), np.float32), "tex": np.zeros((1, 50), np.float32),
                  "sh": np.zeros((1, 9, 3), np.float32)},
        "camera": {"R": np.zeros((1, 6), np.float32)},
        "opencv": {"R": np.eye(3, dtype=np.float32)[None], "t": np.array([[0, 0, 1]], np.float32), "K": K},
        "img_size": np.array([h, w]), "frame_id": k, "global_step": np.int64(10 * k),
    }


def make_subject(root, n=N, size=SIZE):
    data, tracker = root / "data", root / "tracker"
    h, w = size
    head = np.zeros((h, w), np.uint8)
    head[4:28, 8:32] = 255
    mouth = np.zeros((h, w), np.uint8)
    mouth[18:22, 16:24] = 255
    for k in range(1, n + 1):
        M.write_jpg(data / "s" / "imgs" / f"{k:05d}.jpg", np.full((h, w, 3), 90, np.uint8))
        M.write_jpg(data / "s" / "alpha" / f"{k:05d}.jpg", head)
        M.write_png(data / "s" / "parsing" / f"{k:05d}_neckhead.png", head)
        M.write_png(data / "s" / "parsing" / f"{k:05d}_mouth.png", mouth if k % 2 else np.zeros_like(mouth))
        (tracker / "s" / "checkpoint").mkdir(parents=True, exist_ok=True)
        torch.save(tracker_frame(k - 1, size), tracker / "s" / "checkpoint" / f"{k - 1:05d}.frame")
    return data, tracker


def check(root, **kw):
    kw.setdefault("test_frames", 2)
    return VAL.validate_subject(root / "data", root / "tracker", "s", **kw)


def errors_about(report, fragment):
    return [f for f in report.errors if fragment in f.path]


def test_valid_subject_passes(tmp_path):
    make_subject(tmp_path)
    report = check(tmp_path)
    assert report.ok, report.format()
    assert not report.findings, report.format()
    text = report.format()
    assert "frames: 6 (00001…00006)" in text and "4 train / 2 test" in text
    assert "32x40" in text and "inner mouth visible in 3 frames" in text
    assert "neckhead mask coverage: mean 0.450" in text  # 24 x 24 of 32 x 40


def test_deleted_frame_is_named(tmp_path):
    make_subject(tmp_path)
    (tmp_path / "data" / "s" / "imgs" / "00003.jpg").unlink()
    report = check(tmp_path)
    assert not report.ok
    found = errors_about(report, "00003.jpg")
    assert len(found) == 1 and "missing: tracker file 00002.frame pairs with this frame" in found[0].message, \
        report.format()
    assert len(report.errors) == 1
    # without tracker files, the gap in the numbering is the error
    report = VAL.validate_subject(tmp_path / "data", None, "s", test_frames=2)
    assert "gap in the frame numbering" in errors_about(report, "imgs/00003.jpg")[0].message


def test_wrong_size_image_is_named(tmp_path):
    make_subject(tmp_path)
    M.write_jpg(tmp_path / "data" / "s" / "imgs" / "00004.jpg", np.zeros((30, 40, 3), np.uint8))
    report = check(tmp_path)
    assert not report.ok
    found = errors_about(report, "imgs/00004.jpg")
    assert len(found) == 1 and "30x40" in found[0].message and "32x40" in found[0].message, report.format()
    # without tracker files the majority size... the first frame's size is the reference
    report = VAL.validate_subject(tmp_path / "data", None, "s", test_frames=2)
    assert errors_about(report, "imgs/00004.jpg"), report.format()
    # an explicit expected size: every tracker file and frame that disagrees is named
    report = check(tmp_path, expected_size=(30, 40))
    named = [f for f in report.errors if f.path.endswith(".frame")]
    assert len(named) == VAL.MAX_LISTED and "differs from the size given [30, 40]" in named[0].message
    assert any(f"{N - VAL.MAX_LISTED} more tracker files" in f.message for f in report.errors)
    assert errors_about(report, "imgs/00004.jpg") and not errors_about(report, "imgs/00001.jpg")  # vs its tracker file
    # a mask whose size differs from its frame is named too
    M.write_png(tmp_path / "data" / "s" / "parsing" / "00002_mouth.png", np.zeros((16, 16), np.uint8))
    assert errors_about(check(tmp_path), "00002_mouth.png")


def test_tracker_file_with_missing_key_is_named(tmp_path):
    make_subject(tmp_path)
    frame = tracker_frame(4)
    del frame["flame"]["jaw"]
    torch.save(frame, tmp_path / "tracker" / "s" / "checkpoint" / "00004.frame")
    report = check(tmp_path)
    assert not report.ok
    found = errors_about(report, "00004.frame")
    assert len(found) == 1 and "missing key 'flame.jaw'" in found[0].message, report.format()


def test_tracker_shape_value_and_size_problems(tmp_path):
    make_subject(tmp_path)
    checkpoint = tmp_path / "tracker" / "s" / "checkpoint"
    frame = tracker_frame(1)
    frame["flame"]["exp"] = np.zeros((1, 50), np.float32)
    torch.save(frame, checkpoint / "00001.frame")
    frame = tracker_frame(2)
    frame["opencv"]["t"] = np.array([[0, np.nan, 1]], np.float32)
    torch.save(frame, checkpoint / "00002.frame")
    frame = tracker_frame(3, size=(40, 32))  # [h, w] swapped, the original's bug
    torch.save(frame, checkpoint / "00003.frame")
    (checkpoint / "00004.frame").unlink()
    report = check(tmp_path)
    assert "'flame.exp' has shape (1, 50), expected (1, 100)" in errors_about(report, "00001.frame")[0].message
    assert "NaN" in errors_about(report, "00002.frame")[0].message
    # 00004.jpg pairs with 00003.frame whose img_size is 40x32
    assert "img_size says 40x32" in errors_about(report, "imgs/00004.jpg")[0].message, report.format()
    assert "img_size [40, 32] differs" in errors_about(report, "00003.frame")[0].message
    # image 00005.jpg lost its tracker file: training ignores it (warning); the numbering gap is noted
    assert not errors_about(report, "00005.jpg") and not errors_about(report, "00004.frame")
    assert any("00005.jpg" in w.message and "no tracker file" in w.message for w in report.warnings)
    assert any("00004.frame" in w.message and "gap" in w.message for w in report.warnings)
    assert "5 (00000…00005)" in report.format()


def test_missing_masks_alpha_and_corrupt_files_are_named(tmp_path):
    make_subject(tmp_path)
    subject = tmp_path / "data" / "s"
    (subject / "alpha" / "00002.jpg").unlink()
    (subject / "parsing" / "00005_neckhead.png").unlink()
    noisy = np.random.default_rng(0).integers(0, 255, (*SIZE, 3), dtype=np.uint8)  # big scan data
    M.write_jpg(subject / "imgs" / "00006.jpg", noisy)
    data = (subject / "imgs" / "00006.jpg").read_bytes()
    (subject / "imgs" / "00006.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact, scan cut
    M.write_png(subject / "parsing" / "00001_neckhead.png", np.zeros(SIZE, np.uint8))
    report = check(tmp_path)
    assert errors_about(report, "alpha/00002.jpg")
    assert errors_about(report, "00005_neckhead.png")
    assert "unreadable" in errors_about(report, "imgs/00006.jpg")[0].message
    assert any("00001_neckhead.png" in w.path and "empty" in w.message for w in report.warnings)
    # --quick reads headers only: the truncated JPG passes, the missing files do not
    quick = check(tmp_path, decode=False)
    assert not errors_about(quick, "imgs/00006.jpg") and errors_about(quick, "alpha/00002.jpg")


def test_split_needs_training_frames(tmp_path):
    make_subject(tmp_path)
    report = check(tmp_path, test_frames=500)
    assert not report.ok and "test split takes the last 500" in report.errors[0].message


def test_untrusted_pickle_is_not_loaded(tmp_path):
    make_subject(tmp_path)
    frame = tracker_frame(0)
    frame["extra"] = Image.new("L", (2, 2))  # an arbitrary class: needs full unpickling
    path = tmp_path / "tracker" / "s" / "checkpoint" / "00000.frame"
    torch.save(frame, path)
    report = check(tmp_path)
    found = errors_about(report, "00000.frame")
    assert found and "--trust-tracker-files" in found[0].message, report.format()
    assert check(tmp_path, trust_tracker_files=True).ok


def test_cli_exit_codes(tmp_path, capsys):
    make_subject(tmp_path)
    argv = ["validate", str(tmp_path / "data"), str(tmp_path / "tracker"), "--id", "s", "--test-frames", "2",
            "--quiet"]
    assert cli.main(argv) == 0
    assert "OK: training can run" in capsys.readouterr().out
    (tmp_path / "data" / "s" / "imgs" / "00002.jpg").unlink()
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "imgs/00002.jpg: missing" in out and "FAILED" in out
    assert cli.main(["validate", str(tmp_path / "nowhere"), "--id", "s", "--quiet"]) == 1
    assert "no such folder" in capsys.readouterr().out
    # the tracker folder defaults to DATA_ROOT/tracker as in training (`flashavatar synth` layout)
    (tmp_path / "tracker").rename(tmp_path / "data" / "tracker")
    assert cli.main(["validate", str(tmp_path / "data"), "--id", "s", "--test-frames", "2", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "tracker files: 6" in out and "00001.frame pairs with this frame" in out
    assert cli.main(["validate", str(tmp_path / "data"), "--id", "s", "--test-frames", "2", "--images-only",
                     "--quiet"]) == 1
    assert "tracker files" not in capsys.readouterr().out


def test_camera_checks_and_restricted_loading(tmp_path):
    make_subject(tmp_path)
    checkpoint = tmp_path / "tracker" / "s" / "checkpoint"
    frame = tracker_frame(1)
    frame["opencv"]["R"] = np.array([[[1, 0.5, 0], [0, 1, 0], [0, 0, 1]]], np.float32)  # det 1, not a rotation
    torch.save(frame, checkpoint / "00001.frame")
    frame = tracker_frame(2)
    frame["opencv"]["K"][0, 0, 0] = -50.0
    torch.save(frame, checkpoint / "00002.frame")
    frame = tracker_frame(3)
    del frame["flame"]["eyelids"]  # the reader uses zeros
    torch.save(frame, checkpoint / "00003.frame")
    report = check(tmp_path)
    assert "not a rotation matrix" in errors_about(report, "00001.frame")[0].message
    assert "non-positive focal" in errors_about(report, "00002.frame")[0].message
    assert not errors_about(report, "00003.frame")
    assert any("no flame.eyelids" in w.message for w in report.warnings)
    assert VAL.load_tracker_dict(checkpoint / "00000.frame")["img_size"].tolist() == list(SIZE)
    torch.save({"payload": Image.new("L", (1, 1))}, tmp_path / "evil.frame")
    with pytest.raises(VAL.UntrustedTrackerFile, match="evil.frame"):
        VAL.read_tracker_file(tmp_path / "evil.frame")
