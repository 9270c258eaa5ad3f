"""Checkpoint safety: atomic writes survive kill -9 mid-write, pickled code is never executed, exports round-trip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.checkpoints import load_checkpoint, load_export, load_weights, module_from_checkpoint
from difflab.ops.atomic import atomic_torch_save, remove_stale_temporaries
from difflab.ops.checkpoint_io import AtomicCheckpointIO
from difflab.utils.errors import CheckpointError
from tests.helpers import ROOT, compose_train, run_hydra_main, tiny_overrides

torch.set_num_threads(1)

# A child process saves v1 atomically, then starts saving v2 through a torch.save that writes half of the bytes,
# announces it (marker file) and blocks: the test SIGKILLs it mid-write.
WRITER = textwrap.dedent("""
    import io, os, sys, time, torch
    from difflab.ops.atomic import atomic_torch_save
    target, marker, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    atomic_torch_save({"state_dict": {"w": torch.ones(4096)}, "version": 1}, target)
    real_save = torch.save
    def half_then_block(obj, f):  # f: a path (plain torch.save) or the open file atomic_torch_save writes through
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        with (open(f, "wb") if isinstance(f, str) else f) as fh:
            fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
            open(marker, "w").close()
            time.sleep(600)
            fh.write(data[len(data) // 2:])
    torch.save = half_then_block
    v2 = {"state_dict": {"w": torch.zeros(4096)}, "version": 2}
    if mode == "atomic":
        atomic_torch_save(v2, target)
    else:  # what a plain in-place torch.save does
        torch.save(v2, target)
""")


def _kill_during_write(tmp_path: Path, mode: str) -> Path:
    target, marker = tmp_path / mode / "last.ckpt", tmp_path / mode / "writing"
    target.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(marker), mode], cwd=ROOT, env=env)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, f"writer exited early ({proc.returncode})"
        assert time.time() - t0 < 120, "writer never reached the second save"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return target


def test_kill_during_checkpoint_write_keeps_previous_last_ckpt(tmp_path):
    target = _kill_during_write(tmp_path, "atomic")
    ck = torch.load(target, weights_only=True)
    assert ck["version"] == 1 and torch.equal(ck["state_dict"]["w"], torch.ones(4096))
    leftovers = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")  # the half-written temporary
    assert remove_stale_temporaries(target.parent) == leftovers and target.is_file()

    # control: writing in place, the same kill leaves a truncated last.ckpt that no longer loads
    broken = _kill_during_write(tmp_path, "in_place")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*last\.ckpt: corrupt or truncated"):
        load_checkpoint(broken)


def test_atomic_save_failure_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {}, "v": 1}, path)

    def failing_save(obj, f):  # f: the open temporary file atomic_torch_save writes through
        f.write(b"partial")
        raise OSError("write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="write failed"):
        atomic_torch_save({"state_dict": {}, "v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoint_io_plugin_saves_atomically_and_loads_weights_only(tmp_path, monkeypatch):
    import difflab.ops.checkpoint_io as cio

    calls = []
    monkeypatch.setattr(cio, "atomic_torch_save", lambda obj, p: calls.append(p) or atomic_torch_save(obj, p))
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "global_step": 3}, path)
    assert calls == [str(path)]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(3.0))
    with pytest.raises(ValueError, match="weights_only=False"):
        io.load_checkpoint(path, weights_only=False)


# ---------------------------------------------------------------------------------------------- malicious pickles
class _Payload:
    """Unpickling this runs code (writes a marker file): what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _malicious(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.pwned"
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "difflab": {"config": {}}, "x": _Payload(marker)}, path)
    return path, marker


def test_malicious_checkpoint_is_refused_and_never_executed(tmp_path):
    path, marker = _malicious(tmp_path, "evil")
    for load in (load_checkpoint, module_from_checkpoint, load_weights, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.ckpt.*not executed") as err:
            load(path)
        assert "\n" not in str(err.value)
    assert not marker.exists()
    # control: an unsafe load of the same file does run the payload
    control, control_marker = _malicious(tmp_path, "control")
    torch.load(control, weights_only=False)
    assert control_marker.read_text() == "pwned"


def test_training_resume_from_malicious_checkpoint_is_refused(tmp_path):
    from difflab.pipeline import train

    path, marker = _malicious(tmp_path, "resume")
    cfg = compose_train(tmp_path / "run", tiny_overrides(extra=["logger=none", f"ckpt_path={path}"]))
    with pytest.raises(CheckpointError, match="refusing to load"):
        train(cfg)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from difflab.pipeline import train

    out = tmp_path_factory.mktemp("trained")
    train(
        compose_train(
            out, tiny_overrides(max_steps=3, save_every=3, extra=["logger=none", "+callbacks.class_grid.at_end=false"])
        )
    )
    return out / "checkpoints" / "step_0000003.ckpt"


def _sample(tmp_path: Path, ckpt: str, name: str) -> dict:
    from difflab.sampling import run_sampling

    cfg = compose_train(
        tmp_path / name,
        [f"ckpt_path={ckpt}", f"out_dir={tmp_path / name}", "n=6", "batch_size=6", "device=cpu", "sampler.steps=2"],
        config_name="sample",
    )
    run_sampling(cfg)
    return dict(np.load(tmp_path / name / "samples.npz"))


def test_export_writes_ema_safetensors_and_config_and_samples_the_same(trained, tmp_path):
    from safetensors.torch import load_file

    ck = load_checkpoint(trained)
    out = tmp_path / "export"
    from difflab.ops.export import export_checkpoint

    paths = export_checkpoint(trained, out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "config.json"}
    tensors = load_file(paths["weights"])
    assert tensors.keys() == ck["state_dict"].keys()
    assert all(torch.equal(tensors[k], ck["state_dict"][k]) for k in tensors)  # the EMA weights
    assert any(not torch.equal(tensors[k], ck["current_model_state"][k]) for k in tensors)  # not the raw ones
    exp = load_export(out)
    assert exp["config"]["model"]["net"]["base_channels"] == 8 and exp["metadata"]["global_step"] == "3"
    assert not list(out.glob(".*.tmp"))

    a = _sample(tmp_path, str(trained), "from_ckpt")
    b = _sample(tmp_path, str(out), "from_dir")
    c = _sample(tmp_path, str(paths["weights"]), "from_file")
    assert a["images"].shape == (6, 1, 8, 8) and a["images"].dtype == np.uint8
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["images"], c["images"])
    assert np.array_equal(a["labels"], b["labels"])

    # the weights travel without the config file too (it is also in the safetensors header) ...
    (out / "config.yaml").unlink()
    assert load_export(paths["weights"])["config"] == exp["config"]
    # ... and fine-tuning can start from an export (EMA weights as both raw and EMA)
    w = load_weights(out)
    assert w["raw"] is w["ema"] and w["step"] == 3


def test_export_cli_writes_export_and_fails_in_one_line_naming_the_path(trained, tmp_path, capsys):
    import export

    out = tmp_path / "cli_export"
    assert (
        run_hydra_main(export.main, [f"ckpt_path={trained}", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h1'}"]) == 0
    )
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    missing = tmp_path / "nope.ckpt"
    assert run_hydra_main(export.main, [f"ckpt_path={missing}", f"hydra.run.dir={tmp_path / 'h2'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: checkpoint not found: {missing} (check ckpt_path)"


def test_compiled_and_eager_state_dicts_load_into_each_other():
    from torch import nn

    from difflab.checkpoints import compare_state_dict, drop_compiled_aliases, load_state_dict_checked

    class Compiled(nn.Module):  # what torch.compile registers: the wrapped module under `_orig_mod`
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    class Net(nn.Module):
        def __init__(self, compiled: bool):
            super().__init__()
            self.denoiser = nn.Linear(3, 2)
            if compiled:
                self._net = Compiled(self.denoiser)

    compiled, eager = Net(True), Net(False)
    sd = compiled.state_dict()
    assert "_net._orig_mod.weight" in sd
    clean = drop_compiled_aliases(sd)
    assert sorted(clean) == ["denoiser.bias", "denoiser.weight"]
    load_state_dict_checked(eager, clean)  # compiled -> eager
    assert torch.equal(eager.denoiser.weight, compiled.denoiser.weight)
    fresh = Net(True)
    assert compare_state_dict(fresh, clean)["missing"] == []  # eager -> compiled: aliases are not "missing"
    load_state_dict_checked(fresh, eager.state_dict())
    assert torch.equal(fresh._net._orig_mod.weight, eager.denoiser.weight)


def test_checkpoint_figure_and_export_follow_the_umask(tmp_path):
    """On a shared cluster the group must read what a run writes: under umask 022 the checkpoints, the sample-grid
    figures and an export are 0644 (mkstemp's 0600 is not kept), like Lightning's own writer."""
    import os
    import stat

    from difflab.ops.export import export_checkpoint
    from difflab.pipeline import train

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        train(compose_train(out, tiny_overrides(max_steps=2, save_every=2, extra=["logger=none"])))
        paths = export_checkpoint(out / "checkpoints" / "last.ckpt", tmp_path / "export")
    finally:
        os.umask(old)
    files = [
        out / "checkpoints" / "last.ckpt",
        *sorted((out / "figures").rglob("*.png"))[:1],
        paths["weights"],
        paths["config"],
    ]
    assert len(files) == 4 and all(p.is_file() for p in files)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}
