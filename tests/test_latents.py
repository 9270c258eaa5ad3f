"""Latent cache: files and manifest, normalisation, refusal to mix caches, resume after interruption, datamodule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

import difflab.latents.encode as encode_mod
from difflab.autoencoders.kl_vae import KLAutoencoder
from difflab.configs import CONFIG_DIR
from difflab.datamodules.latents import LatentDataModule
from difflab.latents import encode_dataset
from difflab.latents.cache import LatentCache, read_manifest
from difflab.utils.errors import ConfigError, DataNotFoundError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class DictSet(Dataset):
    def __init__(self, x, labels, texts=None):
        self.x, self.labels, self.texts = x, labels, texts

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = {"x": self.x[i], "label": self.labels[i]}
        if self.texts is not None:
            item["text"] = self.texts[i]
        return item


class TinyDM(L.LightningDataModule):
    """40 train / 12 val smooth 1 x 16 x 16 images with 3 classes (and prompts with ``text=True``)."""

    def __init__(
        self,
        n_train: int = 40,
        n_val: int = 12,
        text: bool = False,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.num_classes, self.class_names = 3, ["a", "b", "c"]
        self.prompts = [f"a picture of {c}" for c in self.class_names]
        self.sample_shape = (1, 16, 16)
        self.train_set = self.val_set = None

    def _make(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
        x = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
        labels = torch.arange(n) % 3
        texts = [f"{self.prompts[int(k)]} #{i}" for i, k in enumerate(labels)] if self.hparams.text else None
        return DictSet(x, labels, texts)

    def setup(self, stage=None):
        self.train_set = self._make(self.hparams.n_train, self.hparams.seed)
        self.val_set = self._make(self.hparams.n_val, self.hparams.seed + 1)


TINY_DM = f"{TinyDM.__module__}.TinyDM"  # importable name under pytest's import mode


def tiny_vae(seed: int = 0) -> KLAutoencoder:
    torch.manual_seed(seed)
    return KLAutoencoder(
        in_channels=1, latent_channels=4, base_channels=8, channel_mults=[1, 2], norm_groups=4, mid_attention=False
    ).eval()


def encode_run(ae_ckpt, datamodule: dict, out) -> dict:
    """``encode_latents``' run with its config file's settings (batches of 16, no progress bar): ``datamodule``
    encoded by the autoencoder checkpoint ``ae_ckpt`` into ``out``; the cache's manifest."""
    from difflab.encode_latents import run

    return run(
        OmegaConf.create(
            {
                "autoencoder": {"_target_": "difflab.autoencoders.kl_vae.KLAutoencoder", "ckpt_path": str(ae_ckpt)},
                "datamodule": datamodule,
                "out_dir": str(out),
                "splits": ["train", "val"],
                "batch_size": 16,
                "num_workers": 0,
                "dtype": "float16",
                "target_std": 0.5,
                "per_channel": True,
                "overwrite": False,
                "device": "auto",
                "progress": False,
            }
        )
    )


def encode(ae, dm, out, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("progress", False)
    return encode_dataset(ae, dm, out, **kw)


# ---------------------------------------------------------------------------------------------- writing
def test_cache_files_dtypes_and_manifest(tmp_path):
    ae, dm = tiny_vae(), TinyDM(text=True)
    m = encode(ae, dm, tmp_path / "c")
    root = tmp_path / "c"
    lat = np.load(root / "train" / "latents.npy", mmap_mode="r")
    assert isinstance(lat, np.memmap) and lat.dtype == np.float16 and lat.shape == (40, 4, 4, 4)
    labels = np.load(root / "train" / "labels.npy")
    assert labels.dtype == np.int64 and labels.tolist() == (np.arange(40) % 3).tolist()
    texts = json.loads((root / "train" / "texts.json").read_text())
    assert texts == [dm.train_set.texts[i] for i in range(40)]
    assert not (root / "train" / "texts.partial.jsonl").exists()
    with torch.no_grad():
        ref = ae.encode(dm.train_set.x).numpy()
    assert np.allclose(lat.astype(np.float32), ref, atol=2e-3, rtol=2e-3)  # float16 rounding only
    assert np.load(root / "val" / "latents.npy", mmap_mode="r").shape == (12, 4, 4, 4)

    disk = read_manifest(root)
    assert disk == m and m["status"] == "complete" and m["format"] == "difflab-latent-cache"
    assert m["autoencoder"]["hash"] == ae.identity()["hash"]
    assert m["autoencoder"]["class"] == "difflab.autoencoders.kl_vae.KLAutoencoder"
    assert m["dataset"] == {"target": TINY_DM, "args": {"n_train": 40, "n_val": 12, "seed": 0, "text": True}}
    assert m["splits"]["train"] == {"count": 40, "done": 40, "has_label": True, "has_text": True}
    assert m["count"] == {"train": 40, "val": 12}
    assert m["latent_shape"] == [4, 4, 4] and m["pixel_shape"] == [1, 16, 16] and m["latent_dtype"] == "float16"
    assert m["num_classes"] == 3 and m["class_names"] == ["a", "b", "c"] and len(m["prompts"]) == 3
    # normalisation: closed form from the stored train latents
    z = lat.astype(np.float64)
    mean, std = z.mean(axis=(0, 2, 3)), z.std(axis=(0, 2, 3))
    t = m["transform"]
    assert np.allclose(t["mean"], mean, rtol=1e-9) and np.allclose(t["std"], std, rtol=1e-9)
    assert np.allclose(t["scale"], 0.5 / std) and np.allclose(t["shift"], -mean * 0.5 / std)


@pytest.mark.parametrize("per_channel", [True, False])
def test_normalised_latents_have_target_std(tmp_path, per_channel):
    encode(tiny_vae(), TinyDM(), tmp_path / "c", dtype="float32", target_std=0.7, per_channel=per_channel)
    ds = LatentDataModule(str(tmp_path / "c"), batch_size=8).dataset("train")
    x = ds.__getitems__(range(len(ds)))["x"].double()
    if per_channel:
        assert torch.allclose(
            x.std(dim=(0, 2, 3), unbiased=False), torch.full((4,), 0.7, dtype=torch.float64), atol=1e-5
        )
        assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    else:
        scale = LatentCache(tmp_path / "c").scale
        assert torch.all(scale == scale[0])
        assert abs(x.std(unbiased=False).item() - 0.7) < 1e-5 and abs(x.mean().item()) < 1e-5


def test_mismatched_cache_is_refused(tmp_path):
    out = tmp_path / "c"
    encode(tiny_vae(0), TinyDM(), out)
    with pytest.raises(ConfigError, match="autoencoder.*hash.*overwrite=true") as e:
        encode(tiny_vae(1), TinyDM(), out)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="dataset.*overwrite=true"):
        encode(tiny_vae(0), TinyDM(seed=5), out)
    with pytest.raises(ConfigError, match="float32"):
        encode(tiny_vae(0), TinyDM(), out, dtype="float32")
    other = tiny_vae(1)
    m = encode(other, TinyDM(seed=5), out, overwrite=True)
    assert m["autoencoder"]["hash"] == other.identity()["hash"] and m["dataset"]["args"]["seed"] == 5
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        encode(tiny_vae(0), TinyDM(), junk, overwrite=True)
    assert (junk / "notes.txt").exists()


def test_new_target_std_recomputes_only_the_transform(tmp_path):
    out = tmp_path / "c"
    first = encode(tiny_vae(), TinyDM(text=True), out)
    lat = (out / "train" / "latents.npy").read_bytes()
    second = encode(tiny_vae(), TinyDM(text=True), out, target_std=1.0)
    assert (out / "train" / "latents.npy").read_bytes() == lat
    assert np.allclose(second["transform"]["scale"], 2 * np.asarray(first["transform"]["scale"]))
    assert second["transform"]["std"] == first["transform"]["std"]


def test_complete_cache_rerun_does_nothing(tmp_path):
    out = tmp_path / "c"
    first = encode(tiny_vae(), TinyDM(), out)
    mtime = (out / "train" / "latents.npy").stat().st_mtime_ns
    again = encode(tiny_vae(), TinyDM(num_workers=0, batch_size=99), out)  # loader args do not matter
    assert again == first and (out / "train" / "latents.npy").stat().st_mtime_ns == mtime


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["encode", "manifest"])
def test_interrupted_encode_resumes_to_the_same_cache(tmp_path, monkeypatch, where):
    ref = encode(tiny_vae(), TinyDM(text=True), tmp_path / "ref")

    ae, out = tiny_vae(), tmp_path / "resumed"
    if where == "encode":  # the autoencoder dies on its 4th call (1 shape probe + 2 chunks done)
        calls, real = {"n": 0}, ae.encode

        def failing(x, **kw):
            calls["n"] += 1
            if calls["n"] == 4:
                raise Boom("injected")
            return real(x, **kw)

        monkeypatch.setattr(ae, "encode", failing)
    else:  # crash after chunk 2's data hit the disk but before its progress was recorded
        calls, real = {"n": 0}, encode_mod.write_manifest

        def failing(cache_dir, manifest):
            calls["n"] += 1
            if calls["n"] == 3:  # 1 initial write, chunk 1, then chunk 2 fails
                raise Boom("injected")
            return real(cache_dir, manifest)

        monkeypatch.setattr(encode_mod, "write_manifest", failing)
    with pytest.raises(Boom):
        encode(ae, TinyDM(text=True), out)
    partial = read_manifest(out)
    assert partial["status"] == "in_progress"
    assert partial["splits"]["train"]["done"] == (32 if where == "encode" else 16)
    assert partial["splits"]["val"]["done"] == 0
    if where == "manifest":  # the text log ran ahead of the recorded progress
        assert len((out / "train" / "texts.partial.jsonl").read_text().splitlines()) == 32
    with pytest.raises(ConfigError, match="incomplete"):
        LatentDataModule(str(out))

    monkeypatch.undo()
    done = encode(tiny_vae(), TinyDM(text=True), out)
    assert done["status"] == "complete" and done["transform"] == ref["transform"]
    for split in ("train", "val"):
        for name in ("latents.npy", "labels.npy"):
            assert np.array_equal(np.load(out / split / name), np.load(tmp_path / "ref" / split / name))
        assert (out / split / "texts.json").read_text() == (tmp_path / "ref" / split / "texts.json").read_text()


# ---------------------------------------------------------------------------------------------- reading
def test_latent_datamodule_batches(tmp_path):
    encode(tiny_vae(), TinyDM(text=True), tmp_path / "c")
    dm = LatentDataModule(str(tmp_path / "c"), batch_size=8)
    assert dm.sample_shape == (4, 4, 4) and dm.pixel_shape == (1, 16, 16)
    assert dm.num_classes == 3 and dm.class_names == ["a", "b", "c"] and len(dm.prompts) == 3
    assert dm.autoencoder_spec["hash"] == tiny_vae().identity()["hash"]
    assert dm.latent_scale.shape == dm.latent_shift.shape == (4,)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    b = batches[0]
    assert b["x"].shape == (8, 4, 4, 4) and b["x"].dtype == torch.float32
    assert b["label"].shape == (8,) and b["label"].dtype == torch.int64
    assert isinstance(b["text"], list) and len(b["text"]) == 8
    for _x, y, t in zip(b["x"], b["label"], b["text"]):  # rows stay aligned: text names the label's class
        assert t.startswith(dm.prompts[int(y)])
    seen = torch.cat([bb["label"] for bb in batches])
    assert sorted(seen.tolist()) == sorted((np.arange(40) % 3).tolist())
    val = list(dm.val_dataloader())
    assert sum(len(v["x"]) for v in val) == 12
    # workers re-open the memory maps instead of receiving pickled copies
    wdm = LatentDataModule(str(tmp_path / "c"), batch_size=8, num_workers=1)
    assert next(iter(wdm.val_dataloader()))["x"].shape == (8, 4, 4, 4)


def test_latent_flip(tmp_path):
    encode(tiny_vae(), TinyDM(), tmp_path / "c")
    plain = LatentDataModule(str(tmp_path / "c")).dataset("train")
    flip = LatentDataModule(str(tmp_path / "c"), flip=True).dataset("train")
    torch.manual_seed(0)
    a, b = plain.__getitems__(range(40))["x"], flip.__getitems__(range(40))["x"]
    same = (a == b).flatten(1).all(1)
    mirrored = (a.flip(-1) == b).flatten(1).all(1)
    assert torch.all(same | mirrored) and same.any() and (mirrored & ~same).any()
    # validation is never flipped
    val_flip = LatentDataModule(str(tmp_path / "c"), flip=True).dataset("val").__getitems__(range(12))["x"]
    val_plain = LatentDataModule(str(tmp_path / "c")).dataset("val").__getitems__(range(12))["x"]
    assert torch.equal(val_flip, val_plain)


def test_decode_latents_checks_the_autoencoder(tmp_path):
    ae = tiny_vae()
    encode(ae, TinyDM(), tmp_path / "c", dtype="float32")
    dm = LatentDataModule(str(tmp_path / "c"))
    x = dm.dataset("train").__getitems__(range(8))["x"]
    raw = torch.from_numpy(np.load(tmp_path / "c" / "train" / "latents.npy")[:8])
    with torch.no_grad():
        assert torch.allclose(dm.decode_latents(ae, x), ae.decode(raw), atol=1e-5)
        wrapped = dm.normalised_autoencoder(ae)
        assert torch.allclose(wrapped.decode(x), ae.decode(raw), atol=1e-5)
        assert torch.allclose(wrapped.encode(TinyDM()._make(40, 0).x[:8]), x, atol=1e-5)
    from difflab.utils.frozen import Frozen

    assert torch.allclose(dm.decode_latents(Frozen(ae), x), ae.decode(raw), atol=1e-5)
    with pytest.raises(ConfigError, match="differs"):
        dm.decode_latents(tiny_vae(seed=3), x)
    with pytest.raises(ConfigError, match="in-memory"):
        dm.load_autoencoder()  # encoded from a model built in memory: no reload spec


def test_missing_cache_is_data_not_found(tmp_path):
    with pytest.raises(DataNotFoundError, match="encode_latents.py"):
        LatentDataModule(str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------------------------- entry point
@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """A real AutoencoderModule checkpoint (1 Lightning step) for the entry-point tests."""
    from torch.utils.data import DataLoader

    from difflab.lit_modules.autoencoder_module import AutoencoderModule

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


def test_encode_latents_run_and_reload(tmp_path, ae_ckpt):
    sys.path.insert(0, str(ROOT))
    m = encode_run(ae_ckpt, {"_target_": TINY_DM, "n_train": 40, "batch_size": 4, "num_workers": 0}, tmp_path / "c")
    assert m["dataset"] == {"target": TINY_DM, "args": {"n_train": 40}}
    assert m["autoencoder"]["spec"] == {"ckpt_path": str(ae_ckpt.resolve())}
    dm = LatentDataModule(str(tmp_path / "c"))
    ae = dm.load_autoencoder()  # from the recorded spec, hash-checked
    assert dm.decode_latents(ae, dm.dataset("val").__getitems__(range(4))["x"]).shape == (4, 1, 16, 16)


def test_encode_latents_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("encode_latents", overrides=["out_dir=/tmp/x", "autoencoder.ckpt_path=/tmp/ae.ckpt"])
    assert cfg.autoencoder._target_ == "difflab.autoencoders.kl_vae.KLAutoencoder"
    assert cfg.autoencoder.ckpt_path == "/tmp/ae.ckpt" and cfg.out_dir == "/tmp/x"
    assert cfg.datamodule._target_ == "difflab.datamodules.digits.DigitsDataModule"
    assert cfg.target_std == 0.5 and list(cfg.splits) == ["train", "val"]


@pytest.mark.slow  # two CLI subprocesses: ~25 s each on a loaded 2-core machine (imports dominate)
@pytest.mark.skipif(not (ROOT / "src" / "datamodules" / "digits.py").exists(), reason="digits datamodule not there")
def test_encode_latents_cli_on_digits(tmp_path, ae_ckpt):
    """The real command line on the embedded digits dataset; a second run resumes/no-ops, a wrong AE is refused."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "encode_latents.py"),
        "autoencoder=kl_vae",
        f"autoencoder.ckpt_path={ae_ckpt}",
        "datamodule=digits",
        f"out_dir={tmp_path / 'digits'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "progress=false",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_manifest(tmp_path / "digits")
    assert m["status"] == "complete" and m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 1797
    assert m["dataset"]["target"] == "difflab.datamodules.digits.DigitsDataModule"
    assert "batch_size" not in m["dataset"]["args"] and m["latent_shape"] == [4, 4, 4]
    bad = subprocess.run(cmd + ["datamodule.seed=1"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "dataset" in bad.stderr and "overwrite=true" in bad.stderr


def test_train_a_dit_on_cached_latents(tmp_path, ae_ckpt):
    """model=dit on a latent cache (4 x 4 x 4 latents, patch 2) trains, decodes its class grid through the cache's
    autoencoder, and its checkpoint samples pixels."""
    from difflab.checkpoints import module_from_checkpoint
    from difflab.pipeline import train
    from tests.helpers import compose_train

    cache = tmp_path / "cache"
    encode_run(ae_ckpt, {"_target_": TINY_DM, "n_train": 40, "batch_size": 4, "num_workers": 0}, cache)
    out = tmp_path / "run"
    cfg = compose_train(
        out,
        [
            "datamodule=latents",
            f"datamodule.cache_dir={cache}",
            "datamodule.batch_size=8",
            "datamodule.num_workers=0",
            "datamodule.persistent_workers=false",
            "model=dit",
            "model.net.depth=1",
            "model.net.hidden_dim=32",
            "model.net.num_heads=2",
            "model.net.patch_size=2",
            "objective.x0_clip=none",
            "conditioning=class",
            f"model.diffusion.autoencoder={{_target_:difflab.latents.cache.load_cache_autoencoder,cache_dir:{cache}}}",
            "trainer=cpu",
            "logger=csv",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "sampler.steps=2",
            "callbacks.class_grid.every_n_steps=2",
            "callbacks.class_grid.n_cols=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "~callbacks.progress_bar",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ],
    )
    objs = train(cfg)
    assert type(objs["model"].denoiser).__name__ == "DiT" and objs["model"].diffusion.sample_shape == (4, 4, 4)
    assert (out / "figures" / "class_grid" / "final.png").is_file()
    module = module_from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert module.diffusion.sample(module, 3, torch.tensor([0, 1, 2])).shape == (3, 1, 16, 16)  # decoded to pixels
