"""Variable-length video (issue 18): bucket assignment, the DDP-aware resumable bucket batch sampler, the How2Sign
datamodule with buckets, Open-Sora's frame-dependent time shift and a tiny bucketed training run."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from difflab.datamodules.buckets import (
    Bucket,
    BucketBatchSampler,
    BucketSample,
    assign_buckets,
    bucket_batch_sizes,
    collate_buckets,
    frame_usage,
    resolve_frame_buckets,
    usable_frames,
)
from difflab.diffusion.processes import FlowProcess, frame_shift, shift_time
from difflab.utils.errors import ConfigError
from difflab.video import io as vio

H2S_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART\tEND\tSENTENCE"


# ------------------------------------------------------------------------------------------------- assignment math
def test_resolve_frame_buckets():
    assert resolve_frame_buckets(16) is None  # the default: one fixed crop
    assert resolve_frame_buckets(16, max_frames=64) == [16, 32, 48, 64]
    assert resolve_frame_buckets(16, max_frames=40) == [16, 32]
    assert resolve_frame_buckets(16, [48, 16, 32, 16]) == [16, 32, 48]
    with pytest.raises(ConfigError, match="above datamodule.max_frames=32"):
        resolve_frame_buckets(16, [16, 48], max_frames=32)
    with pytest.raises(ConfigError, match="below datamodule.num_frames"):
        resolve_frame_buckets(16, max_frames=8)
    with pytest.raises(ConfigError, match="multiples of 2"):
        resolve_frame_buckets(8, [4, 7], multiple=2)


def test_usable_frames_and_bucket_assignment():
    # n source frames at step s give floor((n - 1) / s) + 1 output frames (the longest window without repeats)
    assert [usable_frames(n, 1) for n in (0, 1, 2, 10)] == [0, 1, 2, 10]
    assert usable_frames(10, 2) == 5 and usable_frames(11, 2) == 6 and usable_frames(48, 2.5) == 19
    assert usable_frames(24 * 5, 24 / 12) == 60  # 5 s at 24 fps resampled to 12 fps
    lengths = [1, 3, 4, 7, 8, 15, 16, 17, 100]
    got = [b.frames for b in assign_buckets(lengths, [4, 8, 16], [16])]
    # the largest bucket <= the length; shorter than every bucket -> the smallest (padded by the reader)
    assert got == [4, 4, 4, 4, 8, 8, 16, 16, 16]
    assert all((b.height, b.width) == (16, 16) for b in assign_buckets(lengths, [4, 8, 16], [16]))
    # resolutions: the largest one the clip covers without upscaling; none covered -> the smallest
    sizes = [(720, 1280), (260, 210), (100, 100), (40, 40)]
    res = [b for b in assign_buckets([8] * 4, [8], [[64, 64], [128, 128], [256, 200]], sizes)]
    assert [(b.height, b.width) for b in res] == [(256, 200), (256, 200), (64, 64), (64, 64)]


def test_batch_size_rule_keeps_frames_times_batch_about_constant():
    buckets = [Bucket(t, 64, 64) for t in (16, 32, 48, 64)] + [Bucket(16, 128, 128)]
    sizes = bucket_batch_sizes(buckets, 8, 16, 64)
    assert [sizes[Bucket(t, 64, 64)] for t in (16, 32, 48, 64)] == [8, 4, 2, 2]  # floor(8 * 16 / T)
    assert sizes[Bucket(16, 128, 128)] == 2  # 4x the pixels
    assert set(bucket_batch_sizes(buckets, 8, 16, 64, "fixed").values()) == {8}
    assert bucket_batch_sizes([Bucket(400, 64, 64)], 1, 16, 64)[Bucket(400, 64, 64)] == 1  # at least one clip
    with pytest.raises(ConfigError, match="bucket_batch"):
        bucket_batch_sizes(buckets, 8, 16, 64, "tokens")


def test_frame_usage():
    assert frame_usage([10, 20, 40], [16, 16, 16]) == pytest.approx((10 + 16 + 16) / 70)
    assert frame_usage([10, 20, 40], [8, 16, 32]) == pytest.approx((8 + 16 + 32) / 70)


def test_a_bucket_no_clip_fits_fails_in_one_line():
    with pytest.raises(ConfigError) as err:
        assign_buckets([12, 30, 40], [16, 64], [32], what="how2sign train clips")
    msg = str(err.value)
    assert "\n" not in msg and "bucket length 64 frames fits no clip" in msg and "12-40 frames" in msg
    with pytest.raises(ConfigError) as err:
        assign_buckets([20, 30], [16], [[64, 64], [512, 512]], [(260, 210), (260, 210)])
    msg = str(err.value)
    assert "\n" not in msg and "bucket resolution 512x512 fits no clip" in msg and "260 x 210 pixels" in msg


# ------------------------------------------------------------------------------------------------------- sampler
def _buckets(n: int = 53, seed: int = 0) -> tuple[list[Bucket], dict[Bucket, int]]:
    lengths = np.random.default_rng(seed).integers(2, 70, n).tolist()
    buckets = assign_buckets(lengths, [8, 16, 32, 64], [16])
    return buckets, bucket_batch_sizes(buckets, 4, 16, 16)


def _rank_batches(buckets, sizes, world, epoch=0, seed=3, **kw) -> list[list[list[BucketSample]]]:
    out = []
    for r in range(world):
        s = BucketBatchSampler(None, buckets, sizes, seed=seed, num_replicas=world, rank=r, **kw)
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        out.append(batches)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_clip_once_per_epoch_across_ranks_with_equal_batch_counts(world):
    buckets, sizes = _buckets()
    per_rank = _rank_batches(buckets, sizes, world)
    assert len({len(b) for b in per_rank}) == 1  # the same number of batches on every rank
    seen = [k.index for batches in per_rank for batch in batches for k in batch]
    assert sorted(seen) == list(range(len(buckets)))  # none dropped, none repeated
    for batches in per_rank:
        for batch in batches:
            b = {(k.frames, k.height, k.width) for k in batch}
            assert len(b) == 1  # one bucket per batch ...
            bucket = Bucket(*b.pop())
            assert all(buckets[k.index] == bucket for k in batch)  # ... the clips' own bucket
            assert 1 <= len(batch) <= sizes[bucket]


def test_uneven_batch_count_is_split_not_padded():
    buckets = [Bucket(8, 16, 16)] * 9  # 3 batches of 3 for 2 ranks: one batch is split in two
    sizes = {Bucket(8, 16, 16): 3}
    per_rank = _rank_batches(buckets, sizes, 2)
    assert [len(b) for b in per_rank] == [2, 2]
    assert sorted(len(batch) for batches in per_rank for batch in batches) == [1, 2, 3, 3]
    drop = _rank_batches(buckets, sizes, 2, drop_last=True)  # drop_last: the remainder batch goes instead
    assert [len(b) for b in drop] == [1, 1] and all(len(batch) == 3 for b in drop for batch in b)
    with pytest.raises(ConfigError, match="cannot give each of 4 ranks"):
        list(BucketBatchSampler(None, [Bucket(8, 16, 16)] * 3, sizes, num_replicas=4, rank=0))


def test_order_is_deterministic_per_seed_and_changes_per_epoch():
    buckets, sizes = _buckets()

    def order(seed, epoch):
        return [[k.index for k in b] for r in _rank_batches(buckets, sizes, 2, epoch=epoch, seed=seed) for b in r]

    assert order(3, 0) == order(3, 0)
    assert order(3, 1) != order(3, 0)
    assert order(4, 0) != order(3, 0)
    s = BucketBatchSampler(None, buckets, sizes, seed=3)
    assert s.sampler.epoch == 0
    s.sampler.set_epoch(5)  # what Lightning calls (loader.batch_sampler.sampler.set_epoch)
    assert [[k.index for k in b] for b in s] == [
        [k.index for k in b] for b in _rank_batches(buckets, sizes, 1, epoch=5)[0]
    ]


def test_a_distributed_sampler_injected_by_lightning_sets_the_ranks():
    from torch.utils.data import DistributedSampler

    buckets, sizes = _buckets()
    dummy = list(range(len(buckets)))
    direct = _rank_batches(buckets, sizes, 2)
    for r in range(2):
        ds = DistributedSampler(dummy, num_replicas=2, rank=r, shuffle=True, seed=0)
        s = BucketBatchSampler(ds, buckets, sizes, seed=3)
        assert s.world() == (r, 2)
        assert [[k.index for k in b] for b in s] == [[k.index for k in b] for b in direct[r]]
        ds.set_epoch(1)
        assert s.epoch == 1


def test_sampler_state_round_trip_mid_epoch():
    buckets, sizes = _buckets()
    full = BucketBatchSampler(None, buckets, sizes, seed=3, num_replicas=2, rank=1)
    full.set_epoch(2)
    expected = list(full)
    s = BucketBatchSampler(None, buckets, sizes, seed=3, num_replicas=2, rank=1)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    assert state["yielded"] == 3 and state["epoch"] == 2
    fresh = BucketBatchSampler(None, buckets, sizes, seed=0, num_replicas=2, rank=1)  # other seed, epoch 0
    fresh.load_state_dict(state)
    assert head + list(fresh) == expected
    assert list(fresh) == expected  # the next iteration starts the epoch from the beginning again


class _Clips(Dataset):
    """A toy bucketed dataset: clip i read at (frames, h, w) is filled with i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        k = key if isinstance(key, BucketSample) else BucketSample(int(key), 4, 2, 2)
        return {"x": torch.full((1, k.frames, k.height, k.width), float(k.index)), "num_frames": k.frames}


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_saves_and_resumes_the_bucket_sampler(workers):
    """torchdata 0.11's StatefulDataLoader saves the batch sampler's state_dict (it is the loader's _index_sampler)
    and a new loader given that state continues with the next batch, with or without workers."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    buckets, sizes = _buckets(40)

    def loader():
        s = BucketBatchSampler(None, buckets, sizes, seed=7)
        return StatefulDataLoader(
            _Clips(len(buckets)),
            batch_sampler=s,
            collate_fn=collate_buckets,
            num_workers=workers,
            multiprocessing_context="fork" if workers else None,
        )

    def ids(batch):
        return batch["x"][:, 0, 0, 0, 0].long().tolist()

    whole = [ids(b) for b in loader()]
    first = loader()
    it = iter(first)
    head = [ids(next(it)) for _ in range(4)]
    state = first.state_dict()
    del it
    again = loader()
    again.load_state_dict(state)
    rest = [ids(b) for b in again]
    assert head + rest == whole
    assert sorted(i for b in whole for i in b) == list(range(len(buckets)))


def test_collate_refuses_mixed_shapes():
    a = {"x": torch.zeros(1, 4, 2, 2), "num_frames": 4}
    b = {"x": torch.zeros(1, 8, 2, 2), "num_frames": 8}
    out = collate_buckets([a, dict(a)])
    assert out["x"].shape == (2, 1, 4, 2, 2) and out["num_frames"].tolist() == [4, 4]
    with pytest.raises(ValueError, match="mixes clip shapes"):
        collate_buckets([a, b])


# ---------------------------------------------------------------------------------------------------- frame shift
def _open_sora_timestep_transform(
    t,
    height,
    width,
    num_frames,
    base_resolution=512 * 512,
    base_num_frames=1,
    scale=1.0,
    num_timesteps=1000,
    vae="v1.2",
):
    """Open-Sora's training time transform, re-typed from hpcaitech/Open-Sora v1.2.0
    (17cce908b22283acc3c946816c81f46dd442a453) opensora/schedulers/rf/rectified_flow.py lines 10-33 and v1.3
    (b096aa3c1c59de663f1f40bf091945ee3f9ec455) opensora/schedulers/rf/time_sampler.py lines 7-57."""
    t = t / num_timesteps
    resolution = height * width
    ratio_space = (resolution / base_resolution).sqrt()
    if num_frames[0] == 1:
        nf = torch.ones_like(num_frames)
    else:
        nf = num_frames // 17 * 5 if vae == "v1.2" else (num_frames - 1) // 4
    ratio_time = (nf / base_num_frames).sqrt()
    ratio = ratio_space * ratio_time * scale
    new_t = ratio * t / (1 + (ratio - 1) * t)
    return new_t * num_timesteps


@pytest.mark.parametrize("vae", ["v1.2", "v1.3"])
def test_frame_shift_matches_open_soras_timestep_transform(vae):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 1000
    for frames, (h, w) in [(51, (144, 256)), (102, (240, 426)), (204, (360, 640)), (34, (512, 512))]:
        nf = torch.full((64,), frames, dtype=torch.float64)
        hh, ww = torch.full((64,), float(h), dtype=torch.float64), torch.full((64,), float(w), dtype=torch.float64)
        ref = _open_sora_timestep_transform(t, hh, ww, nf, vae=vae)
        latent = frames // 17 * 5 if vae == "v1.2" else (frames - 1) // 4
        shift = frame_shift(math.sqrt(h * w / (512 * 512)), latent, 1)  # process.shift = the spatial ratio
        ours = shift_time(t / 1000, shift) * 1000
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-9)
        # the same with the pixel factor given separately and per-sample tensors
        per = frame_shift(1.0, torch.full((64,), latent), 1, torch.full((64,), h * w), 512 * 512)
        torch.testing.assert_close(shift_time(t / 1000, per) * 1000, ref, rtol=1e-12, atol=1e-9)
    assert frame_shift(3.0, 16, 16) == 3.0 and frame_shift(1.0, 64, 16) == 2.0


def test_training_times_use_the_batch_frame_count():
    """Diffusion.losses draws t through `frame_shifted_times` when process.frame_shift_base is set:
    the process's density with shift * sqrt(T / base) (x sqrt(HW / H0W0)) per sample; None otherwise."""
    from difflab.diffusion.system import Diffusion

    process = FlowProcess(density="logit_normal", shift=1.5, frame_shift_base=8)
    owner = SimpleNamespace(process=process, sample_shape=(1, 8, 16, 16))
    batch = {"x": torch.zeros(6, 1, 32, 16, 16), "num_frames": torch.full((6,), 32)}
    t = Diffusion.frame_shifted_times(owner, batch, torch.Generator().manual_seed(1))
    ref = FlowProcess(density="logit_normal", shift=1.5 * 2.0).sample_times(
        6, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(t, ref)
    # without num_frames the clips' frame axis is used; a smaller resolution lowers the shift
    t2 = Diffusion.frame_shifted_times(owner, {"x": torch.zeros(6, 1, 2, 8, 8)}, torch.Generator().manual_seed(1))
    ref2 = FlowProcess(shift=1.5 * 0.5 * 0.5).sample_times(6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t2, ref2)
    assert (
        Diffusion.frame_shifted_times(SimpleNamespace(process=FlowProcess(), sample_shape=(1, 8, 16, 16)), batch, None)
        is None
    )
    with pytest.raises(ValueError, match="frame_shift_base"):
        FlowProcess(frame_shift_base=0)


# ------------------------------------------------------------------------------------------- How2Sign datamodule
def _flat(n: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.repeat((np.arange(n, dtype=np.uint8) * 3)[:, None, None, None], h * w * 3).reshape(n, h, w, 3)


@pytest.fixture(scope="module")
def how2sign_lengths_dir(tmp_path_factory) -> Path:
    """How2Sign sentence-clip layout, 10 fps clips of 3 to 40 frames (0.3-4 s) plus a broken mp4."""
    root = tmp_path_factory.mktemp("how2sign_buckets")
    lengths = {"train": [3, 6, 9, 12, 17, 20, 25, 33, 40, 14, 8], "val": [12, 12]}
    for split, lens in lengths.items():
        clips = root / f"{split}_rgb_front_clips" / "raw_videos"
        clips.mkdir(parents=True)
        rows = [H2S_HEADER]
        for i, n in enumerate(lens):
            vid = f"{split}{i:02d}"
            rows.append(f"{vid}\t{vid}-rgb_front\t{vid}_0\t{vid}_0-rgb_front\t0.00\t{n / 10:.2f}\t{split} sentence {i}")
            vio.write_mp4(clips / f"{vid}_0-rgb_front.mp4", _flat(n), fps=10)
        if split == "train":
            rows.append("bad\tbad-rgb_front\tbad_0\tbad_0-rgb_front\t0.00\t1.00\tbroken clip")
            (clips / "bad_0-rgb_front.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
        (root / f"how2sign_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def _dm(root, **kw):
    from difflab.datamodules.sign_video import SignVideoDataModule

    args = dict(
        dataset="how2sign",
        data_dir=str(root),
        num_frames=8,
        image_size=16,
        batch_size=4,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
    )
    return SignVideoDataModule(**{**args, **kw})


def test_how2sign_datamodule_with_buckets(how2sign_lengths_dir):
    dm = _dm(how2sign_lengths_dir, buckets=[4, 8, 16, 32], frame_stride=1)
    dm.setup("fit")
    buckets, sizes = dm.train_buckets()
    assert [b.frames for b in buckets] == [4, 4, 8, 8, 16, 16, 16, 32, 32, 8, 8, 4]  # broken clip: smallest
    assert sizes == {Bucket(4, 16, 16): 8, Bucket(8, 16, 16): 4, Bucket(16, 16, 16): 2, Bucket(32, 16, 16): 1}
    rep = dm.bucket_report
    assert rep["unmeasured"] == 1 and rep["frames_used_buckets"] > rep["frames_used_fixed"]
    seen_t = set()
    for batch in dm.train_dataloader():
        t = batch["x"].shape[2]
        seen_t.add(t)
        assert batch["num_frames"].tolist() == [t] * batch["x"].shape[0] and batch["x"].shape[-2:] == (16, 16)
        assert len(batch["text"]) == batch["x"].shape[0]
    assert seen_t == {4, 8, 16, 32}
    val = next(iter(dm.val_dataloader()))
    assert val["x"].shape[2] == 8 and "num_frames" not in val  # evaluation keeps num_frames
    assert dm.sample_shape == (3, 8, 16, 16)
    # remembered lengths: a second datamodule does not open the files again
    assert (how2sign_lengths_dir / ".difflab_clip_info_train.json").is_file()


def test_how2sign_default_has_no_buckets(how2sign_lengths_dir):
    dm = _dm(how2sign_lengths_dir)
    dm.setup("fit")
    assert dm.frame_buckets is None and dm.bucket_report is None
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape[1:] == (3, 8, 16, 16) and "num_frames" not in batch


def test_how2sign_bucket_longer_than_every_clip_fails_at_setup(how2sign_lengths_dir):
    dm = _dm(how2sign_lengths_dir, max_frames=64, num_frames=16, target_fps=5)
    with pytest.raises(ConfigError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "bucket length 32 frames fits no clip" in msg and "2-20 frames" in msg
    assert "how2sign train clips" in msg


def test_bucket_config_keys_compose_and_are_checked(tmp_path):
    from difflab.config_checks import check_config
    from tests.helpers import compose_train

    ok = compose_train(tmp_path, ["experiment=sign_text2video", "datamodule.buckets=[16,32]"])
    assert check_config(ok, "train") == []
    bad = compose_train(
        tmp_path, ["experiment=sign_text2video", "datamodule.buckets=[16,64]", "datamodule.max_frames=32"]
    )
    assert any("datamodule.buckets" in p for p in check_config(bad, "train"))
    assert (
        check_config(
            compose_train(
                tmp_path, ["experiment=moving_digits_t2v", "datamodule.min_frames=4", "datamodule.max_frames=16"]
            ),
            "train",
        )
        == []
    )


# --------------------------------------------------------------------------------------------------- training run
def test_tiny_bucketed_training_run_sees_several_frame_counts(tmp_path, monkeypatch):
    """experiment=moving_digits_t2v with variable-length clips (4-8 frames), buckets [4, 8], process=flow with the
    frame shift: batches of both lengths reach the training step, each with its own time shift."""
    from difflab.diffusion.system import Diffusion
    from difflab.pipeline import train
    from tests.helpers import compose_train

    seen = []
    original = Diffusion.frame_shifted_times

    def spy(self, batch, generator):  # training steps only: validation gives its fixed times
        t = original(self, batch, generator)
        seen.append((int(batch["x"].shape[2]), batch["num_frames"].tolist(), t))
        return t

    monkeypatch.setattr(Diffusion, "frame_shifted_times", spy)
    torch.manual_seed(0)
    cfg = compose_train(
        tmp_path / "run",
        [
            "experiment=moving_digits_t2v",
            f"paths.data_dir={tmp_path / 'data'}",
            "trainer=cpu",
            "logger=csv",
            "process=flow",
            "process.frame_shift_base=8",
            "sampler=euler",
            "datamodule.num_train=24",
            "datamodule.num_val=4",
            "datamodule.num_test=4",
            "datamodule.min_frames=4",
            "datamodule.buckets=[4,8]",
            "datamodule.batch_size=4",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1",
            "trainer.accumulate_grad_batches=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "~callbacks.progress_bar",
            "model.net.base_channels=8",
            "model.net.channel_mults=[1,2]",
            "model.net.num_res_blocks=1",
            "model.net.attention_levels=[1]",
            "model.net.temporal_attention_levels=[1]",
            "model.net.cross_attention_levels=[1]",
            "model.net.groups=4",
            "model.net.head_dim=8",
            "lr_schedule.warmup=1",
            "sampler.steps=2",
            "~callbacks.video_grid",
            "callbacks.model_checkpoint.every_n_train_steps=4",
        ],
    )
    objs = train(cfg)
    assert objs["trainer"].global_step == 4
    frames = {t for t, _, _ in seen}
    assert frames == {4, 8}, frames
    for t, nf, _ in seen:
        assert nf == [t] * len(nf)
    assert objs["datamodule"].bucket_report["clips"] == 24
    assert objs["model"].diffusion.sample_shape == (1, 8, 16, 16)  # sampling keeps the configured length


def test_video_models_take_a_variable_frame_count():
    """UNet3D: any T; ViViT: T a multiple of tubelet_size; VideoDiT: T a multiple of tubelet_size up to
    max_frames (the one model with a frame limit, a one-line error beyond it)."""
    from difflab.models.dit import VideoDiT
    from difflab.models.unet3d import UNet3D
    from difflab.models.vivit import ViViT

    torch.manual_seed(0)
    unet = UNet3D(
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        groups=4,
        head_dim=8,
    )
    vivit = ViViT(in_channels=1, patch_size=4, tubelet_size=2, hidden_dim=32, depth=1, head_dim=16)
    dit = VideoDiT(
        sample_shape=(1, 8, 8, 8), patch_size=4, tubelet_size=2, max_frames=16, depth=1, hidden_dim=32, num_heads=2
    )
    t = torch.tensor([10.0, 500.0])
    for frames in (2, 4, 6, 16, 4):
        x = torch.randn(2, 1, frames, 8, 8)
        for net in (unet, vivit, dit):
            assert net(x, t).shape == x.shape
    assert unet(torch.randn(2, 1, 5, 8, 8), t).shape == (2, 1, 5, 8, 8)
    with pytest.raises(ValueError, match="divisible by tubelet_size=2"):
        vivit(torch.randn(2, 1, 5, 8, 8), t)
    with pytest.raises(ValueError, match="max_frames=16"):
        dit(torch.randn(2, 1, 18, 8, 8), t)


def test_lightning_ddp_rebuild_of_the_bucketed_loader(how2sign_lengths_dir):
    """Under DDP Lightning rebuilds the training loader with a DistributedSampler (use_distributed_sampler=True):
    the rebuilt bucket sampler takes its rank and world size from it, and the two ranks split the epoch."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = _dm(how2sign_lengths_dir, buckets=[4, 8, 16, 32])
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    seen, counts = [], []
    for rank in range(2):
        ds = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        new = _update_dataloader(loader, ds, mode=RunningStage.TRAINING)
        assert isinstance(new.batch_sampler, BucketBatchSampler) and new.batch_sampler.world() == (rank, 2)
        batches = list(new.batch_sampler)
        counts.append(len(batches))
        seen += [k.index for b in batches for k in b]
        assert next(iter(new))["x"].shape[1:] == (3, batches[0][0].frames, 16, 16)
    assert counts[0] == counts[1] and sorted(seen) == list(range(len(dm.train_buckets()[0])))


@pytest.mark.parametrize("workers", [0, 2])
def test_bucketed_resumable_loader_continues_mid_epoch(how2sign_lengths_dir, workers):
    """The datamodule's training loader (difflab's ResumableDataLoader over the bucket sampler): a state taken after
    3 batches of epoch 1 resumes in a fresh datamodule with the rest of that epoch, same clips and lengths."""

    def loader():
        dm = _dm(how2sign_lengths_dir, buckets=[4, 8, 16, 32], num_workers=workers)
        dm.setup("fit")
        dl = dm.train_dataloader()
        dl.batch_sampler.set_epoch(1)
        return dl

    def key(batch):
        return batch["x"].shape[2], tuple(batch["text"])

    whole = [key(b) for b in loader()]
    first = loader()
    it = iter(first)
    head = [key(next(it)) for _ in range(3)]
    state = first.state_dict()
    del it
    again = loader()
    again.batch_sampler.set_epoch(0)  # the saved epoch wins
    again.load_state_dict(state)
    assert head + [key(b) for b in again] == whole
    assert len({t for t, _ in whole}) == 4
