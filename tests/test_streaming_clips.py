"""Clip shards (issue 18): `prepare_clips.py` writes a video datamodule's clips as litdata shards,
`datamodule=clips_stream` reads them back as the video datamodules' batches with the latent reader's loader (seeded
order, ranks without overlap, mid-epoch resume), a training run uses them, and foreign shard directories fail in one
line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError
from difflab.utils.extras import is_installed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not is_installed("litdata"), reason="litdata (difflab[stream]) not installed")

# the moving_digits_t2v experiment's geometry (16x16 canvas, 8 frames at 8 fps), few clips
MD = dict(num_train=40, num_val=6, num_test=4, canvas_size=16, digit_size=8, num_frames=8, fps=8.0)
PER_SHARD = 8
TINY_UNET = [
    "model.net.base_channels=8",
    "model.net.channel_mults=[1,2]",
    "model.net.num_res_blocks=1",
    "model.net.attention_levels=[1]",
    "model.net.temporal_attention_levels=[0,1]",
    "model.net.cross_attention_levels=[1]",
    "model.net.num_transformer_blocks=1",
    "model.net.transformer_head_dim=8",
    "model.net.head_dim=8",
    "model.net.groups=4",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _cli(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, shard dir): `prepare_clips.py datamodule=moving_digits` on 40/6 clips, 8 per shard."""
    root = tmp_path_factory.mktemp("clips")
    data, out = root / "md", root / "shards"
    md = [f"datamodule.{k}={v}" for k, v in MD.items()]
    r = _cli(
        "prepare_clips.py",
        [
            "datamodule=moving_digits",
            f"datamodule.data_dir={data}",
            *md,
            f"out_dir={out}",
            f"shard_samples={PER_SHARD}",
            "progress=false",
            f"hydra.run.dir={root / 'run'}",
        ],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"clip shards {out}: complete (train=40, val=6" in r.stdout
    return data, out


def source(data: Path):
    from difflab.datamodules.moving_digits import MovingDigitsDataModule

    dm = MovingDigitsDataModule(data_dir=str(data), **MD, batch_size=4)
    dm.setup("fit")
    return dm


def clip_dm(path, **kw):
    from difflab.datamodules.streaming_clips import StreamingClipDataModule

    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    kw.setdefault("return_index", True)
    return StreamingClipDataModule(str(path), **kw)


def flat(loader) -> list[int]:
    return [i for b in loader for i in b["index"].tolist()]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- writing / reading
def test_shards_hold_the_datamodule_clips(prepared):
    from difflab.datamodules.streaming_clips import clip_frames

    data, path = prepared
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "difflab-clip-shards" and m["version"] == 1 and m["status"] == "complete"
    assert m["shards"]["format"] == "difflab-clip-shards" and m["shards"]["samples_per_shard"] == PER_SHARD
    assert m["video_layout"] == "THWC" and m["sample_shape"] == [1, 8, 16, 16] and m["fps"] == 8.0
    assert m["frames"] == 8 and m["dataset"]["target"].endswith("MovingDigitsDataModule")
    assert m["dataset"]["args"]["canvas_size"] == 16 and "data_dir" not in m["dataset"]["args"]
    assert sorted(p.name for p in (path / "train").glob("chunk-*.bin")) == [f"chunk-{i}-0.bin" for i in range(5)]

    src = source(data)
    dm = clip_dm(path, drop_last=False)
    assert dm.sample_shape == src.sample_shape == (1, 8, 16, 16) and dm.num_frames == 8 and dm.fps == 8.0
    assert dm.prompts == src.prompts and dm.num_classes is None and dm.class_names is None
    for split in ("train", "val"):
        ref = src.split_dataset(split)
        stream = dm.dataset(split, train=False)
        n = len(ref)
        assert len(stream) == n
        records = [stream[k] for k in range(n)]
        assert sorted(r["index"] for r in records) == list(range(n))  # every clip once
        for r in records:
            want = ref[r["index"]]
            assert r["video"].dtype == np.uint8 and r["video"].shape == (8, 16, 16, 1)
            assert np.array_equal(r["video"], clip_frames(want["x"][None])[0])  # the same 8-bit frames
            assert r["text"] == want["text"]
        batches = list(dm.loader(split, train=False))
        x, idx = torch.cat([b["x"] for b in batches]), torch.cat([b["index"] for b in batches])
        assert set(batches[0]) == {"x", "text", "index"} and x.dtype == torch.float32
        assert torch.equal(x, torch.stack([ref[i]["x"] for i in idx.tolist()]))  # the batches, bit for bit
        assert [t for b in batches for t in b["text"]] == [ref[i]["text"] for i in idx.tolist()]
    # the write order is a seeded permutation, not the source order
    val = flat(dm.val_dataloader())
    assert val != sorted(val) and val == flat(dm.val_dataloader())


def test_order_is_seeded_and_partitions_across_ranks(prepared, monkeypatch):
    _, path = prepared
    a = clip_dm(path, seed=1).train_dataloader()
    a1, a2 = flat(a), flat(a)
    assert flat(clip_dm(path, seed=1).train_dataloader()) == a1  # the same seed: the same order
    assert a1 != a2 and sorted(a1) == sorted(a2) == list(range(40))  # a new order every epoch, every clip once
    assert flat(clip_dm(path, seed=2).train_dataloader()) != a1
    seen = {}
    for rank in (0, 1):  # DDP through litdata's own rank variables
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        batches = list(clip_dm(path, seed=1).train_dataloader())
        assert batches and all(len(b["text"]) == 4 for b in batches)
        seen[rank] = flat(batches)
        assert seen[rank] == flat(clip_dm(path, seed=1).train_dataloader())  # deterministic per rank
    assert len(seen[0]) == len(seen[1]) and not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) >= 40 - 2 * 4


def test_loader_resumes_mid_epoch(prepared):
    _, path = prepared
    want = flat(clip_dm(path, seed=3).train_dataloader())
    loader = clip_dm(path, seed=3).train_dataloader()
    it = iter(loader)
    head = [i for _ in range(3) for i in next(it)["index"].tolist()]
    state = loader.state_dict()
    del it
    other = clip_dm(path, seed=3).train_dataloader()
    other.load_state_dict(state)
    assert head + flat(other) == want


def test_interrupted_preparation_resumes_to_the_same_shards(prepared, tmp_path, monkeypatch):
    import difflab.storage.litdata_shards as sh
    from difflab.datamodules.streaming_clips import prepare_clip_shards
    from difflab.latents.encode import describe_datamodule

    data, ref = prepared
    dataset = json.loads((ref / "manifest.json").read_text())["dataset"]
    real, calls = sh.write_shard, {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            (args[0] / "chunk-2-0.bin").write_bytes(b"partial")
            raise RuntimeError("killed")
        return real(*args, **kw)

    out = tmp_path / "s"
    monkeypatch.setattr(sh, "write_shard", failing)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_clip_shards(source(data), out, dataset=dataset, samples_per_shard=PER_SHARD, progress=False)
    with pytest.raises(ConfigError) as e:
        clip_dm(out)
    assert "incomplete" in _one_line(e)
    monkeypatch.undo()
    m = prepare_clip_shards(source(data), out, dataset=dataset, samples_per_shard=PER_SHARD, progress=False)
    assert m["status"] == "complete"
    for split in ("train", "val"):
        for f in sorted((ref / split).glob("chunk-*.bin")):
            assert (out / split / f.name).read_bytes() == f.read_bytes()
    with pytest.raises(ConfigError) as e:  # other settings are refused, not mixed in
        prepare_clip_shards(
            source(data),
            out,
            dataset={**dataset, "args": {**dataset["args"], "seed": 5}},
            samples_per_shard=PER_SHARD,
            progress=False,
        )
    assert "another dataset" in _one_line(e)
    assert describe_datamodule(source(data))["target"] == dataset["target"]


# ---------------------------------------------------------------------------------------------- bad input
def test_foreign_or_mismatched_shards_fail_in_one_line(prepared, tmp_path):
    _, path = prepared

    def edited(name, edit, file="manifest.json"):
        bad = tmp_path / name
        shutil.copytree(path, bad)
        f = bad / file
        data = json.loads(f.read_text())
        edit(data)
        f.write_text(json.dumps(data))
        return bad

    with pytest.raises(DataNotFoundError) as e:
        clip_dm(tmp_path / "nothing")
    assert "prepare_clips.py" in _one_line(e)
    for bad, kind, words in [
        (edited("v2", lambda m: m.update(version=2)), CorruptDataError, "version 2"),
        (edited("shards_v9", lambda m: m["shards"].update(version=9)), CorruptDataError, "version 9"),
        (edited("latent", lambda m: m.update(format="difflab-latent-cache")), ConfigError, "latents_stream"),
        (edited("other", lambda m: m.update(format="something-else")), CorruptDataError, "not a difflab clip"),
        (edited("count", lambda m: m["splits"]["val"].update(count=7)), CorruptDataError, "records 7"),
        (edited("partial", lambda m: m.update(status="in_progress")), ConfigError, "incomplete"),
    ]:
        with pytest.raises(kind) as e:
            clip_dm(bad)
        assert words in _one_line(e), (bad, str(e.value))
    # the latent reader refuses clip shards in one line too
    from difflab.datamodules.streaming_latents import StreamingLatentDataModule

    with pytest.raises(ConfigError) as e:
        StreamingLatentDataModule(str(path))
    assert "datamodule=clips_stream" in _one_line(e)
    # an experiment's source settings are checked against the ones the shards were prepared with
    assert clip_dm(path, num_frames=8, canvas_size=16, fps=8, data_dir="elsewhere").num_frames == 8
    with pytest.raises(ConfigError) as e:
        clip_dm(path, num_frames=4)
    assert "num_frames=4" in _one_line(e) and "num_frames=8" in str(e.value)
    with pytest.raises(ConfigError) as e:
        clip_dm(path, image_sise=16)
    assert "~datamodule.image_sise" in _one_line(e)


# ---------------------------------------------------------------------------------------------- training
def test_train_moving_digits_t2v_on_clip_shards(prepared, tmp_path):
    _, path = prepared
    run = tmp_path / "run"
    common = [
        "experiment=moving_digits_t2v",
        "datamodule=clips_stream",
        "datamodule.batch_size=4",
        "datamodule.num_workers=0",
        "datamodule.pin_memory=false",
        "trainer=cpu",
        "trainer.max_steps=3",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.progress_bar",
        "logger=none",
        "sampler.steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.video_grid.every_n_steps=2",
        "callbacks.video_grid.n_cols=2",
        "callbacks.video_grid.max_prompts=2",
        *TINY_UNET,
        f"hydra.run.dir={run}",
    ]
    r = _cli("train.py", [f"datamodule.cache_dir={path}", *common])
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["step"] == 3
    assert np.isfinite(final["metrics"]["train/loss"])
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # shards of another format version stop train.py with one line
    bad = tmp_path / "v2"
    shutil.copytree(path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["version"] = 2
    (bad / "manifest.json").write_text(json.dumps(m))
    r = _cli("train.py", [f"datamodule.cache_dir={bad}", *common[:-1], f"hydra.run.dir={tmp_path / 'run2'}"])
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "version 2" in errors[0] and "prepare_clips.py" in errors[0], r.stderr[-2000:]
