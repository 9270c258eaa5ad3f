"""Sharded latents (issue 18): writing litdata shards from a latent cache or through ``encode_latents.py
format=shards``, reading them back with ``datamodule=latents_stream``: the same samples as the memory-mapped cache, a
seeded order that changes every epoch, ranks x workers without overlap, exact mid-epoch resume (in the loader and
through Lightning checkpoints), and one-line errors for foreign shard directories."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from difflab.latents.cache import (
    LABELS,
    LATENTS,
    MANIFEST,
    STATUS_COMPLETE,
    TEXTS,
    channel_moments,
    new_manifest,
    normalisation,
    read_manifest,
    split_dir,
    write_manifest,
)
from difflab.utils.errors import ConfigError, CorruptDataError, DataNotFoundError
from difflab.utils.extras import is_installed

ROOT = Path(__file__).resolve().parents[1]
needs_litdata = pytest.mark.skipif(not is_installed("litdata"), reason="litdata (difflab[stream]) not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic_cache(out: Path, n_train: int = 600, n_val: int = 90, text: bool = True, seed: int = 0) -> Path:
    """A complete memory-mapped latent cache of random 4x4x4 float16 latents, labels (and prompts)."""
    m = new_manifest(
        {"class": "tests.synthetic", "config": {}, "hash": "ab" * 32, "spec": None},
        {"target": "tests.synthetic", "args": {"seed": seed}},
        "float16",
        64,
    )
    m.update(latent_shape=[4, 4, 4], pixel_shape=[1, 16, 16], num_classes=3, class_names=["a", "b", "c"], prompts=None)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        d = split_dir(out, split)
        d.mkdir(parents=True)
        z = rng.standard_normal((n, 4, 4, 4)) * np.array([1, 2, 3, 4])[:, None, None] + 1
        np.save(d / LATENTS, z.astype(np.float16))
        np.save(d / LABELS, rng.integers(0, 3, n).astype(np.int64))
        if text:
            (d / TEXTS).write_text(json.dumps([f"{split} prompt {i}" for i in range(n)]))
        m["splits"][split] = {"count": n, "done": n, "has_label": True, "has_text": text}
        m["count"][split] = n
    mean, var, _ = channel_moments(np.load(split_dir(out, "train") / LATENTS))
    m["transform"] = normalisation(mean, var, 0.5)
    m["status"] = STATUS_COMPLETE
    write_manifest(out, m)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(cache, shards): 600 train / 90 val samples, 128 per shard (5 train shards, the last one partial)."""
    from difflab.latents.shards import cache_to_shards

    root = tmp_path_factory.mktemp("stream")
    cache = synthetic_cache(root / "cache")
    cache_to_shards(cache, root / "shards", samples_per_shard=128)
    return cache, root / "shards"


def dm_for(path, **kw):
    from difflab.datamodules.streaming_latents import StreamingLatentDataModule

    kw.setdefault("batch_size", 16)
    kw.setdefault("return_index", True)
    return StreamingLatentDataModule(str(path), **kw)


def rows(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def flat(batches) -> list[int]:
    return [i for b in rows(batches) for i in b]


# ---------------------------------------------------------------------------------------------- writing / reading
@needs_litdata
def test_shards_hold_the_cache_samples(shards):
    from difflab.datamodules.latents import LatentDataModule

    cache, path = shards
    m, cm = read_manifest(path), read_manifest(cache)
    assert m["layout"] == "shards" and m["status"] == "complete"
    assert m["shards"]["format"] == "difflab-latent-shards" and m["shards"]["version"] == 1
    assert m["shards"]["library"] == "litdata" and m["shards"]["samples_per_shard"] == 128
    assert m["transform"] == cm["transform"] and m["autoencoder"] == cm["autoencoder"]
    assert m["latent_shape"] == [4, 4, 4] and m["splits"]["train"]["count"] == 600
    assert sorted(p.name for p in (path / "train").glob("chunk-*.bin")) == [f"chunk-{i}-0.bin" for i in range(5)]

    dm = dm_for(path, drop_last=False)
    assert dm.sample_shape == (4, 4, 4) and dm.pixel_shape == (1, 16, 16) and dm.num_classes == 3
    assert torch.equal(dm.latent_scale, torch.tensor(cm["transform"]["scale"], dtype=torch.float32))
    ref = {s: LatentDataModule(str(cache)).dataset(s) for s in ("train", "val")}
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        batches = list(loader)
        n = len(ref[split])
        assert len(batches) == len(loader) == -(-n // 16)
        b = batches[0]
        assert set(b) == {"x", "label", "text", "index"} and b["x"].dtype == torch.float32
        idx = torch.cat([b["index"] for b in batches])
        assert sorted(idx.tolist()) == list(range(n))  # every sample once
        want = ref[split].__getitems__(list(range(n)))
        got_x = torch.cat([b["x"] for b in batches])
        assert torch.equal(got_x, want["x"][idx])  # same normalised latents, bit for bit
        assert torch.equal(torch.cat([b["label"] for b in batches]), want["label"][idx])
        assert [t for b in batches for t in b["text"]] == [want["text"][i] for i in idx.tolist()]
        # the multiset of (latent, label) pairs is the cache's
        pairs = sorted((x.numpy().tobytes(), int(y)) for x, y in zip(got_x, torch.cat([b["label"] for b in batches])))
        assert pairs == sorted((x.numpy().tobytes(), int(y)) for x, y in zip(want["x"], want["label"]))
    # the write order is a seeded permutation: shards are random subsets, not runs of the source order
    val = flat(dm.val_dataloader())
    assert val != sorted(val) and val == flat(dm.val_dataloader())


@needs_litdata
def test_order_is_seeded_and_changes_every_epoch(shards):
    _, path = shards
    a = dm_for(path, seed=1).train_dataloader()
    a1, a2 = flat(a), flat(a)
    b = dm_for(path, seed=1).train_dataloader()
    assert flat(b) == a1 and flat(b) == a2  # the same seed: the same two epochs
    assert a1 != a2 and len(set(a1)) == len(a1) == len(set(a2)) == 592  # 600 // 16 full batches (drop_last)
    assert flat(dm_for(path, seed=2).train_dataloader()) != a1


@needs_litdata
def test_two_ranks_two_workers_partition_the_data(shards, monkeypatch):
    """DDP is simulated through litdata's own rank variables (WORLD_SIZE / GLOBAL_RANK)."""
    _, path = shards
    seen, lengths = {}, {}
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        loader = dm_for(path, num_workers=2, seed=3).train_dataloader()
        batches = rows(loader)
        assert all(len(b) == 16 for b in batches)  # DDP: equal full batches on every rank
        lengths[rank] = (len(loader), len(batches))
        seen[rank] = [i for b in batches for i in b]
        assert len(set(seen[rank])) == len(seen[rank])
        val = flat(dm_for(path, num_workers=2).val_dataloader())
        seen[f"val{rank}"] = val
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1] >= 17
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) >= 600 - 2 * 2 * 16  # at most a batch per rank and worker dropped
    assert not set(seen["val0"]) & set(seen["val1"])
    monkeypatch.setenv("GLOBAL_RANK", "0")  # deterministic across the workers' processes
    assert flat(dm_for(path, num_workers=2, seed=3).train_dataloader()) == seen[0]


@needs_litdata
@pytest.mark.parametrize("workers,world", [(0, 1), (2, 1), (2, 2)])
def test_resume_mid_epoch_continues_the_order(shards, tmp_path, monkeypatch, workers, world):
    """Mid-epoch and end-of-epoch states; with 2 (simulated) ranks rank 1 resumes from rank 0's state, as every rank
    does from a Lightning checkpoint (written by rank 0)."""
    _, path = shards
    monkeypatch.setenv("WORLD_SIZE", str(world))
    rank = world - 1
    monkeypatch.setenv("GLOBAL_RANK", str(rank))
    ref = dm_for(path, num_workers=workers).train_dataloader()
    want = rows(ref) + rows(ref)  # two epochs of this rank
    monkeypatch.setenv("GLOBAL_RANK", "0")
    loader = dm_for(path, num_workers=workers).train_dataloader()
    it = iter(loader)
    for _ in range(7):
        next(it)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)  # what Lightning's checkpoint holds, loaded as the checkpoint IO does
    del it, loader
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    moved = tmp_path / "moved"  # e.g. copied to node-local disk between the runs
    shutil.copytree(path, moved)
    monkeypatch.setenv("GLOBAL_RANK", str(rank))
    resumed = dm_for(moved, num_workers=workers).train_dataloader()
    resumed.load_state_dict(state)
    got = want[:7] + rows(resumed)
    assert got == want[: len(want) // 2]  # the rest of the interrupted epoch
    got += rows(resumed)
    assert got == want  # and the next epoch
    if world == 1:  # a state saved at the end of an epoch resumes with the next epoch
        end = dm_for(path, num_workers=workers).train_dataloader()
        rows(end)
        again = dm_for(path, num_workers=workers).train_dataloader()
        again.load_state_dict(end.state_dict())
        assert rows(again) == want[len(want) // 2 :]


@needs_litdata
def test_persistent_workers_do_not_replay_an_epoch_after_a_partial_one(shards):
    _, path = shards
    ref = dm_for(path, num_workers=2).train_dataloader()
    ref1, ref2 = flat(ref), flat(ref)
    loader = dm_for(path, num_workers=2, persistent_workers=True).train_dataloader()
    for i, _ in enumerate(loader):  # an epoch cut short (limit_train_batches, max_steps)
        if i == 2:
            break
    second = []
    for b in loader:
        second += b["index"].tolist()
        if len(second) == 160:
            break
    loader.close()
    assert second == ref2[:160] != ref1[:160]


@needs_litdata
def test_flip_is_deterministic_and_resumable(shards):
    cache, path = shards
    plain, flipped = dm_for(path, shuffle=False), dm_for(path, shuffle=False, flip=True)
    a, b = list(plain.train_dataloader()), list(flipped.train_dataloader())
    x, y = torch.cat([t["x"] for t in a]), torch.cat([t["x"] for t in b])
    same, mirrored = (x == y).flatten(1).all(1), (x.flip(-1) == y).flatten(1).all(1)
    assert torch.all(same | mirrored) and (mirrored & ~same).sum() > 100
    loader = flipped.train_dataloader()
    e1, e2 = torch.cat([t["x"] for t in loader]), torch.cat([t["x"] for t in loader])
    assert not torch.equal(e1, e2)  # other flips next epoch (same order: shuffle=False)
    assert torch.equal(torch.cat([t["x"] for t in flipped.train_dataloader()]), e1)
    assert torch.equal(
        torch.cat([t["x"] for t in flipped.val_dataloader()]), torch.cat([t["x"] for t in plain.val_dataloader()])
    )  # val is never flipped


# ---------------------------------------------------------------------------------------------- bad input
def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@needs_litdata
def test_foreign_shard_directories_fail_in_one_line(shards, tmp_path):
    from difflab.datamodules.latents import LatentDataModule

    cache, path = shards
    with pytest.raises(DataNotFoundError) as e:
        dm_for(tmp_path / "nothing")
    assert "format=shards" in _one_line(e)

    def edited(name, edit, file=MANIFEST):
        bad = tmp_path / name
        shutil.copytree(path, bad)
        f = bad / file
        data = json.loads(f.read_text())
        edit(data)
        f.write_text(json.dumps(data))
        return bad

    for bad, kind, words in [
        (edited("v0", lambda m: m.update(version=0)), CorruptDataError, "version 0"),
        (edited("shards_v9", lambda m: m["shards"].update(version=9)), CorruptDataError, "version 9"),
        (
            edited("other_index", lambda i: i["chunks"].pop(), file="train/index.json"),
            CorruptDataError,
            "lists 512 samples",
        ),
        (edited("other_manifest", lambda m: m["splits"]["val"].update(count=91)), CorruptDataError, "records 91"),
        (edited("texts", lambda m: m["splits"]["val"].update(has_text=False)), CorruptDataError, "records"),
        (edited("partial", lambda m: m.update(status="in_progress")), ConfigError, "incomplete"),
        (cache, ConfigError, "datamodule=latents"),
    ]:
        with pytest.raises(kind) as e:
            dm_for(bad)
        assert words in _one_line(e), (bad, str(e.value))
    with pytest.raises(ConfigError) as e:
        LatentDataModule(str(path))
    assert "latents_stream" in _one_line(e)


@needs_litdata
def test_resume_on_other_shards_is_refused_in_one_line(shards, tmp_path):
    from difflab.latents.shards import cache_to_shards

    cache, path = shards
    loader = dm_for(path).train_dataloader()
    next(iter(loader))
    state = loader.state_dict()
    other = cache_to_shards(cache, tmp_path / "other", samples_per_shard=100)
    assert other["shards"]["samples_per_shard"] == 100
    with pytest.raises(ConfigError) as e:
        dm_for(tmp_path / "other").train_dataloader().load_state_dict(state)
    assert "init_from" in _one_line(e)


def test_missing_litdata_names_the_extra(monkeypatch):
    import difflab.datamodules.streaming_latents as sl
    from difflab.storage.location import require_litdata

    monkeypatch.setitem(sys.modules, "litdata", None)  # import litdata -> ImportError
    with pytest.raises(ConfigError) as e:
        require_litdata("encode_latents.py format=shards")
    assert "pip install 'difflab[stream]'" in _one_line(e)
    monkeypatch.setattr(sl, "HAVE_LITDATA", False)
    with pytest.raises(ConfigError) as e:
        sl.StreamingLatentDataModule("/nowhere")
    assert "pip install 'difflab[stream]'" in _one_line(e)


# ---------------------------------------------------------------------------------------------- resumable writing
@needs_litdata
def test_interrupted_shard_writing_resumes_to_the_same_shards(shards, tmp_path, monkeypatch):
    import difflab.latents.shards as sh
    import difflab.storage.litdata_shards as storage_shards

    cache, ref = shards
    real, calls = storage_shards.write_shard, {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            # a shard whose files are half written when the process dies
            (args[0] / "chunk-2-0.bin").write_bytes(b"partial")
            raise RuntimeError("killed")
        return real(*args, **kw)

    monkeypatch.setattr(storage_shards, "write_shard", failing)
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="killed"):
        sh.cache_to_shards(cache, out, samples_per_shard=128)
    partial = read_manifest(out)
    assert partial["status"] == "in_progress" and partial["splits"]["train"]["done"] == 256
    with pytest.raises(ConfigError, match="incomplete"):
        dm_for(out)
    monkeypatch.undo()
    done = sh.cache_to_shards(cache, out, samples_per_shard=128)
    assert done["status"] == "complete"
    for split in ("train", "val"):
        for f in sorted((ref / split).glob("chunk-*.bin")):
            assert (out / split / f.name).read_bytes() == f.read_bytes()
        assert (
            json.loads((out / split / "index.json").read_text())["chunks"]
            == json.loads((ref / split / "index.json").read_text())["chunks"]
        )
    with pytest.raises(ConfigError, match="samples per shard"):
        sh.cache_to_shards(cache, out, samples_per_shard=64)
    # killed while merging the shard indexes (litdata removes each shard's index as it merges): the split is redone
    m = read_manifest(out)
    m["status"] = "in_progress"
    write_manifest(out, m)
    (out / "val" / "index.json").unlink()
    assert not (out / "val" / "0.index.json").exists()
    assert sh.cache_to_shards(cache, out, samples_per_shard=128)["status"] == "complete"
    assert (
        json.loads((out / "val" / "index.json").read_text())["chunks"]
        == json.loads((ref / "val" / "index.json").read_text())["chunks"]
    )


@needs_litdata
def test_encode_dataset_shards_match_the_cache(tmp_path):
    """The encoder's shard path (text prompts, several shards) stores what encode_dataset stores."""
    from difflab.latents import encode_dataset, encode_dataset_shards
    from tests.test_latents import TinyDM, tiny_vae

    # batch 4 divides both splits (40, 12): every latent is encoded in a batch of the same size in both layouts (CPU
    # kernels round differently with the batch size, not with the batch's members), so the latents are bitwise equal
    mm = encode_dataset(tiny_vae(), TinyDM(text=True), tmp_path / "mm", batch_size=4, progress=False)
    sh = encode_dataset_shards(
        tiny_vae(), TinyDM(text=True), tmp_path / "sh", batch_size=4, progress=False, samples_per_shard=16
    )
    assert sh["dataset"] == mm["dataset"] and sh["autoencoder"] == mm["autoencoder"]
    assert [len(sh["splits"][s]["shards"]) for s in ("train", "val")] == [3, 1]
    assert np.allclose(sh["transform"]["scale"], mm["transform"]["scale"], rtol=1e-9)
    texts = json.loads((tmp_path / "mm" / "train" / TEXTS).read_text())
    z = np.load(tmp_path / "mm" / "train" / LATENTS)
    recs = _records(str(tmp_path / "sh" / "train"))
    assert sorted(r["index"] for r in recs) == list(range(40))
    for r in recs:
        assert np.array_equal(r["z"], z[r["index"]]) and r["text"] == texts[r["index"]]
    again = encode_dataset_shards(
        tiny_vae(), TinyDM(text=True), tmp_path / "sh", batch_size=4, progress=False, target_std=1.0
    )  # only the normalisation changes, from the recorded moments
    assert np.allclose(again["transform"]["scale"], 2 * np.asarray(sh["transform"]["scale"]))
    with pytest.raises(ConfigError, match="autoencoder"):
        encode_dataset_shards(tiny_vae(1), TinyDM(text=True), tmp_path / "sh", progress=False)
    with pytest.raises(ConfigError, match="memory-mapped"):
        encode_dataset_shards(tiny_vae(), TinyDM(text=True), tmp_path / "mm", progress=False)


# ---------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """A real AutoencoderModule checkpoint (1 Lightning step) of a tiny 1x16x16 -> 4x4x4 KL autoencoder."""
    from torch.utils.data import DataLoader

    from difflab.lit_modules.autoencoder_module import AutoencoderModule
    from tests.test_latents import TinyDM, tiny_vae

    tmp = tmp_path_factory.mktemp("ae")
    module = AutoencoderModule(tiny_vae().train())
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    dm = TinyDM()
    dm.setup()
    trainer.fit(module, DataLoader(dm.train_set, batch_size=8))
    trainer.save_checkpoint(tmp / "ae.ckpt")
    return tmp / "ae.ckpt"


def _records(location: str) -> list[dict]:
    """Every record of a shard split as stored (raw latents), in write order."""
    from difflab.datamodules.streaming_latents import LatentStreamingDataset

    ds = LatentStreamingDataset(
        location,
        shuffle=False,
        seed=0,
        drop_last=False,
        cache_dir=None,
        max_cache_size=None,
        storage_options=None,
        tag_epoch=False,
    )
    return [ds[i] for i in range(len(ds))]


QUIET = ["callbacks.class_grid.every_n_steps=100000", "+callbacks.class_grid.at_end=false"]


def _train_argv(shard_dir: Path, run: Path, steps: int, extra=()) -> list[str]:
    return [
        "experiment=digits_latent",
        "datamodule=latents_stream",
        f"datamodule.cache_dir={shard_dir}",
        "datamodule.batch_size=16",
        "datamodule.num_workers=0",
        "datamodule.persistent_workers=false",
        "datamodule.pin_memory=false",
        "trainer=cpu",
        "trainer.precision=32-true",
        "trainer.deterministic=true",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000000",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.progress_bar",
        "logger=none",
        "model.net.base_channels=8",
        "model.net.channel_mults=[1,2]",
        "model.net.attention_levels=[]",
        "model.net.groups=4",
        "sampler.steps=2",
        "callbacks.class_grid.n_cols=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={run}",
        *extra,
    ]


@needs_litdata
@pytest.mark.skipif(not (ROOT / "src" / "datamodules" / "digits.py").exists(), reason="digits datamodule not there")
def test_encode_latents_shards_on_digits_then_train_and_resume(tmp_path, ae_ckpt, capsys):
    """`encode_latents.py format=shards` on digits holds exactly the latents of the memory-mapped cache; `train.py
    experiment=digits_latent datamodule=latents_stream` trains on them, and a run resumed mid-epoch from a
    checkpoint reaches the same weights as the uninterrupted one (so it read the same batches)."""
    import encode_latents
    import train
    from difflab.checkpoints import load_checkpoint
    from difflab.datamodules.streaming_latents import STATE_KEY
    from tests.helpers import run_hydra_main

    # one batch per split (1617, 180 digits) in both layouts: CPU kernels round differently with the batch size (not
    # with the batch's members), so equal batch sizes make the two layouts hold bitwise equal latents
    base = [f"autoencoder.ckpt_path={ae_ckpt}", "datamodule=digits", "progress=false", "batch_size=2048"]
    assert (
        run_hydra_main(encode_latents.main, [*base, f"out_dir={tmp_path / 'mm'}", f"hydra.run.dir={tmp_path / 'h1'}"])
        == 0
    )
    assert (
        run_hydra_main(
            encode_latents.main,
            [
                *base,
                f"out_dir={tmp_path / 'sh'}",
                "format=shards",
                "shard_samples=500",
                f"hydra.run.dir={tmp_path / 'h2'}",
            ],
        )
        == 0
    )
    mm, sh = read_manifest(tmp_path / "mm"), read_manifest(tmp_path / "sh")
    assert sh["layout"] == "shards" and sh["shards"]["samples_per_shard"] == 500
    assert sh["autoencoder"] == mm["autoencoder"] and sh["dataset"] == mm["dataset"] and sh["count"] == mm["count"]
    assert np.allclose(sh["transform"]["scale"], mm["transform"]["scale"], rtol=1e-9)
    assert np.allclose(sh["transform"]["shift"], mm["transform"]["shift"], rtol=1e-9, atol=1e-12)
    for split in ("train", "val"):
        z = np.load(tmp_path / "mm" / split / LATENTS)
        labels = np.load(tmp_path / "mm" / split / LABELS)
        recs = _records(str(tmp_path / "sh" / split))
        assert len(recs) == len(z) and sorted(r["index"] for r in recs) == list(range(len(z)))
        for r in recs:
            assert r["z"].dtype == np.float16 and np.array_equal(r["z"], z[r["index"]])
            assert r["label"] == labels[r["index"]]
        assert sorted((r["z"].tobytes(), r["label"]) for r in recs) == sorted(
            (zz.tobytes(), int(y)) for zz, y in zip(z, labels)
        )
    capsys.readouterr()
    # a second run finds the shards complete and leaves them
    assert (
        run_hydra_main(
            encode_latents.main,
            [*base, f"out_dir={tmp_path / 'sh'}", "format=shards", f"hydra.run.dir={tmp_path / 'h3'}"],
        )
        == 0
    )
    assert read_manifest(tmp_path / "sh")["updated"] == sh["updated"]

    # train: 4 steps with the class grid decoded through the shards' autoencoder
    full = tmp_path / "full"
    assert run_hydra_main(train.main, _train_argv(tmp_path / "sh", full, 4)) == 0
    assert (full / "figures" / "class_grid" / "final.png").is_file()
    ck2 = load_checkpoint(full / "checkpoints" / "step_0000002.ckpt")
    state = ck2["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["num_samples_yielded"] == 2 * 16 and state[STATE_KEY]["count"] == sh["count"]["train"]
    # resume from step 2: the same weights at step 4
    resumed = tmp_path / "resumed"
    assert (
        run_hydra_main(
            train.main,
            _train_argv(
                tmp_path / "sh", resumed, 4, [f"ckpt_path={full / 'checkpoints' / 'step_0000002.ckpt'}", *QUIET]
            ),
        )
        == 0
    )
    a = load_checkpoint(full / "checkpoints" / "step_0000004.ckpt")["current_model_state"]
    b = load_checkpoint(resumed / "checkpoints" / "step_0000004.ckpt")["current_model_state"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()) <= 1e-6

    # a foreign shard directory stops train.py with one line
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "sh", bad)
    m = json.loads((bad / MANIFEST).read_text())
    m["shards"]["version"] = 99
    (bad / MANIFEST).write_text(json.dumps(m))
    capsys.readouterr()
    assert run_hydra_main(train.main, _train_argv(bad, tmp_path / "bad_run", 1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "version 99" in err, err
