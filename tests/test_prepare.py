"""``flashavatar prepare``: video -> frames, label maps -> masks, alpha, the face parser (shapes only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flashavatar import cli
from flashavatar import prepare as P
from flashavatar.data import masks as M
from flashavatar.data import video as V

FPS = 12
N_FRAMES = 24
H, W = 96, 128
SKIN = (220, 170, 140)  # inside the YCbCr skin window
BACKDROP = (30, 60, 160)


def synthetic_frames(n=N_FRAMES, skin=True):
    """[n, H, W, 3] uint8: a skin-coloured ellipse drifting right over a blue backdrop, plus a grey patch
    whose brightness encodes the frame index (to check which source frames were kept)."""
    yy, xx = np.mgrid[:H, :W]
    frames = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        f = frames[i]
        f[...] = BACKDROP
        if skin:  # a head (ellipse) on a narrower neck that runs to the bottom of the frame
            f[((xx - 70 - i * 0.5) / 22) ** 2 + ((yy - 48) / 30) ** 2 < 1] = SKIN
            f[70:, 61 + i // 2:81 + i // 2] = SKIN
        f[4:20, 4:20] = 8 * i + 20
    return frames


def encode(path, frames, fps=FPS):
    import imageio

    writer = imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, quality=9,
                                ffmpeg_log_level="error")
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    frames = synthetic_frames()
    return encode(tmp_path_factory.mktemp("video") / "clip.mp4", frames), frames


def read(path):
    with Image.open(path) as im:
        return np.asarray(im)


# ----------------------------------------------------------------------------------------------------------
# frames


@pytest.mark.video
def test_prepare_writes_numbered_square_frames(video, tmp_path):
    path, frames = video
    result = P.prepare_frames(path, tmp_path / "subj", size=64, box="0,0,96,96", progress=False)
    names = sorted(p.name for p in (tmp_path / "subj" / "imgs").iterdir())
    assert names == [f"{k:05d}.jpg" for k in range(1, N_FRAMES + 1)]
    assert result["frames"] == N_FRAMES and result["written"] == N_FRAMES and result["skipped"] == 0
    assert result["source_frames"] == list(range(N_FRAMES))
    for k in (1, 13, N_FRAMES):
        img = read(tmp_path / "subj" / "imgs" / f"{k:05d}.jpg")
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        # content = the box of source frame k-1 resized (up to video + JPG compression)
        expected = np.asarray(Image.fromarray(frames[k - 1][0:96, 0:96]).resize((64, 64), Image.Resampling.BICUBIC))
        assert np.abs(img.astype(int) - expected.astype(int)).mean() < 6
    manifest = json.loads((tmp_path / "subj" / "prepare.json").read_text())
    assert manifest["box"] == [0, 0, 96, 96] and manifest["frames"] == N_FRAMES


@pytest.mark.video
def test_fps_and_time_range_select_source_frames(video, tmp_path):
    path, frames = video
    result = P.prepare_frames(path, tmp_path / "s", size=32, fps=FPS / 2, start=0.5, end=1.5, box="0,0,96,96",
                              progress=False)
    # 12 fps -> 6 fps from 0.5 s (frame 6) to before 1.5 s (frame 18): every other frame
    assert result["source_frames"] == [6, 8, 10, 12, 14, 16]
    assert len(list((tmp_path / "s" / "imgs").glob("*.jpg"))) == 6
    # the grey patch tells which source frame each output is (patch at 4..20 px of a 96 px box -> 32 px)
    for k, src in enumerate(result["source_frames"], start=1):
        patch = read(tmp_path / "s" / "imgs" / f"{k:05d}.jpg")[2:6, 2:6].astype(float).mean()
        assert abs(patch - (8 * src + 20)) < 6, (k, src, patch)
    limited = P.prepare_frames(path, tmp_path / "t", size=32, max_frames=5, box="0,0,96,96", progress=False)
    assert limited["frames"] == 5 and len(list((tmp_path / "t" / "imgs").glob("*.jpg"))) == 5


@pytest.mark.video
def test_resume_writes_nothing_new_and_fills_holes(video, tmp_path):
    path, _ = video
    P.prepare_frames(path, tmp_path / "s", size=32, box="0,0,96,96", progress=False)
    imgs = tmp_path / "s" / "imgs"
    stamps = {p.name: p.stat().st_mtime_ns for p in imgs.iterdir()}
    again = P.prepare_frames(path, tmp_path / "s", size=32, box="0,0,96,96", progress=False)
    assert again["written"] == 0 and again["skipped"] == N_FRAMES
    assert {p.name: p.stat().st_mtime_ns for p in imgs.iterdir()} == stamps
    (imgs / "00007.jpg").unlink()
    filled = P.prepare_frames(path, tmp_path / "s", size=32, box="0,0,96,96", progress=False)
    assert filled["written"] == 1 and (imgs / "00007.jpg").exists()
    assert not list(imgs.glob(".*")), "temporary files left behind"
    # resuming with other settings would mix two framings: refused unless --overwrite
    with pytest.raises(P.PrepareError, match="size"):
        P.prepare_frames(path, tmp_path / "s", size=48, box="0,0,96,96", progress=False)
    redo = P.prepare_frames(path, tmp_path / "s", size=48, box="0,0,96,96", overwrite=True, progress=False)
    assert redo["written"] == N_FRAMES and read(imgs / "00001.jpg").shape == (48, 48, 3)
    # frames from elsewhere (no manifest) are not mixed with new ones
    (tmp_path / "s" / "prepare.json").unlink()
    with pytest.raises(P.PrepareError, match="did not make"):
        P.prepare_frames(path, tmp_path / "s", size=48, box="0,0,96,96", progress=False)


@pytest.mark.video
def test_alpha_video_is_cropped_like_the_frames(video, tmp_path, capsys):
    path, frames = video
    mattes = np.where((frames == np.array(SKIN, np.uint8)).all(-1, keepdims=True), 255, 0).astype(np.uint8)
    matte_video = encode(tmp_path / "pha.mp4", np.repeat(mattes, 3, axis=-1))
    result = P.prepare_frames(path, tmp_path / "s", size=48, fps=FPS / 3, box="24,0,120,96", alpha_video=matte_video,
                              progress=False)
    assert result["source_frames"] == list(range(0, N_FRAMES, 3))
    for k, src in enumerate(result["source_frames"], start=1):
        alpha = read(tmp_path / "s" / "alpha" / f"{k:05d}.jpg")
        expected = np.asarray(Image.fromarray(mattes[src, 0:96, 24:120, 0]).resize((48, 48), Image.Resampling.BICUBIC))
        assert alpha.shape == (48, 48) and np.abs(alpha.astype(int) - expected.astype(int)).mean() < 6
    small = encode(tmp_path / "small.mp4", np.repeat(mattes[:, :48, :64], 3, axis=-1))
    with pytest.raises(P.PrepareError, match="small.mp4: 64x48 but"):
        P.prepare_frames(path, tmp_path / "t", size=48, alpha_video=small, progress=False)
    short = encode(tmp_path / "short.mp4", np.repeat(mattes[:5], 3, axis=-1))
    with pytest.raises(P.PrepareError, match="short.mp4: ends after 5 frames"):
        P.prepare_frames(path, tmp_path / "u", size=48, box="0,0,96,96", alpha_video=short, progress=False)
    assert cli.main(["prepare", "--id", "s", "--out", str(tmp_path), "--alpha-video", str(matte_video)]) == 2
    assert "--alpha-video needs VIDEO" in capsys.readouterr().err


@pytest.mark.video
def test_automatic_box_finds_the_skin_region(video, tmp_path):
    path, _ = video
    result = P.prepare_frames(path, tmp_path / "s", size=32, box_scale=1.5, box_frames=4, progress=False)
    x0, y0, x1, y1 = result["box"]
    assert result["box_source"] == "skin"
    assert x1 - x0 == y1 - y0  # square
    # the box holds the whole head (ellipse centre ~(70.75, 48), half-axes 22 x 30 in the first frames) and is
    # sized by the face, not by face + neck (the neck would make the skin region 78 px tall -> side 117)
    assert x0 <= 70.75 - 22 and x1 >= 70.75 + 22 + 2 and y0 <= 48 - 30 and y1 >= 48 + 30
    assert 70 <= x1 - x0 <= 100
    # resuming without a box reuses the automatic box found the first time
    again = P.prepare_frames(path, tmp_path / "s", size=32, box_scale=1.5, box_frames=4, progress=False)
    assert again["box"] == result["box"] and again["written"] == 0


@pytest.mark.video
def test_automatic_box_falls_back_to_the_centre_square(tmp_path):
    path = encode(tmp_path / "noskin.mp4", synthetic_frames(6, skin=False))
    result = P.prepare_frames(path, tmp_path / "s", size=32, progress=False)
    assert result["box_source"] == "centre" and result["box"] == [16, 0, 112, 96]


def test_unreadable_video_gives_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(V.VideoError, match="broken.mp4"):
        P.prepare_frames(bad, tmp_path / "s", progress=False)
    assert cli.main(["prepare", str(bad), "--id", "s", "--out", str(tmp_path), "--quiet"]) == 2
    assert "broken.mp4" in capsys.readouterr().err
    assert cli.main(["prepare", str(tmp_path / "nope.mp4"), "--id", "s", "--out", str(tmp_path), "--quiet"]) == 2
    assert "nope.mp4: no such file" in capsys.readouterr().err


def test_crop_modes():
    frame = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    # square box partly outside the frame: the outside is black, the inside is copied exactly
    out = V.crop_square(frame, V.CropBox(-2, -2, 6, 6), 8)
    assert np.all(out[:2] == 0) and np.all(out[:, :2] == 0)
    np.testing.assert_array_equal(out[2:, 2:], frame[0:6, 0:6])
    # metrical-tracker's rule: clip to [x0, min(x1, w-1)) x [y0, min(y1, h-1)), then pad evenly to a square
    out = V.crop_square(frame, V.CropBox(2, 0, 9, 12, mode="tracker"), 9)  # 9 rows x 7 cols -> pad 1 + 1
    assert out.shape == (9, 9, 3)
    assert np.all(out[:, 0] == 0) and np.all(out[:, 8] == 0)
    np.testing.assert_array_equal(out[:, 1:8], frame[0:9, 2:9])
    assert V.square_box(10, 20, 30, 60).as_tuple() == (0, 20, 40, 60)
    assert V.shift_inside(V.CropBox(-5, 90, 35, 130), 100, 120).as_tuple() == (0, 80, 40, 120)
    assert V.shift_inside(V.CropBox(-5, -10, 135, 130), 100, 200).as_tuple() == (-5, 0, 135, 140)
    assert V.parse_box("1, 2, 30, 40") == (1, 2, 30, 40)
    with pytest.raises(ValueError, match="--box"):
        V.parse_box("1,2,3")
    with pytest.raises(ValueError, match="--box"):
        V.parse_box("5,5,1,1")


def test_tracker_bbox_file(tmp_path):
    import torch

    torch.save(np.array([10, 50, 5, 45]), tmp_path / "bbox.pt")
    box = V.load_tracker_bbox(tmp_path / "bbox.pt")
    assert box.as_tuple() == (10, 5, 50, 45) and box.mode == "tracker"
    np.save(tmp_path / "bbox.npy", np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="4 numbers"):
        V.load_tracker_bbox(tmp_path / "bbox.npy")


def test_frame_selector_rates():
    def kept(src, target, n=60, **kw):
        selector = V.FrameSelector(src, target, **kw)
        return [i for i in range(n) if selector.keep(i)]

    assert kept(30, 15)[:4] == [0, 2, 4, 6] and len(kept(30, 15)) == 30
    assert kept(30, 10)[:4] == [0, 3, 6, 9] and len(kept(30, 10)) == 20
    assert len(kept(25, 10)) == 24  # 2.4 s at 10 fps, no repeats
    assert kept(24, 30) == list(range(60))  # a higher target keeps every frame, never duplicates
    assert kept(30, None, start=1.0, end=1.5) == list(range(30, 45))
    with pytest.raises(ValueError, match="end time"):
        V.FrameSelector(30, None, start=2.0, end=1.0)


# ----------------------------------------------------------------------------------------------------------
# masks and alpha


def band_label_map():
    """[19, 19] label map: row r has class r everywhere, plus a few pixels of other classes."""
    labels = np.repeat(np.arange(M.NUM_CLASSES)[:, None], M.NUM_CLASSES, axis=1)
    labels[0, :5] = 16
    labels[11, 3] = 0
    return labels


def test_label_maps_to_masks_exact():
    labels = band_label_map()
    neck, mouth = M.masks_from_labels(labels)
    assert neck.dtype == np.uint8 and set(np.unique(neck)) == {0, 255}
    expected_neck = np.where((labels != 0) & (labels != 16), 255, 0)
    expected_mouth = np.where(labels == 11, 255, 0)
    np.testing.assert_array_equal(neck, expected_neck)
    np.testing.assert_array_equal(mouth, expected_mouth)
    # hair (17), hat (18), neck (14), necklace (15) are in the head mask; cloth (16) is not; lips not in mouth
    assert neck[17].all() and neck[18].all() and neck[14].all() and neck[15].all() and not neck[16].any()
    assert not mouth[12].any() and not mouth[13].any()
    # configurable sets
    face_only = M.parse_label_set("skin,l_brow,r_brow,l_eye,r_eye,nose,mouth,u_lip,l_lip")
    neck2, mouth2 = M.masks_from_labels(labels, neckhead_labels=face_only, mouth_labels=M.parse_label_set("11,12,13"))
    np.testing.assert_array_equal(neck2, np.where(np.isin(labels, face_only), 255, 0))
    np.testing.assert_array_equal(mouth2, np.where(np.isin(labels, [11, 12, 13]), 255, 0))


def test_label_sets():
    assert M.parse_label_set("all,-background,-cloth") == M.NECKHEAD_LABELS
    assert M.parse_label_set("mouth") == (11,)
    assert M.parse_label_set(["hair", 1, "18"]) == (1, 17, 18)
    with pytest.raises(ValueError, match="unknown class 'beard'"):
        M.parse_label_set("skin,beard", option="neckhead-labels")
    with pytest.raises(ValueError, match="out of range"):
        M.parse_label_set("19")
    with pytest.raises(ValueError, match="empty"):
        M.parse_label_set("all,-all")


def test_read_label_map_formats(tmp_path):
    labels = band_label_map().astype(np.uint8)
    Image.fromarray(labels, mode="L").save(tmp_path / "grey.png")
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([c for i in range(256) for c in (i * 13 % 256, i * 7 % 256, i * 3 % 256)])
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(M.read_label_map(tmp_path / "grey.png"), labels)
    np.testing.assert_array_equal(M.read_label_map(tmp_path / "palette.png"), labels)
    colour = np.stack([labels * 10, labels, labels], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png.*colour image"):
        M.read_label_map(tmp_path / "colour.png")
    Image.fromarray(np.full((4, 4), 40, np.uint8)).save(tmp_path / "range.png")
    with pytest.raises(ValueError, match="range.png.*outside"):
        M.read_label_map(tmp_path / "range.png")


def test_read_alpha_formats(tmp_path):
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))  # [4, 16]
    Image.fromarray(ramp).save(tmp_path / "a.png")
    rgba = np.zeros((4, 16, 4), np.uint8)
    rgba[..., 3] = ramp
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "b.png")
    Image.fromarray(np.stack([ramp] * 3, -1)).save(tmp_path / "c.bmp")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "d.tif")
    for name in ("a.png", "b.png", "c.bmp", "d.tif"):
        np.testing.assert_array_equal(M.read_alpha(tmp_path / name), ramp, err_msg=name)
    labels = band_label_map()
    np.testing.assert_array_equal(M.alpha_from_labels(labels), np.where(labels != 0, 255, 0))


def _write_frames(subject, n, size):
    for k in range(1, n + 1):
        M.write_jpg(subject / "imgs" / f"{k:05d}.jpg", np.full((size, size, 3), 100, np.uint8))


def test_masks_and_alpha_from_numbered_inputs(tmp_path):
    subject = tmp_path / "data" / "s"
    _write_frames(subject, 3, 38)
    labels_dir, alpha_dir = tmp_path / "labels", tmp_path / "matting"
    labels_dir.mkdir()
    alpha_dir.mkdir()
    base = band_label_map().astype(np.uint8)  # 19 x 19, frames are 38 x 38: nearest-neighbour x2
    for i in range(3):  # zero-based numbering, as matting/parsing tools write
        Image.fromarray(base, mode="L").save(labels_dir / f"frame_{i:04d}.png")
        Image.fromarray(np.full((38, 38), 60 * i, np.uint8)).save(alpha_dir / f"{i}.png")
    counts = P.write_masks_and_alpha(subject, labels_dir=labels_dir, alpha_dir=alpha_dir, progress=False)
    assert counts == {"masks": 3, "alpha": 3, "alpha_source": "matting"}
    big = np.repeat(np.repeat(base, 2, 0), 2, 1)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(read(subject / "parsing" / f"{k:05d}_neckhead.png"),
                                      np.where((big != 0) & (big != 16), 255, 0))
        np.testing.assert_array_equal(read(subject / "parsing" / f"{k:05d}_mouth.png"), np.where(big == 11, 255, 0))
        alpha = read(subject / "alpha" / f"{k:05d}.jpg")
        assert alpha.shape == (38, 38) and abs(alpha.astype(float).mean() - 60 * (k - 1)) < 2
    # resume: nothing rewritten
    assert P.write_masks_and_alpha(subject, labels_dir=labels_dir, alpha_dir=alpha_dir,
                                   progress=False)["masks"] == 0
    # fallback alpha from parsing when there is no matting
    counts = P.write_masks_and_alpha(subject, labels_dir=labels_dir, overwrite=True, progress=False)
    assert counts["alpha_source"] == "parsing"
    alpha = read(subject / "alpha" / "00001.jpg").astype(int)
    assert np.abs(alpha - np.where(big != 0, 255, 0)).max() < 40  # JPG ringing at the edges only
    # a frame without its label map is an error naming the frame and the file number
    (labels_dir / "frame_0002.png").unlink()
    with pytest.raises(P.PrepareError, match="00003.jpg.*file number 2"):
        P.write_masks_and_alpha(subject, labels_dir=labels_dir, overwrite=True, progress=False)


@pytest.mark.video
def test_cli_prepare_end_to_end_with_check(video, tmp_path, capsys):
    path, _ = video
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    for k in range(1, N_FRAMES + 1):
        labels = np.zeros((64, 64), np.uint8)
        labels[10:50, 16:48] = 1
        labels[30:36, 26:38] = 11
        labels[50:, :] = 16
        Image.fromarray(labels).save(labels_dir / f"{k:05d}.png")
    argv = ["prepare", str(path), "--id", "s", "--out", str(tmp_path / "data"), "--size", "64", "--box",
            "0,0,96,96", "--labels-dir", str(labels_dir), "--quiet"]
    assert cli.main(argv + ["--check"]) == 1  # 24 frames < the default 500-frame test split
    assert "test split" in capsys.readouterr().out
    subject = tmp_path / "data" / "s"
    assert len(list((subject / "parsing").glob("*_neckhead.png"))) == N_FRAMES
    assert len(list((subject / "alpha").glob("*.jpg"))) == N_FRAMES
    from flashavatar import validate

    report = validate.validate_subject(tmp_path / "data", None, "s", test_frames=4)
    assert report.ok, report.format()
    # resumed with --check and a test split that fits: nothing rewritten, exit code 0
    assert cli.main(argv + ["--check", "--test-frames", "4"]) == 0
    assert "OK: training can run" in capsys.readouterr().out


def test_face_parser_shapes_on_random_weights(tmp_path):
    import torch

    from flashavatar.data.face_parsing import BiSeNet, load_face_parser, parse_faces

    torch.manual_seed(0)
    net = BiSeNet(19).eval()
    with torch.no_grad():
        main, aux16, aux32 = net(torch.randn(2, 3, 64, 96), aux=True)
    assert main.shape == aux16.shape == aux32.shape == (2, 19, 64, 96)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(torch.randn(1, 4, 64, 64))
    # checkpoints load by parameter name (DataParallel prefixes and the unused spatial path tolerated)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["sp.conv1.conv.weight"] = torch.zeros(1)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # old checkpoints
    torch.save(state, tmp_path / "parser.pth")
    loaded = load_face_parser(tmp_path / "parser.pth")
    labels = parse_faces(loaded, np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8),
                         input_size=64)
    assert labels.shape == (2, 40, 40) and labels.dtype == np.uint8 and labels.max() < 19
    # another network's checkpoint: the mismatch is listed (a small file; the real one is 53 MB)
    torch.save({"cp.resnet.conv1.weight": torch.zeros(64, 3, 3, 3), "fc.weight": torch.zeros(2, 2)},
               tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: not a BiSeNet.*missing: .*unexpected: fc.weight; "
                                         r"wrong shape: cp.resnet.conv1.weight"):
        load_face_parser(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_face_parser(tmp_path / "absent.pth")
    # through prepare: label maps for every frame, then masks from them
    subject = tmp_path / "data" / "s"
    _write_frames(subject, 2, 64)
    assert P.run_face_parser(subject, tmp_path / "parser.pth", input_size=64, progress=False) == 2
    assert P.run_face_parser(subject, tmp_path / "parser.pth", input_size=64, progress=False) == 0  # resumed
    maps = [M.read_label_map(subject / "labels" / f"{k:05d}.png") for k in (1, 2)]
    assert all(m.shape == (64, 64) for m in maps)


@pytest.mark.video
def test_synthetic_subject_video_round_trip(tmp_path):
    """Frames of the synthetic subject -> MP4 -> prepare (frames, masks from label maps, alpha) -> the
    validator passes with the subject's tracker files, and the masks equal the subject's."""
    from flashavatar import validate
    from flashavatar.model.synthetic import make_subject

    n, size = 8, 96
    paths = make_subject(tmp_path / "synth", "s", n_frames=n, size=size)
    source = paths.data_root / "s"
    frames = np.stack([read(source / "imgs" / f"{k:05d}.jpg") for k in range(1, n + 1)])
    video = encode(tmp_path / "s.mp4", frames, fps=25)
    # label maps from the subject's masks: head = skin, inner mouth = mouth, rest of the person = cloth
    labels_dir = tmp_path / "labels"
    for k in range(1, n + 1):
        head = read(source / "parsing" / f"{k:05d}_neckhead.png") > 127
        mouth = read(source / "parsing" / f"{k:05d}_mouth.png") > 127
        alpha = read(source / "alpha" / f"{k:05d}.jpg") > 127
        labels = np.where(alpha, 16, 0).astype(np.uint8)
        labels[head] = 1
        labels[mouth] = 11
        M.write_png(labels_dir / f"{k - 1:04d}.png", labels)  # zero-based, as parsing tools number them

    out = tmp_path / "prepared"
    argv = ["prepare", str(video), "--id", "s", "--out", str(out), "--size", str(size), "--box", f"0,0,{size},{size}",
            "--labels-dir", str(labels_dir), "--alpha-dir", str(source / "alpha"), "--quiet"]
    assert cli.main(argv) == 0
    prepared = out / "s"
    assert sorted(p.name for p in (prepared / "imgs").iterdir()) == [f"{k:05d}.jpg" for k in range(1, n + 1)]
    for k in range(1, n + 1):
        img = read(prepared / "imgs" / f"{k:05d}.jpg")
        assert img.shape == (size, size, 3)
        assert np.abs(img.astype(int) - frames[k - 1].astype(int)).mean() < 6  # video + JPG compression only
        for kind in ("neckhead", "mouth"):
            np.testing.assert_array_equal(read(prepared / "parsing" / f"{k:05d}_{kind}.png") > 127,
                                          read(source / "parsing" / f"{k:05d}_{kind}.png") > 127)
    report = validate.validate_subject(out, paths.tracker_root, "s", test_frames=2)
    assert report.ok and not report.warnings, report.format()
    # resuming writes nothing new
    stamps = {p: p.stat().st_mtime_ns for p in prepared.rglob("*") if p.is_file() and p.name != "prepare.json"}
    assert cli.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert set(p for p in prepared.rglob("*") if p.is_file() and p.name != "prepare.json") == set(stamps)
