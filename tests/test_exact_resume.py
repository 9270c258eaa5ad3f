"""Exact mid-epoch resume (issue #18): a run killed with SIGKILL at any step and resumed from its checkpoint ends with
the same raw and EMA weights, bit for bit, as the uninterrupted run, with data loader workers (``num_workers=2``).

What makes it exact (src/datamodules/loaders.py, src/ops/rng.py): the data loaders are torchdata
``StatefulDataLoader``s whose state Lightning keeps in the checkpoint (sampler position, epoch and seed, worker base
seed), every loader worker's RNG is checkpointed through its dataset (``WorkerRNGState``), and ``RNGState`` restores
the main process's RNG (training noise and timesteps).

- image (digits), latent cache (random flips drawn in the workers) and video clips (random windows drawn in the
  workers): kill -9 in the middle of the second epoch, resume from the checkpoint of that step;
- negative controls: a plain ``DataLoader`` resumes with Lightning's "not resumable" warning and different weights;
  without the workers' RNG states the video run differs too;
- DDP on CPU (2 ranks x 2 workers, marked slow): the same exactness, with Lightning's DistributedSampler;
- the loader alone, in Lightning's call order: the epoch of a (DDP) DistributedSampler and a checkpoint of an
  epoch's last batch resume right, where a vanilla StatefulDataLoader replays epoch 0's order / skips an epoch;
  another ``num_workers`` or world size restarts the interrupted epoch with a warning.

Every run trains with ``max_steps`` far away (the killed run never finishes before the kill) and ``CaptureAt`` saves
the weights at step ``M`` and stops there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from difflab.checkpoints import load_checkpoint
from difflab.pipeline import train
from tests.helpers import ROOT, compose_train, tiny_overrides

torch.set_num_threads(1)  # 2 shared cores: one thread per process

BIG = 100_000  # max_steps of every run: the LR schedule is the same whether a run is killed, resumed or complete
# budget=steps: the schedule follows the step count alone (the default follows the wall-clock too once max_time is
# further along than max_steps, and a time-bounded run cannot repeat itself bit for bit)
QUIET = [
    "callbacks.class_grid.every_n_steps=100000",
    "+callbacks.class_grid.at_end=false",
    "logger=none",
    "trainer.deterministic=true",
    "lr_schedule.warmup=10",
    "lr_schedule.budget=steps",
]
NOT_RESUMABLE = "not resumable"


class CaptureAt(L.Callback):
    """At global step ``step``: writes the raw and EMA weights to ``path`` (global rank 0) and stops training."""

    def __init__(self, step: int, path: str):
        self.step, self.path = int(step), str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        from difflab.callbacks.ema import find_ema

        ema = find_ema(trainer)
        raw = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        avg = {k: v.detach().cpu().clone() for k, v in ema._average_model.module.state_dict().items()}
        if trainer.is_global_zero:
            torch.save({"step": trainer.global_step, "raw": raw, "ema": avg}, self.path)
        trainer.should_stop = True


def capture(step: int, path: Path) -> list[str]:
    target = f"{CaptureAt.__module__}.CaptureAt"
    return [
        f"+callbacks.capture_at._target_={target}",
        f"+callbacks.capture_at.step={step}",
        f"+callbacks.capture_at.path={path}",
    ]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def compare(a_path: Path, b_path: Path) -> tuple[float, float]:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a["step"] == b["step"]
    return max_diff(a["raw"], b["raw"]), max_diff(a["ema"], b["ema"])


def fit(out: Path, overrides: list[str]) -> list[str]:
    """Train in this process; returns the warnings it raised (messages)."""
    cfg = compose_train(out, overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    return [str(w.message) for w in caught]


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
        "WANDB_MODE": "disabled",
    }


def kill_after_checkpoint(overrides: list[str], run_dir: Path, step: int, timeout: float = 600) -> Path:
    """Run ``train.py`` (own process group: its loader workers and DDP ranks too), SIGKILL the whole group once the
    step-``step`` checkpoint exists, and return that checkpoint (written atomically: complete or absent)."""
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}.ckpt"
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    t0 = time.time()
    try:
        while not ckpt.is_file():
            if proc.poll() is not None:
                raise AssertionError(
                    f"training exited ({proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}"
                )
            if time.time() - t0 > timeout:
                raise AssertionError(f"no step-{step} checkpoint after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return ckpt


def epoch_length(dm) -> int:
    dm.setup("fit")
    return len(dm.train_dataloader())


def mid_epoch_step(epoch_len: int, every: int, epoch: int = 1) -> int:
    """The first multiple of ``every`` strictly inside epoch ``epoch`` (not on a boundary)."""
    k = every * (epoch * epoch_len // every + 1)
    assert epoch * epoch_len < k < (epoch + 1) * epoch_len and k % epoch_len, (epoch_len, every, k)
    return k


def strip_loader_state(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint without the data loader state (what a plain DataLoader run would have saved)."""
    ck = load_checkpoint(src)
    ck["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    torch.save(ck, dst)
    return dst


# ------------------------------------------------------------------------------------------------- the loader
def _lightning_epochs(loader, epochs: int, start: int = 0, stop_after: tuple[int, int] | None = None):
    """Batches (epoch, indices) in Lightning 2.6's call order: a fit calls ``iter()`` first (``FitLoop.setup_data``)
    and ``set_epoch`` after it (``on_advance_start``); later epochs ``set_epoch`` then ``iter()``. A resumed fit
    does not call ``iter()`` again for its first epoch. Stops after batch ``stop_after = (epoch, n)`` and returns
    the loader state taken there (as a checkpoint would)."""
    out, it = [], iter(loader)
    for e in range(start, epochs):
        loader.sampler.set_epoch(e)
        if e > start:
            it = iter(loader)
        for n in range(1, len(loader) + 1):
            try:
                out.append((e, next(it)["x"][:, 0].tolist()))
            except StopIteration:  # what Lightning's epoch loop does with an exhausted iterator: end the epoch
                break
            if (e, n) == stop_after:
                return out, loader.state_dict()
    return out, None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_distributed_sampler_epoch_and_epoch_end_where_plain_stateful_loader_does_not(num_workers):
    """Lightning injects a DistributedSampler under DDP; it is not stateful, and Lightning sets its epoch only after
    the resumed iterator exists. A vanilla StatefulDataLoader then replays epoch 0's order in a resumed epoch 1, and
    a checkpoint of an epoch's last batch resumes on an exhausted iterator (the next epoch is skipped)."""
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    from difflab.datamodules.digits import TensorDictDataset
    from difflab.datamodules.loaders import ResumableDataLoader

    ds = TensorDictDataset(torch.arange(100)[:, None])

    def loader(cls):
        return cls(
            ds,
            batch_size=10,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
            sampler=DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0),
        )  # 5 batches/epoch

    for cls, exact in ((ResumableDataLoader, True), (StatefulDataLoader, False)):
        full, _ = _lightning_epochs(loader(cls), 3)
        for stop in ((1, 2), (0, 5)):  # mid-epoch 1; the last batch of epoch 0
            first, state = _lightning_epochs(loader(cls), 3, stop_after=stop)
            resumed = loader(cls)
            resumed.load_state_dict(state)
            rest, _ = _lightning_epochs(resumed, 3, start=stop[0] + (stop[1] == 5))
            assert (first + rest == full) is exact, (cls.__name__, stop)


def test_loader_resumed_with_other_workers_or_world_restarts_the_epoch(caplog):
    from difflab.datamodules.digits import TensorDictDataset
    from difflab.datamodules.loaders import make_loader

    ds = TensorDictDataset(torch.arange(64)[:, None])
    ref = make_loader(ds, batch_size=8, shuffle=True, seed=3, num_workers=2)
    ref.sampler.set_epoch(1)
    it = iter(ref)
    epoch1 = [next(it)["x"][:, 0].tolist() for _ in range(3)]
    state = ref.state_dict()
    assert state["difflab"]["epoch"] == 1 and state["difflab"]["seed"] == 3
    for other in (state, {"difflab_ranks": [state, state]}):  # saved with 2 workers / by 2 ranks
        resumed = make_loader(ds, batch_size=8, shuffle=True, seed=3, num_workers=0)
        with caplog.at_level("WARNING", logger="difflab.datamodules.loaders"):
            resumed.load_state_dict(other)
        assert "restarts from its first batch" in caplog.text
        caplog.clear()
        assert next(iter(resumed))["x"][:, 0].tolist() == epoch1[0]  # the same epoch, from its start


# ------------------------------------------------------------------------------------------------------- image
def test_digits_kill9_mid_epoch_resumes_bit_identical_and_plain_loader_does_not(tmp_path, monkeypatch):
    from difflab.datamodules.digits import DigitsDataModule

    every = 8
    epoch = epoch_length(DigitsDataModule(image_size=8, batch_size=64))  # 25: 1617 training digits // 64
    k = mid_epoch_step(epoch, every)  # 32: batch 7 of epoch 1
    early = every  # 8: batch 8 of epoch 0
    m = k + every  # 40
    base = [*tiny_overrides(max_steps=BIG, save_every=every, extra=QUIET), "datamodule.num_workers=2"]

    ref = tmp_path / "ref.pt"
    fit(tmp_path / "uninterrupted", [*base, *capture(m, ref)])
    ckpt = kill_after_checkpoint(base, tmp_path / "killed", k)
    ck = load_checkpoint(ckpt)
    assert ck["global_step"] == k and ck["epoch"] == 1
    assert ck["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # Lightning saved the loader state

    for start in (k, early):
        got, start_ckpt = tmp_path / f"resumed_{start}.pt", ckpt.parent / f"step_{start:07d}.ckpt"
        msgs = fit(tmp_path / f"resumed_{start}", [*base, *capture(m, got), f"ckpt_path={start_ckpt}"])
        assert not [w for w in msgs if NOT_RESUMABLE in w]
        raw, ema = compare(ref, got)
        print(
            f"digits: resumed at step {start} (epoch {start // epoch}, batch {start % epoch}), at step {m}: "
            f"max |raw diff| {raw}, max |EMA diff| {ema}"
        )
        assert raw == 0.0 and ema == 0.0

    # negative control: a plain DataLoader (its checkpoints hold no loader state) restarts the epoch's data order
    from torch.utils.data import DataLoader

    import difflab.datamodules.digits as digits_mod

    def plain_loader(dataset, *, persistent_workers=False, num_workers=0, **kw):
        return DataLoader(
            dataset, num_workers=num_workers, persistent_workers=persistent_workers and num_workers > 0, **kw
        )

    monkeypatch.setattr(digits_mod, "make_loader", plain_loader)
    plain_ckpt = strip_loader_state(ckpt, tmp_path / "no_loader_state.ckpt")
    got = tmp_path / "plain.pt"
    msgs = fit(tmp_path / "plain", [*base, *capture(m, got), f"ckpt_path={plain_ckpt}"])
    assert [w for w in msgs if NOT_RESUMABLE in w]  # Lightning knows this resume is not exact
    raw, ema = compare(ref, got)
    print(f"digits, plain DataLoader: max |raw diff| {raw:.3g}, max |EMA diff| {ema:.3g}")
    assert raw > 0 and ema > 0


# ------------------------------------------------------------------------------------------------------- latent
class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
        self.x = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.labels[i]}


class LatentSourceDM(L.LightningDataModule):
    """96 train / 8 val smooth 1 x 16 x 16 images in 3 classes: the images a latent cache is encoded from."""

    def __init__(self, n_train: int = 96, n_val: int = 8, batch_size: int = 16, num_workers: int = 0):
        super().__init__()
        self.n_train, self.n_val, self.batch_size = n_train, n_val, batch_size
        self.num_classes, self.class_names = 3, ["a", "b", "c"]
        self.prompts = [f"a picture of {c}" for c in self.class_names]
        self.sample_shape = (1, 16, 16)
        self.train_set = self.val_set = None

    def setup(self, stage=None):
        self.train_set, self.val_set = _Images(self.n_train, 0), _Images(self.n_val, 1)


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory) -> Path:
    """A latent cache (4 x 8 x 8) of ``LatentSourceDM`` encoded by a tiny KL autoencoder checkpoint."""
    from torch.utils.data import DataLoader

    from difflab.autoencoders.kl_vae import KLAutoencoder
    from difflab.lit_modules.autoencoder_module import AutoencoderModule
    from tests.test_latents import encode_run

    tmp = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = KLAutoencoder(
        in_channels=1, latent_channels=4, base_channels=8, channel_mults=[1, 2], norm_groups=4, mid_attention=False
    )
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    dm = LatentSourceDM()
    dm.setup()
    trainer.fit(AutoencoderModule(vae), DataLoader(dm.train_set, batch_size=8))
    trainer.save_checkpoint(tmp / "ae.ckpt")
    encode_run(tmp / "ae.ckpt", {"_target_": f"{LatentSourceDM.__module__}.LatentSourceDM"}, tmp / "cache")
    return tmp / "cache"


def latent_overrides(cache: Path, every: int, batch: int) -> list[str]:
    """A tiny UNet on the cache's latents, random flips drawn in 2 persistent loader workers."""
    tiny = [o for o in tiny_overrides(max_steps=BIG, save_every=every, extra=QUIET) if not o.startswith("datamodule.")]
    return [
        *tiny,
        "datamodule=latents",
        f"datamodule.cache_dir={cache}",
        f"datamodule.batch_size={batch}",
        "datamodule.flip=true",
        "datamodule.num_workers=2",
        "datamodule.persistent_workers=true",
        "datamodule.pin_memory=false",
        "model.net.in_channels=4",
        "objective.x0_clip=none",
        f"model.diffusion.autoencoder={{_target_:difflab.latents.cache.load_cache_autoencoder,cache_dir:{cache}}}",
    ]


def test_latent_cache_with_worker_flips_kill9_mid_epoch_resumes_bit_identical(tmp_path, latent_cache):
    from difflab.datamodules.latents import LatentDataModule

    every, batch = 4, 8
    epoch = epoch_length(LatentDataModule(str(latent_cache), batch_size=batch))  # 12: 96 latents // 8
    k = mid_epoch_step(epoch, every)  # 16: batch 4 of epoch 1
    m = k + every
    base = latent_overrides(latent_cache, every, batch)
    ref = tmp_path / "ref.pt"
    fit(tmp_path / "uninterrupted", [*base, *capture(m, ref)])
    ckpt = kill_after_checkpoint(base, tmp_path / "killed", k)
    got = tmp_path / "resumed.pt"
    msgs = fit(tmp_path / "resumed", [*base, *capture(m, got), f"ckpt_path={ckpt}"])
    assert not [w for w in msgs if NOT_RESUMABLE in w]
    raw, ema = compare(ref, got)
    print(
        f"latents: resumed at step {k} (epoch {k // epoch}, batch {k % epoch}), at step {m}: "
        f"max |raw diff| {raw}, max |EMA diff| {ema}"
    )
    assert raw == 0.0 and ema == 0.0


# ------------------------------------------------------------------------------------------------------- video
TINY_UNET3D = [
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


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> Path:
    """Captioned moving-digit clips (How2Sign layout) of 8 frames: a 4-frame training window has 5 random starts."""
    from difflab.datamodules.moving_digits import MovingDigitsParams, generate_moving_digits

    root = tmp_path_factory.mktemp("clips") / "moving_digits"
    generate_moving_digits(
        root, MovingDigitsParams(canvas_size=16, digit_size=8, num_frames=8, num_train=48, num_val=4, num_test=4)
    )
    return root


def video_overrides(clips: Path, every: int, batch: int) -> list[str]:
    return [
        "experiment=sign_text2video",
        "trainer=cpu",
        f"datamodule.data_dir={clips}",
        "datamodule.num_frames=4",
        "datamodule.image_size=16",
        "datamodule.channels=1",
        "datamodule.target_fps=null",
        "datamodule.cache=true",
        f"datamodule.batch_size={batch}",
        "datamodule.num_workers=2",
        "datamodule.persistent_workers=false",
        "datamodule.pin_memory=false",
        *TINY_UNET3D,
        "conditioning.max_length=8",
        "sampler.steps=2",
        "trainer.max_steps=100000",
        "trainer.accumulate_grad_batches=1",
        "trainer.precision=32-true",
        "trainer.val_check_interval=1000000",
        "trainer.limit_val_batches=1",
        "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "trainer.deterministic=true",
        "logger=none",
        "lr_schedule.warmup=10",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "callbacks.video_grid.every_n_steps=100000",
        "callbacks.video_grid.at_end=false",
        "callbacks.ema.update_every=1",
    ]


def test_video_clips_with_random_windows_kill9_mid_epoch_resume_bit_identical(tmp_path, clips_dir, monkeypatch):
    from difflab.datamodules.sign_video import SignVideoDataModule

    every, batch = 4, 4
    dm = SignVideoDataModule(
        data_dir=str(clips_dir), num_frames=4, image_size=16, channels=1, batch_size=batch, num_workers=0, cache=True
    )
    epoch = epoch_length(dm)  # 12: 48 clips // 4
    k = mid_epoch_step(epoch, every)  # 16: batch 4 of epoch 1
    m = k + every
    base = video_overrides(clips_dir, every, batch)
    ref = tmp_path / "ref.pt"
    fit(tmp_path / "uninterrupted", [*base, *capture(m, ref)])
    ckpt = kill_after_checkpoint(base, tmp_path / "killed", k)
    got = tmp_path / "resumed.pt"
    msgs = fit(tmp_path / "resumed", [*base, *capture(m, got), f"ckpt_path={ckpt}"])
    assert not [w for w in msgs if NOT_RESUMABLE in w]
    raw, ema = compare(ref, got)
    print(
        f"video: resumed at step {k} (epoch {k // epoch}, batch {k % epoch}), at step {m}: "
        f"max |raw diff| {raw}, max |EMA diff| {ema}"
    )
    assert raw == 0.0 and ema == 0.0

    # control: workers that do not get their RNG states back draw other clip windows
    from difflab.ops.rng import WorkerRNGState

    monkeypatch.setattr(WorkerRNGState, "load_state_dict", lambda self, state: None)
    got = tmp_path / "no_worker_rng.pt"
    fit(tmp_path / "no_worker_rng", [*base, *capture(m, got), f"ckpt_path={ckpt}"])
    raw, ema = compare(ref, got)
    print(f"video without worker RNG states: max |raw diff| {raw:.3g}, max |EMA diff| {ema:.3g}")
    assert raw > 0 and ema > 0


# ------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow  # three 2-rank CPU runs with 2 loader workers each: ~2 min on a loaded 2-core machine
def test_ddp_cpu_kill9_mid_epoch_resumes_bit_identical(tmp_path, latent_cache):
    """Latents with random flips in the workers under DDP: Lightning injects a DistributedSampler, rank 0 writes the
    checkpoint, and every rank must get its own loader position and its own workers' RNG states back."""
    from difflab.datamodules.latents import LatentDataModule

    every, batch, world = 4, 8, 2
    epoch = epoch_length(LatentDataModule(str(latent_cache), batch_size=batch)) // world  # 6 per rank: 48 // 8
    k = mid_epoch_step(epoch, every)  # 8: batch 2 of epoch 1
    m = k + every
    base = [*latent_overrides(latent_cache, every, batch), "trainer=ddp_cpu"]

    def cli(run_dir: Path, extra: list[str]) -> str:
        r = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *base, *extra, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return r.stdout + r.stderr

    ref, got = tmp_path / "ref.pt", tmp_path / "resumed.pt"
    cli(tmp_path / "uninterrupted", capture(m, ref))
    ckpt = kill_after_checkpoint(base, tmp_path / "killed", k)
    ck = load_checkpoint(ckpt)
    assert ck["global_step"] == k and ck["epoch"] == 1
    ranks = ck["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["difflab_ranks"]
    assert len(ranks) == world and ranks[0]["difflab"]["epoch"] == ranks[1]["difflab"]["epoch"] == 1
    worker_rng = [r["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"]["rng"]["torch"] for r in ranks]
    assert not torch.equal(*worker_rng)  # each rank's workers have their own streams (Lightning seeds them by rank)
    out = cli(tmp_path / "resumed", [*capture(m, got), f"ckpt_path={ckpt}"])
    assert NOT_RESUMABLE not in out
    raw, ema = compare(ref, got)
    print(
        f"DDP: resumed at step {k} (epoch 1, batch {k - epoch}), at step {m}: max |raw diff| {raw}, "
        f"max |EMA diff| {ema}"
    )
    assert raw == 0.0 and ema == 0.0
