"""Video I/O, the How2Sign / PHOENIX readers, the clip dataset and the moving-digits generator, on tiny files
written here in the exact on-disk formats of the real datasets."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.datamodules.moving_digits import (
    DIRECTIONS,
    MovingDigitsDataModule,
    MovingDigitsParams,
    caption,
    centre_of_mass,
    estimate_direction,
    generate_moving_digits,
    parse_caption,
    prompts_for,
    read_manifest,
)
from difflab.datamodules.sign_video import (
    ClipRecord,
    SignVideoDataModule,
    SignVideoDataset,
    read_how2sign_index,
    read_phoenix_index,
    window_indices,
)
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError
from difflab.video import io as vio

H2S_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART\tEND\tSENTENCE"
LEVEL = 12  # frame k of a test video is a flat grey image of value LEVEL * k: decoded frames identify themselves


def coded_frames(n: int, h: int = 48, w: int = 64, level: int = LEVEL) -> np.ndarray:
    """``n x h x w x 3`` uint8 frames, frame k flat grey ``level * k``."""
    return np.repeat((np.arange(n, dtype=np.uint8) * level)[:, None, None, None], h * w * 3).reshape(n, h, w, 3)


def frame_ids(x: torch.Tensor, level: int = LEVEL) -> list[int]:
    """Recover the frame numbers of a model-space clip ``C x T x H x W`` made from `coded_frames`."""
    grey = (x.float().mean(dim=(0, 2, 3)) + 1) * 127.5
    return [int(round(v / level)) for v in grey.tolist()]


def h2s_row(i: int, text: str, start="0.00", end="2.00") -> str:
    vid = f"vid{i:02d}"
    return f"{vid}\t{vid}-rgb_front\t{vid}_0\t{vid}_0-rgb_front\t{start}\t{end}\t{text}"


@pytest.fixture(scope="module")
def how2sign_dir(tmp_path_factory) -> Path:
    """How2Sign sentence-clip layout: 4 good train clips, one malformed row, one broken mp4; 3 val clips."""
    root = tmp_path_factory.mktemp("how2sign")
    for split, n in (("train", 5), ("val", 3)):
        clips = root / f"{split}_rgb_front_clips" / "raw_videos"
        rows = [H2S_HEADER]
        for i in range(n):
            rows.append(h2s_row(i, f"{split} sentence {i % 2 if split == 'val' else i}"))
            if split == "train" and i == 4:
                (clips / "vid04_0-rgb_front.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500))
            else:
                vio.write_mp4(clips / f"vid{i:02d}_0-rgb_front.mp4", coded_frames(20), fps=10)
        if split == "train":
            rows.insert(3, "vid99\tvid99-rgb_front\tonly four fields")  # malformed: line 4 of the file
        (root / f"how2sign_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def how2sign_raw_dir(tmp_path_factory) -> Path:
    """How2Sign raw-video layout with the realigned header: clips cut from one 4 s video by START/END."""
    root = tmp_path_factory.mktemp("how2sign_raw")
    vio.write_mp4(root / "val_raw_videos" / "raw_videos" / "long-rgb_front.mp4", coded_frames(40, level=6), fps=10)
    header = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE"
    rows = [
        header,
        "long\tlong-rgb_front\tlong_0\tlong_0-rgb_front\t1.0\t2.0\tfirst sentence",
        "long\tlong-rgb_front\tlong_1\tlong_1-rgb_front\t2.5\t3.5\tsecond sentence",
        "long\tlong-rgb_front\tlong_2\tlong_2-rgb_front\tabc\t3.5\tnon-numeric start",
    ]
    (root / "how2sign_realigned_val.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def phoenix_dir(tmp_path_factory) -> Path:
    """PHOENIX-2014-T layout: '|' corpus files and 210x260 PNG frames under features/fullFrame-210x260px."""
    root = tmp_path_factory.mktemp("phoenix")
    base = root / "PHOENIX-2014-T"
    ann = base / "annotations" / "manual"
    ann.mkdir(parents=True)
    samples = {"train": ["a_train", "b_train"], "dev": ["c_dev"], "test": ["d_test"]}
    for split, names in samples.items():
        lines = ["name|video|start|end|speaker|orth|translation"]
        for k, name in enumerate(names):
            lines.append(f"{name}|{name}/1/*.png|-1|-1|Signer0{k}|REGEN {k} MORGEN|morgen regen {split} {k}")
            folder = base / "features" / "fullFrame-210x260px" / split / name
            folder.mkdir(parents=True)
            for t in range(12):  # W x H = 210 x 260
                Image.fromarray(np.full((260, 210, 3), LEVEL * t, np.uint8)).save(folder / f"images{t + 1:04d}.png")
        if split == "train":
            lines.append("broken|row")
            lines.append("gone|gone/1/*.png|-1|-1|Signer01|X|frames folder does not exist")
        (ann / f"PHOENIX-2014-T.{split}.corpus.csv").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------------------------------------- video_io
def test_mp4_roundtrip_fps_and_range(tmp_path):
    frames = coded_frames(30)
    path = vio.write_mp4(tmp_path / "a.mp4", frames, fps=15)
    info = vio.probe_video(path)
    assert (info.fps, info.num_frames, info.width, info.height) == (15.0, 30, 64, 48)
    assert info.duration == pytest.approx(2.0)
    whole = vio.read_video(path)
    assert whole.shape == (30, 48, 64, 3) and whole.dtype == np.uint8
    assert np.abs(whole.astype(int) - frames).max() <= 6
    part = vio.read_video(path, 1.0, 1.4, as_tensor=True)  # frames 15..20 shown in [1.0, 1.4)
    assert isinstance(part, torch.Tensor)
    assert [int(round(v / LEVEL)) for v in part.float().mean((1, 2, 3)).tolist()] == [15, 16, 17, 18, 19, 20]
    with vio.open_video(path) as r:  # decoder-side resize
        small, times = r.frames_in_range(0.0, 0.2, size=(24, 32))
    assert small.shape == (3, 24, 32, 3) and np.allclose(times, [0.0, 1 / 15, 2 / 15])


def test_mp4_writer_grey_odd_size_and_encoder(tmp_path):
    assert vio.mp4_encoder() in ("libx264", "mpeg4")
    grey = (np.random.default_rng(0).random((5, 33, 35)) * 255).astype(np.uint8)
    out = vio.read_video(vio.write_mp4(tmp_path / "g.mp4", grey, fps=10))
    assert out.shape == (5, 34, 36, 3)  # padded to even sizes for 4:2:0
    for codec in ("mpeg4",):
        f = coded_frames(4)
        back = vio.read_video(vio.write_mp4(tmp_path / f"{codec}.mp4", f, fps=5, codec=codec))
        assert np.abs(back.astype(int) - f).max() <= 6
    with pytest.raises(TypeError, match="uint8"):
        vio.write_mp4(tmp_path / "bad.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=5)


def test_gif_and_grid(tmp_path):
    frames = coded_frames(6, 16, 20)
    path = vio.write_gif(tmp_path / "a.gif", frames, fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 6 and im.info["duration"] == 100
        im.seek(3)
        assert abs(int(np.asarray(im.convert("L")).mean()) - 3 * LEVEL) <= 2
    vids = np.stack([coded_frames(6, 16, 20) // (i + 1) for i in range(5)])
    grid = vio.video_grid(vids, nrow=2, padding=1)
    assert grid.shape == (6, 3 * 17 + 1, 2 * 21 + 1, 3)
    # video 3 sits in row 1, column 1
    assert np.array_equal(grid[:, 18:34, 22:42], vids[3])
    assert np.all(grid[:, 0] == 0)
    # float model-space input, shorter videos hold their last frame
    x = torch.rand(2, 1, 3, 8, 8) * 2 - 1
    g = vio.video_grid(x, nrow=2)
    assert g.shape == (3, 12, 22, 1)
    assert np.array_equal(g[:, 2:10, 2:10], vio.to_uint8_video(x)[0])


def test_frame_folder_reading(tmp_path):
    for t in range(5):
        Image.fromarray(np.full((26, 21, 3), 40 * t, np.uint8)).save(tmp_path / f"images{t + 1:04d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    x = vio.read_frame_folder(tmp_path, [4, 1, 1], size=(13, 10), grey=True)
    assert x.shape == (3, 13, 10, 1) and x[:, 0, 0, 0].tolist() == [160, 40, 40]


def test_torchcodec_backend_missing_is_clear(tmp_path):
    if importlib.util.find_spec("torchcodec") is not None:
        pytest.skip("torchcodec is installed")
    path = vio.write_mp4(tmp_path / "a.mp4", coded_frames(3), fps=5)
    with pytest.raises(ImportError, match="backend='pyav'"):
        vio.read_video(path, backend="torchcodec")


# ------------------------------------------------------------------------------------------------------- index + clips
def test_window_indices():
    assert window_indices(20, 4, 2.0, random=False).tolist() == [6, 8, 10, 12]  # centred: span 7, room 13
    assert window_indices(5, 4, 2.0, random=False).tolist() == [0, 2, 4, 4]  # too short: repeat the last frame
    assert window_indices(10, 4, 25 / 10, random=False).tolist() == [0, 2, 5, 7]  # fractional step (25 -> 10 fps)
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        idx = window_indices(20, 4, 2.0, random=True, generator=g)
        assert np.all(np.diff(idx) == 2) and 0 <= idx[0] and idx[-1] <= 19
        starts.add(int(idx[0]))
    assert starts == set(range(14))  # every legal start is drawn


def test_how2sign_index_skips_malformed_row(how2sign_dir, caplog):
    with caplog.at_level(logging.WARNING):
        rep = read_how2sign_index(how2sign_dir, "train")
    assert len(rep.records) == 5 and len(rep.malformed) == 1
    path, line, reason = rep.malformed[0]
    assert path.endswith("how2sign_train.csv") and line == 4 and "got 3" in reason
    assert "how2sign_train.csv:4" in caplog.text
    r = rep.records[0]
    assert (r.start, r.end, r.kind, r.split, r.text) == (None, None, "video", "train", "train sentence 0")
    assert r.source.endswith("train_rgb_front_clips/raw_videos/vid00_0-rgb_front.mp4")
    with pytest.raises(CorruptDataError, match=r"how2sign_train\.csv:4"):
        read_how2sign_index(how2sign_dir, "train", strict=True)


def test_clip_dataset_shapes_windows_and_stride(how2sign_dir):
    recs = read_how2sign_index(how2sign_dir, "train").records[:4]
    ds = SignVideoDataset(recs, num_frames=4, frame_stride=2, image_size=32, train=False)
    item = ds[1]
    assert item["text"] == "train sentence 1"
    x = item["x"]
    assert x.shape == (3, 4, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert frame_ids(x) == [6, 8, 10, 12]  # centred window of 20 frames
    # resampling 10 fps -> 5 fps is the same as stride 2; rectangular output and one channel
    ds5 = SignVideoDataset(recs, num_frames=4, target_fps=5, image_size=(16, 24), channels=1, train=False)
    y = ds5[0]["x"]
    assert y.shape == (1, 4, 16, 24) and frame_ids(y) == [6, 8, 10, 12]
    # training windows start anywhere but keep the stride
    dtr = SignVideoDataset(recs, num_frames=4, frame_stride=3, image_size=32, train=True)
    torch.manual_seed(0)
    starts = set()
    for _ in range(12):
        ids = frame_ids(dtr[0]["x"])
        assert np.diff(ids).tolist() == [3, 3, 3] and 0 <= ids[0] <= 10
        starts.add(ids[0])
    assert len(starts) > 2
    # cached decoding gives the same clips
    dc = SignVideoDataset(recs, num_frames=4, frame_stride=2, image_size=32, train=False, cache=True)
    assert torch.equal(dc[1]["x"], x) and torch.equal(dc[1]["x"], x)


def test_broken_video_skipped_and_counted(how2sign_dir, caplog):
    recs = read_how2sign_index(how2sign_dir, "train").records
    broken = recs[4].source
    ds = SignVideoDataset(recs, num_frames=4, image_size=16, train=False)
    with caplog.at_level(logging.WARNING):
        item = ds[4]  # broken: replaced by the next readable clip (wraps to clip 0)
        again = ds[4]
    assert item["text"] == again["text"] == "train sentence 0"
    assert ds.num_unreadable == 1 and ds.unreadable_files == [broken]
    warned = [r.getMessage() for r in caplog.records if "unreadable clip" in r.getMessage()]
    assert len(warned) == 1 and broken in warned[0]  # logged once per file, naming it
    strict = SignVideoDataset(recs, num_frames=4, image_size=16, strict=True)
    with pytest.raises(CorruptDataError, match="vid04_0-rgb_front.mp4"):
        strict[4]


def test_truncated_video_skipped(tmp_path):
    good = vio.write_mp4(tmp_path / "good.mp4", coded_frames(10), fps=10)
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the mp4 index (moov) is at the end: now gone
    recs = [
        ClipRecord(str(tmp_path / "cut.mp4"), None, None, "cut", "train", "video"),
        ClipRecord(str(good), None, None, "good", "train", "video"),
    ]
    ds = SignVideoDataset(recs, num_frames=2, image_size=8, train=False)
    assert ds[0]["text"] == "good" and ds.unreadable_files == [str(tmp_path / "cut.mp4")]


def test_datamodule_batches_prompts_and_counts_across_workers(how2sign_dir):
    dm = SignVideoDataModule(
        dataset="how2sign",
        data_dir=str(how2sign_dir),
        num_frames=4,
        image_size=16,
        batch_size=5,
        num_workers=1,
        persistent_workers=False,
        pin_memory=False,
        num_prompts=5,
    )
    assert dm.num_classes is None and dm.class_names is None
    assert dm.sample_shape == (3, 4, 16, 16)
    assert dm.prompts == ["val sentence 0", "val sentence 1"]  # distinct, in file order
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 1
    b = batches[0]
    assert b["x"].shape == (5, 3, 4, 16, 16) and isinstance(b["text"], list) and len(b["text"]) == 5
    assert "train sentence 4" not in b["text"]  # the broken clip's caption never appears
    report = dm.data_report()
    # the worker process flagged the broken file; the main process sees it through shared memory
    assert report["train"] == {"clips": 5, "malformed_rows": 1, "missing_files": 0, "unreadable_files": 1}
    vb = next(iter(dm.val_dataloader()))
    assert vb["x"].shape == (3, 3, 4, 16, 16)


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"how2sign_val\.csv.*how2sign\.github\.io"):
        SignVideoDataModule(dataset="how2sign", data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "how2sign_val.csv").write_text(H2S_HEADER + "\n" + h2s_row(0, "hi") + "\n")
    with pytest.raises(DataNotFoundError, match="val_rgb_front_clips/raw_videos does not exist"):
        SignVideoDataModule(dataset="how2sign", data_dir=str(tmp_path))
    (tmp_path / "val_rgb_front_clips" / "raw_videos").mkdir(parents=True)  # folder there, clip file missing
    with pytest.raises(DataNotFoundError, match="no usable clips"):
        SignVideoDataModule(dataset="how2sign", data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="vid00_0-rgb_front.mp4 is listed"):
        SignVideoDataModule(dataset="how2sign", data_dir=str(tmp_path), strict=True)
    with pytest.raises(DataNotFoundError, match=r"PHOENIX-2014-T/annotations/manual.*RWTH-PHOENIX-2014-T"):
        SignVideoDataModule(dataset="phoenix", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="dataset"):
        SignVideoDataModule(dataset="bobsl", data_dir=str(tmp_path))


def test_how2sign_raw_layout_realigned(how2sign_raw_dir, caplog):
    with caplog.at_level(logging.WARNING):
        rep = read_how2sign_index(how2sign_raw_dir, "val", layout="raw")
    assert [(r.start, r.end) for r in rep.records] == [(1.0, 2.0), (2.5, 3.5)]
    assert len(rep.malformed) == 1 and "non-numeric" in rep.malformed[0][2] and rep.malformed[0][1] == 4
    assert all(r.source.endswith("val_raw_videos/raw_videos/long-rgb_front.mp4") for r in rep.records)
    ds = SignVideoDataset(rep.records, num_frames=4, image_size=16, train=False)
    # [1.0, 2.0) at 10 fps = frames 10..19, centred 4 -> 13..16; [2.5, 3.5) -> 25..34, centred -> 28..31
    assert frame_ids(ds[0]["x"], level=6) == [13, 14, 15, 16]
    assert frame_ids(ds[1]["x"], level=6) == [28, 29, 30, 31]
    assert ds[1]["text"] == "second sentence"
    dtr = SignVideoDataset(rep.records, num_frames=4, frame_stride=2, image_size=16, train=True)
    for _ in range(8):  # random windows stay inside [START, END)
        ids = frame_ids(dtr[0]["x"], level=6)
        assert 10 <= ids[0] and ids[-1] <= 19 and np.diff(ids).tolist() == [2, 2, 2]


def test_phoenix_index_and_clips(phoenix_dir):
    rep = read_phoenix_index(phoenix_dir, "train")
    assert [r.text for r in rep.records] == ["morgen regen train 0", "morgen regen train 1"]
    assert len(rep.malformed) == 1 and len(rep.missing) == 1 and rep.missing[0].endswith("train/gone")
    r = rep.records[0]
    assert r.kind == "frames" and r.fps == 25.0 and r.source.endswith("fullFrame-210x260px/train/a_train")
    gloss = read_phoenix_index(phoenix_dir / "PHOENIX-2014-T", "train", text_field="orth")
    assert gloss.records[1].text == "REGEN 1 MORGEN"
    ds = SignVideoDataset(rep.records, num_frames=3, target_fps=12.5, image_size=32, train=False)
    x = ds[0]["x"]
    assert x.shape == (3, 3, 32, 32) and frame_ids(x) == [3, 5, 7]  # 12 frames, step 2, centred
    dm = SignVideoDataModule(
        dataset="phoenix",
        data_dir=str(phoenix_dir),
        num_frames=3,
        image_size=24,
        text_field="orth",
        batch_size=2,
        num_workers=0,
    )
    assert dm.prompts == ["REGEN 0 MORGEN"]  # from the dev split
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["x"].shape == (2, 3, 3, 24, 24) and sorted(b["text"]) == ["REGEN 0 MORGEN", "REGEN 1 MORGEN"]
    assert dm.data_report()["train"]["missing_files"] == 1
    with pytest.raises(CorruptDataError, match=r"PHOENIX-2014-T\.train\.corpus\.csv:4"):
        read_phoenix_index(phoenix_dir, "train", strict=True)


# ------------------------------------------------------------------------------------------------------ moving digits
def test_captions_roundtrip():
    assert caption(3, "left") == "the digit three moving left"
    assert parse_caption("The digit three moving left") == (3, "left")
    assert parse_caption("a photo of a cat") is None
    assert prompts_for([(0, "up"), [9, "down"]]) == ["the digit zero moving up", "the digit nine moving down"]
    with pytest.raises(ValueError):
        caption(10, "left")


SMALL = dict(num_train=40, num_val=8, num_test=4, canvas_size=24, digit_size=10, num_frames=6, fps=6.0)


def test_moving_digits_how2sign_layout_and_motion(tmp_path):
    root = tmp_path / "md"
    params = MovingDigitsParams(**SMALL)
    generate_moving_digits(root, params)
    for split, n in (("train", 40), ("val", 8), ("test", 4)):
        lines = (root / f"how2sign_{split}.csv").read_text().splitlines()
        assert lines[0] == H2S_HEADER and len(lines) == n + 1
        assert len(list((root / f"{split}_rgb_front_clips" / "raw_videos").glob("*.mp4"))) == n
    manifest = read_manifest(root)
    assert len(manifest["clips"]) == 52 and manifest["params"]["canvas_size"] == 24
    train_dirs = {c["direction"] for c in manifest["clips"] if c["split"] == "train"}
    assert train_dirs == set(DIRECTIONS)
    # every val clip, read back through the How2Sign reader, moves the way its caption says
    rep = read_how2sign_index(root, "val")
    truth = {c["name"]: c for c in manifest["clips"]}
    ds = SignVideoDataset(rep.records, num_frames=6, image_size=24, channels=1, train=False)
    for i, rec in enumerate(rep.records):
        item = ds[i]
        digit, direction = parse_caption(item["text"])
        gt = truth[Path(rec.source).stem]
        assert (digit, direction) == (gt["digit"], gt["direction"])
        com = centre_of_mass(item["x"])
        axis, sign = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}[direction]
        steps = np.diff(com[:, axis]) * sign
        assert np.all(steps > 1.0), (rec.source, com)  # 14 px in 5 steps along the caption's axis
        assert np.ptp(com[:, 1 - axis]) < 1.0  # and still across it
        assert estimate_direction(item["x"]) == direction


def test_moving_digits_regenerates_only_on_change(tmp_path):
    root = tmp_path / "md"
    p = MovingDigitsParams(**{**SMALL, "num_train": 4, "num_val": 2, "num_test": 2})
    generate_moving_digits(root, p)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    generate_moving_digits(root, p)
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    generate_moving_digits(root, MovingDigitsParams(**{**SMALL, "num_train": 6, "num_val": 2, "num_test": 2}))
    assert len(read_manifest(root)["clips"]) == 10
    assert len((root / "how2sign_train.csv").read_text().splitlines()) == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.txt").write_text("do not delete")
    with pytest.raises(ConfigError, match="not a moving-digits folder"):
        generate_moving_digits(other, p)
    assert (other / "thesis.txt").exists()


def test_moving_digits_datamodule(tmp_path):
    dm = MovingDigitsDataModule(
        data_dir=str(tmp_path / "md"), **SMALL, batch_size=8, prompt_pairs=[[3, "left"], [7, "up"]]
    )
    assert dm.prompts == ["the digit three moving left", "the digit seven moving up"]
    assert dm.sample_shape == (1, 6, 24, 24)
    dm.prepare_data()
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["x"].shape == (8, 1, 6, 24, 24) and len(b["text"]) == 8
    assert b["x"].min() >= -1 and b["x"].max() <= 1 and b["x"].max() > 0.5 and b["x"].min() == -1
    assert all(parse_caption(t) is not None for t in b["text"])
    assert len(dm.ground_truth()) == 52


def test_configs_compose_and_match_constructors(how2sign_dir, tmp_path):
    import inspect

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from difflab.datamodules import moving_digits, sign_video

    cfg_dir = Path(__file__).resolve().parents[1] / "configs" / "datamodule"
    targets = {
        "sign_video": sign_video.SignVideoDataModule,
        "how2sign": sign_video.SignVideoDataModule,
        "phoenix": sign_video.SignVideoDataModule,
        "moving_digits": moving_digits.MovingDigitsDataModule,
    }
    with initialize_config_dir(config_dir=str(cfg_dir), version_base="1.3"):
        for name, cls in targets.items():
            cfg = compose(config_name=name)
            OmegaConf.set_struct(cfg, False)
            cfg = OmegaConf.merge(cfg, {"paths": {"data_dir": str(tmp_path)}})
            params = set(inspect.signature(cls.__init__).parameters) - {"self"}
            keys = set(cfg.keys()) - {"_target_", "paths"}
            assert keys <= params, (name, keys - params)
            assert cfg._target_.rsplit(".", 1)[1] == cls.__name__
            assert str(tmp_path) in cfg.data_dir
        cfg = compose(config_name="how2sign")
    from hydra.utils import instantiate

    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, {"data_dir": str(how2sign_dir), "num_workers": 0})
    dm = instantiate(cfg)
    assert dm.sample_shape == (3, 16, 64, 64) and dm.prompts == ["val sentence 0", "val sentence 1"]
