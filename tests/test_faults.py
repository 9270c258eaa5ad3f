"""Faults lose nothing: each fault ends in one line a user sees (``error: ...``, exit status 2 where the run cannot go
on) and nothing already saved is lost, overwritten or left half-written.

1. two runs of one run directory: the second is refused (lock held by a real second process), DDP children are not;
2. a truncated ``last.ckpt``: ``resume=auto`` falls back to the newest readable checkpoint; an explicit ``ckpt_path``
   is refused before Lightning starts; a sharded (FSDP) checkpoint is accepted without reading its shards;
3. a full disk (mocked ENOSPC part-way through the write) while writing a checkpoint, a post-hoc EMA snapshot or a
   sample file: one line naming the file, the previous file intact, no temporary file left;
4. a corrupt image or annotation row: one line naming the file (and line), or skipped and counted;
5. a diverging run: non-finite weights are never saved; the run stops naming the last good checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import compose_train, run_hydra_main, tiny_overrides

torch.set_num_threads(1)  # 2 shared cores

QUIET = ["callbacks.class_grid.every_n_steps=100000", "+callbacks.class_grid.at_end=false"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _console(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Run ``train.py`` in this process (real Hydra CLI parsing); returns the exit status, the ``error:`` lines
    (never a traceback) and what it printed on stdout."""
    import train

    capsys.readouterr()
    code = run_hydra_main(train.main, argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, [line for line in captured.err.splitlines() if line.startswith("error:")], captured.out


def _tiny(run: Path, max_steps: int = 4, extra=()) -> list[str]:
    return [*tiny_overrides(max_steps=max_steps, save_every=2, extra=[*QUIET, *extra]), f"hydra.run.dir={run}"]


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp")) if folder.exists() else []


def _snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run: checkpoints at steps 2 and 4 (step_0000002, step_0000004, last)."""
    import train

    run = tmp_path_factory.mktemp("trained")
    assert run_hydra_main(train.main, [*_tiny(run), "logger=none"]) == 0
    return run


# ---------------------------------------------------------------------------------------------- 1. one run per dir
HOLDER = """
import sys
from difflab.ops.run_lock import run_dir_lock
with run_dir_lock(sys.argv[1]) as held:
    print("locked" if held else "not locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
"""


def _run_files(run: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file of a run directory (``.hydra/`` and the log included: a refused run is stopped before Hydra
    writes them) but the lock file."""
    return {p: _snapshot(p) for p in run.rglob("*") if p.is_file() and p != run / ".difflab.lock"}


def _hold_lock(run: Path) -> subprocess.Popen:
    """A real second process holding ``run``'s lock; returns once it holds it (it says so through its stdout)."""
    from difflab.ops.run_lock import RANK_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_of_a_directory_is_refused_while_the_first_holds_it(trained, tmp_path, capsys, monkeypatch):
    from difflab.ops.run_lock import LOCK_NAME, RunDirInUseError, run_dir_lock

    run = trained
    before = _run_files(run)
    holder = _hold_lock(run)
    try:
        code, errors, out = _console([*_tiny(run, max_steps=6), "resume=auto", "logger=csv"], capsys)
        assert code == 2 and len(errors) == 1, errors
        assert errors[0].startswith(
            f"error: run directory {run} is in use by another training run (pid {holder.pid} on host "
        )
        assert "wait for it to end" in errors[0] and "GPU available" not in out  # refused before anything was built
        # nothing of the first run was touched, and the refused run wrote none of its own files (no csv/ logs)
        assert _run_files(run) == before

        # a DDP child of the holder's run (LOCAL_RANK > 0) is not refused; rank 0 of another run is
        monkeypatch.setenv("LOCAL_RANK", "1")
        with run_dir_lock(run) as held:
            assert held is None
        monkeypatch.delenv("LOCAL_RANK")
        with pytest.raises(RunDirInUseError, match=f"pid {holder.pid}"):
            with run_dir_lock(run):
                pass
    finally:
        holder.stdin.close()
        holder.wait()
    # kill -9 releases the lock: the next run of the directory gets it
    killed = _hold_lock(run)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    with run_dir_lock(run) as held:
        assert held == run / LOCK_NAME


# ---------------------------------------------------------------------------------------------- 2. truncated checkpoint
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a job killed while copying the file leaves


def test_truncated_last_ckpt_falls_back_on_resume_auto_and_is_refused_as_ckpt_path(trained, tmp_path, capsys):
    from difflab.checkpoints import load_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for p in (trained / "checkpoints").iterdir():
        shutil.copy2(p, run / "checkpoints" / p.name)  # with their modification times: resume=auto orders by them
    last = run / "checkpoints" / "last.ckpt"
    _truncate(last)  # the newest file: resume=auto would have taken it

    # an explicit ckpt_path is refused in one line, before Lightning (or anything else) starts
    refused = tmp_path / "refused"
    code, errors, out = _console([*_tiny(refused, max_steps=6), f"ckpt_path={last}", "logger=csv"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: ckpt_path={last}: cannot read checkpoint {last}: corrupt or truncated file")
    assert errors[0].endswith("or with resume=auto (the newest readable one of the run directory)")
    assert "GPU available" not in out  # no Trainer was built
    assert not (refused / "checkpoints").exists() and not (refused / "csv").exists()

    # resume=auto skips it with a warning naming it and continues from the newest readable one (step 4)
    code, errors, out = _console([*_tiny(run, max_steps=6), "resume=auto", "logger=none"], capsys)
    assert code == 0 and not errors
    log_text = (run / "train.log").read_text()
    assert f"resume: skipping unreadable checkpoint {last} (cannot read checkpoint {last}: corrupt" in log_text
    assert f"resume: continuing from {run / 'checkpoints' / 'step_0000004.ckpt'}" in log_text
    assert load_checkpoint(last)["global_step"] == 6

    # nothing readable: start fresh with a warning (never a traceback)
    from difflab.ops.resume import resolve_resume

    lone = tmp_path / "lone" / "checkpoints"
    lone.mkdir(parents=True)
    (lone / "last.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    assert resolve_resume(None, "auto", lone.parent) is None


def test_sharded_checkpoint_is_readable_without_reading_its_shards(tmp_path):
    from difflab.ops.fsdp import SHARDED_KEY
    from difflab.ops.resume import check_readable, resolve_resume

    ckpts = tmp_path / "checkpoints"
    shards = ckpts / "last.ckpt.shards-0000004-abcd1234"
    shards.mkdir(parents=True)
    (shards / "meta.pt").write_bytes(b"not read")  # garbage: reading the shards would fail
    (shards / ".metadata").write_bytes(b"not read")
    torch.save({"global_step": 4, SHARDED_KEY: {"dir": shards.name, "world_size": 2}}, ckpts / "last.ckpt")
    check_readable(ckpts / "last.ckpt")
    assert resolve_resume(None, "auto", tmp_path) == str(ckpts / "last.ckpt")
    # its shard directory gone: unreadable
    for p in shards.iterdir():
        p.unlink()
    shards.rmdir()
    from difflab.utils.errors import CheckpointError

    with pytest.raises(CheckpointError, match="shard directory"):
        check_readable(ckpts / "last.ckpt")


# ---------------------------------------------------------------------------------------------- 3. disk full
def _fill_disk_after(nbytes: int):
    """A writer's stand-in that writes ``nbytes`` (a partial file) and then fails like a full disk."""

    def write(f, *args, **kwargs):
        f.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_disk_full_while_writing_a_checkpoint_keeps_last_ckpt(tmp_path, capsys, monkeypatch):
    from difflab.checkpoints import load_checkpoint
    from difflab.utils.errors import disk_full

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    real_save = torch.save
    seen = []

    def save(obj, f, *args, **kwargs):  # the second write of last.ckpt (step 4) hits a full disk half-way
        if isinstance(f, str | Path) or not Path(f.name).name.startswith(".last.ckpt."):
            return real_save(obj, f, *args, **kwargs)
        seen.append(f.name)
        if len(seen) == 1:
            return real_save(obj, f, *args, **kwargs)
        _fill_disk_after(4096)(f)

    monkeypatch.setattr(torch, "save", save)
    code, errors, out = _console([*_tiny(run, max_steps=6), "logger=none"], capsys)
    assert code == 2 and errors == [f"error: {disk_full(last, ENOSPC)}"]
    assert load_checkpoint(last)["global_step"] == 2  # the previous last.ckpt, whole
    assert not _temporaries(run) and not (run / "final_metrics.json").exists()


def test_disk_full_while_writing_a_posthoc_ema_snapshot_keeps_the_previous_ones(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import safetensors.torch
    from safetensors import SafetensorError
    from torch import nn

    from difflab.callbacks.posthoc_ema import PostHocEMA, snapshot_path
    from difflab.utils.errors import DiskFullError

    module = nn.Module()
    module.w = nn.Parameter(torch.zeros(8))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, default_root_dir=str(tmp_path))
    cb = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_every=2, max_snapshots=None, dir=str(tmp_path / "posthoc_ema"))
    cb.setup(trainer, module, "fit")
    cb.on_train_start(trainer, module)

    def step(n: int) -> None:
        module.w.data.add_(1.0)
        trainer.global_step = n
        cb.on_train_batch_end(trainer, module, None, None, n - 1)

    step(1)
    step(2)
    first = snapshot_path(cb.dir, 2)
    kept = _snapshot(first)

    def full(tensors, filename, metadata=None):  # safetensors' writer reports ENOSPC only in its message
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    step(3)
    with pytest.raises(DiskFullError) as err:
        step(4)
    assert str(err.value).startswith(f"no space left on the device while writing {snapshot_path(cb.dir, 4)}")
    assert "\n" not in str(err.value)
    assert _snapshot(first) == kept and not snapshot_path(cb.dir, 4).exists() and not _temporaries(tmp_path)


def test_disk_full_while_writing_sample_files_keeps_the_previous_ones(tmp_path, monkeypatch):
    import numpy as np

    from difflab.sampling import write_outputs
    from difflab.utils.errors import DiskFullError

    samples = torch.rand(4, 1, 8, 8) * 2 - 1
    write_outputs(tmp_path, samples, torch.arange(4))
    kept = _snapshot(tmp_path / "samples.npz")
    monkeypatch.setattr(np, "savez", _fill_disk_after(1000))
    with pytest.raises(DiskFullError) as err:
        write_outputs(tmp_path, samples.flip(0), torch.arange(4))
    assert str(err.value).startswith(
        f"no space left on the device while writing {tmp_path / 'samples.npz'} (No "
        f"space left on device): its previous version (if any) is intact"
    )
    assert _snapshot(tmp_path / "samples.npz") == kept and not _temporaries(tmp_path)


def test_disk_full_at_rename_or_fsync_is_one_line_and_atomic(tmp_path, monkeypatch):
    from difflab.ops import atomic
    from difflab.utils.errors import DiskFullError

    target = tmp_path / "final_metrics.json"
    atomic.atomic_write(target, lambda tmp: tmp.write_text("old"))
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "quota")))
    with pytest.raises(DiskFullError, match=f"while writing {target} \\(quota\\)"):
        atomic.atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "old" and not _temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------- 4. corrupt data
def _image_folder(root: Path, n: int = 6) -> Path:
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 255 - 40 * i, 90)).save(root / f"img{i}.png")
    bad = root / "img3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG: the header reads, the pixels do not
    return bad


def test_corrupt_image_is_one_line_or_skipped_and_counted(tmp_path, caplog):
    from torch.utils.data import DataLoader

    from difflab.datamodules.image_folder import ImageFolderDataModule
    from difflab.utils.cli import worker_error_line
    from difflab.utils.errors import CorruptDataError

    bad = _image_folder(tmp_path / "images")
    args = dict(image_size=8, val_fraction=0.0, flip=False, batch_size=6, pin_memory=False, persistent_workers=False)
    expected = f"{bad}: cannot decode image (image file is truncated"

    dm = ImageFolderDataModule(tmp_path / "images", num_workers=1, **args)  # on_bad_item: error (the default)
    dm.setup("fit")
    with pytest.raises(CorruptDataError) as err:  # raised in a loader worker: torch wraps it with the traceback
        next(iter(DataLoader(dm.train_set, batch_size=6, num_workers=1)))
    line = worker_error_line(err.value)
    assert line.startswith(expected) and line.endswith("or set datamodule.on_bad_item=skip to skip unreadable images")
    assert "\n" not in line

    dm = ImageFolderDataModule(tmp_path / "images", num_workers=0, on_bad_item="skip", **args)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (6, 3, 8, 8)  # the bad image was replaced, the batch is whole
    assert dm.data_report() == {"train": {"images": 6, "unreadable_files": 1}}
    assert f"datamodule.on_bad_item=skip: skipping {expected}" in caplog.text


def test_on_bad_item_is_checked_at_start(tmp_path):
    from difflab.config_checks import ensure_valid
    from difflab.utils.errors import ConfigError

    cfg = compose_train(
        tmp_path,
        tiny_overrides(
            extra=["datamodule=image_folder", "datamodule.image_size=8", "datamodule.on_bad_item=sometimes"]
        ),
    )
    with pytest.raises(ConfigError, match=r"datamodule\.on_bad_item=sometimes is invalid: .*error.*skip"):
        ensure_valid(cfg, "train")


H2S_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART\tEND\tSENTENCE"


def test_malformed_annotation_row_is_skipped_and_counted_or_one_line(tmp_path):
    from difflab.datamodules.sign_video import read_how2sign_index
    from difflab.utils.errors import CorruptDataError

    clips = tmp_path / "train_rgb_front_clips" / "raw_videos"
    clips.mkdir(parents=True)
    rows = [H2S_HEADER.encode()]
    for i in range(3):
        (clips / f"v{i}_0-rgb_front.mp4").write_bytes(b"")  # indexing checks names only
        text = "caf\xe9 sentence".encode("latin-1") if i == 1 else f"sentence {i}".encode()  # row 1: not UTF-8
        rows.append(b"\t".join([f"v{i}".encode(), b"x", b"y", f"v{i}_0-rgb_front".encode(), b"0", b"1", text]))
    rows.append(b"v9\t" + b"z" * 200_000)  # a field over the csv module's limit
    csv_path = tmp_path / "how2sign_train.csv"
    csv_path.write_bytes(b"\n".join(rows) + b"\n")

    report = read_how2sign_index(tmp_path, "train")
    assert [r.text for r in report.records] == ["sentence 0", "sentence 2"]
    assert [(line, why) for _, line, why in report.malformed] == [
        (3, "not UTF-8 text"),
        (5, "unreadable row (field larger than field limit (131072))"),
    ]
    with pytest.raises(CorruptDataError) as err:
        read_how2sign_index(tmp_path, "train", strict=True)
    assert str(err.value) == f"{csv_path}:3: not UTF-8 text; fix the row or set strict=false to skip it"


# ---------------------------------------------------------------------------------------------- 5. divergence
class PoisonWeights(L.Callback):
    """Makes one weight NaN after the optimizer step of ``step`` (an update that overflowed)."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            next(iter(pl_module.parameters())).data.view(-1)[0] = float("nan")


def test_diverging_run_stops_in_one_line_and_never_saves_nan_weights(tmp_path, capsys):
    from difflab.checkpoints import load_checkpoint

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    code, errors, out = _console(
        [*_tiny(run, max_steps=8), "logger=none", f"+callbacks.poison._target_={__name__}.PoisonWeights"], capsys
    )
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(
        f"error: training diverged: NaN or inf weights, not saved, at step 4; the last good checkpoint is {last}; "
    )
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (run / "checkpoints" / "step_0000004.ckpt").exists() and not _temporaries(run)


def test_disk_full_while_creating_a_latent_memory_map_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    """The map's blocks are reserved when it is created, so a full disk fails there (not with SIGBUS at a later
    write into a sparse file); a file system without fallocate keeps the sparse map."""
    import errno

    from difflab.latents.encode import open_map
    from difflab.utils.errors import DiskFullError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"latents.npy \(No space left on device\)"):
        open_map(tmp_path / "latents.npy", True, np.float16, (8, 4))
    assert not (tmp_path / "latents.npy").exists()

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    assert open_map(tmp_path / "latents.npy", True, np.float16, (8, 4)).shape == (8, 4)
