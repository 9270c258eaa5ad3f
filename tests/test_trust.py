"""The trust gate (docs/SECURITY.md): files difflab did not write in this run (checkpoints, exports, latent caches,
shard sets, sweep directories) run no code and make difflab delete or write nothing outside their own directory.

Each hole gets a planted payload: a marker that must never appear, or a directory that must survive. Payloads are
shown to be live first (plain Hydra / pickle runs them), so a test cannot pass because its payload was broken."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from difflab.trust import (
    ALLOWLIST,
    TRUST_KEY,
    build_stored,
    check_config,
    data_strings,
    literal_string,
    trusting,
    why_not_allowed,
    without_resolvers,
)
from difflab.utils.errors import UntrustedFileError
from tests.helpers import ROOT, run_hydra_main

LEGACY = Path(__file__).parent / "fixtures" / "legacy"  # written by difflab before the gate (make_legacy_fixtures.py)
SECRET_VAR = "DIFFLAB_TEST_SECRET"


def mkdir_payload(marker: Path) -> dict:
    return {"_target_": "os.mkdir", "path": str(marker)}


def spawn_payload(marker: Path) -> dict:
    """The exploit of the report: Hydra's blocklist stops os.system and subprocess.run, not this."""
    return {
        "_target_": "multiprocessing.util.spawnv_passfds",
        "path": {"_target_": "os.fsencode", "filename": shutil.which("touch")},
        "args": ["touch", str(marker)],
        "passfds": [],
    }


PAYLOADS = {
    "os.mkdir": mkdir_payload,
    "spawnv_passfds": spawn_payload,
    # a string that starts with difflab. but resolves to subprocess.Popen (the old autoencoder prefix check)
    "difflab-prefix": lambda m: {"_target_": "difflab.ops.signals.subprocess.Popen", "args": ["touch", str(m)]},
    # a difflab function that is no config target: it removes the directories a manifest names
    "difflab-function": lambda m: {
        "_target_": "difflab.latents.cache.clear_cache",
        "cache_dir": str(m),
        "manifest": {},
    },
}


def wait_absent(marker: Path) -> None:
    """A spawned child would create the marker within a moment: give it that moment, then check."""
    import time

    time.sleep(0.2)
    assert not marker.exists(), f"the payload ran: {marker} exists"


def legacy_checkpoint() -> dict:
    return torch.load(LEGACY / "last.ckpt", map_location="cpu", weights_only=True)


def planted_checkpoint(tmp_path: Path, where: tuple[str, ...], payload: dict, name: str = "evil.ckpt") -> Path:
    """The legacy checkpoint with ``payload`` written into its stored config at ``where``."""
    ckpt = legacy_checkpoint()
    node = ckpt["difflab"]["config"]
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = payload
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ the gate itself
@pytest.mark.parametrize("name", ["os.mkdir", "spawnv_passfds"])
def test_the_payloads_are_live_under_plain_hydra(tmp_path, name):
    import hydra.utils

    marker = tmp_path / "marker"
    hydra.utils.instantiate(PAYLOADS[name](marker))
    import time

    for _ in range(50):
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists()


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_check_config_refuses_each_payload_naming_file_key_and_target(tmp_path, name):
    marker = tmp_path / "marker"
    config = {"model": {"net": {"_partial_": True, **PAYLOADS[name](marker)}}}
    with pytest.raises(UntrustedFileError) as err:
        build_stored(config, tmp_path / "evil.ckpt")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "evil.ckpt") in msg and "model.net._target_" in msg
    assert PAYLOADS[name](marker)["_target_"] in msg and f"{TRUST_KEY}=true" in msg
    wait_absent(marker)


@pytest.mark.parametrize(
    "target, allowed",
    [
        ("difflab.models.unet2d.UNet2D", True),
        ("difflab.diffusion.samplers.heun", True),  # a function in the math package
        ("difflab.latents.cache.load_cache_autoencoder", True),  # a marked builder
        ("lightning.pytorch.callbacks.RichProgressBar", True),
        ("torch.optim.AdamW", True),
        ("torch.nn.Linear", False),
        ("builtins.eval", False),
        ("difflab.trust.literal_string", False),  # a difflab function that is not a config target
        ("lightning.pytorch.utilities.rank_zero.rank_zero_only", False),
    ],
)
def test_allowlist_judges_the_resolved_object(target, allowed):
    from difflab.trust import resolve_target

    assert (why_not_allowed(resolve_target(target)) is None) == allowed


def test_targets_nested_in_lists_args_and_partials_are_checked(tmp_path):
    marker = tmp_path / "m"
    for config in (
        {"a": [{"b": mkdir_payload(marker)}]},
        {"_target_": "difflab.models.unet2d.UNet2D", "_args_": [mkdir_payload(marker)]},
    ):
        with pytest.raises(UntrustedFileError, match=r"_target_ = os.mkdir"):
            check_config(config, "f.yaml")
    with pytest.raises(UntrustedFileError, match="not a dotted import path"):
        check_config({"_target_": ["os", "mkdir"]}, "f.yaml")
    with pytest.raises(UntrustedFileError, match="private"):
        check_config({"_target_": "difflab.trust._refuse"}, "f.yaml")
    assert not marker.exists()


def test_stored_interpolations_are_refused_and_shown_configs_stay_literal(monkeypatch):
    """Hydra's instantiate resolves a config twice, so no escaping makes a stored ``${...}`` safe to build: it is
    refused. Configs that difflab only reads (sweep job configs) keep resolver calls as text, references resolve."""
    monkeypatch.setenv(SECRET_VAR, "hunter2")
    interpolation = f"${{oc.env:{SECRET_VAR}}}"
    with pytest.raises(UntrustedFileError, match=r"f.ckpt: model.net.name holds the interpolation"):
        check_config({"model": {"net": {"name": interpolation}}}, "f.ckpt")
    with pytest.raises(UntrustedFileError, match=r"class_names\[0\] holds the interpolation"):
        data_strings([interpolation], "f", "class_names")
    rng = np.random.default_rng(0)
    pieces = ["\\", "$", "{", "}", "a", f"oc.env:{SECRET_VAR}", ":"]
    texts = ["".join(rng.choice(pieces, size=rng.integers(0, 9))) for _ in range(3000)]
    texts += [interpolation, "\\" + interpolation, "\\\\" + interpolation]
    for text in texts:
        assert OmegaConf.create({"v": literal_string(text)}).v == text
    shown = OmegaConf.create(
        without_resolvers({"seed": [interpolation], "a": 3, "b": "${a}", "c": f"${{a}}-${{oc.env:{SECRET_VAR}}}"})
    )
    assert OmegaConf.to_container(shown, resolve=True) == {
        "seed": [interpolation],
        "a": 3,
        "b": 3,
        "c": f"${{a}}-${{oc.env:{SECRET_VAR}}}",
    }


def test_every_config_difflab_composes_passes_the_gate():
    """What train.py stores in checkpoints, for every experiment and every option of the groups users swap."""
    from difflab.configs import CONFIG_DIR
    from tests.helpers import compose_train

    experiments = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
    swaps = [
        f"{g}={p.stem}"
        for g in ("model", "sampler", "guidance", "callbacks", "logger", "trainer", "process")
        for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))
    ]
    checked = 0
    for overrides in [[f"experiment={e}"] for e in experiments] + [[s] for s in swaps]:
        try:
            plain = OmegaConf.to_container(compose_train("/tmp/run", overrides), resolve=True)
        except Exception:  # noqa: BLE001 - a swap that needs other choices (guidance=autoguidance) is not stored
            continue
        check_config(plain, f"train {' '.join(overrides)}")
        checked += 1
    assert checked >= len(experiments) + 20


# ------------------------------------------------------------------------------------------------ files of today's main
def test_files_written_before_the_gate_load_without_the_flag_and_sample_the_same():
    from difflab.checkpoints import module_from_checkpoint
    from difflab.datamodules.latents import LatentDataModule
    from difflab.datamodules.streaming_latents import StreamingLatentDataModule
    from tests.fixtures.make_legacy_fixtures import reference_samples

    expected = torch.load(LEGACY / "samples.pt", weights_only=True)
    for path in (LEGACY / "last.ckpt", LEGACY / "export", LEGACY / "sharded" / "last.ckpt"):
        module = module_from_checkpoint(path)
        # float32 round-off only (another thread count orders the sums differently): the same images
        torch.testing.assert_close(reference_samples(module), expected, rtol=0, atol=1e-6)
    dm = LatentDataModule(str(LEGACY / "cache"), batch_size=4, num_workers=0)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["x"].shape == (4, 2, 2, 2) and dm.class_names == ["zero", "one", "two"]
    sm = StreamingLatentDataModule(str(LEGACY / "shards"), batch_size=4)
    batch = next(iter(sm.train_dataloader()))
    assert batch["x"].shape == (4, 2, 2, 2) and set(batch["text"]) <= {"a zero", "a one", "a two"}


# ------------------------------------------------------------------------------------------------ 1. stored configs
def test_sample_cli_refuses_a_planted_checkpoint_in_one_line(tmp_path):
    """The report's exploit, as a user would meet it: `python sample.py ckpt_path=<file>`."""
    marker = tmp_path / "marker"
    evil = planted_checkpoint(tmp_path, ("model", "net"), {"_partial_": True, **spawn_payload(marker)})
    out = tmp_path / "samples"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"ckpt_path={evil}",
            f"out_dir={out}",
            "n=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    line = one_line(r.stderr)
    assert f"refusing {evil}: model.net._target_ = multiprocessing.util.spawnv_passfds" in line
    assert f"{TRUST_KEY}=true" in line and not out.exists()
    wait_absent(marker)


@pytest.mark.parametrize("form", ["safetensors-metadata", "config.yaml"])
def test_exports_with_a_planted_config_are_refused(tmp_path, form):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from difflab.checkpoints import module_from_checkpoint

    marker = tmp_path / "marker"
    export = tmp_path / "export"
    shutil.copytree(LEGACY / "export", export)
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["difflab_config"])
    config["model"]["conditioner"] = mkdir_payload(marker)
    if form == "config.yaml":
        del meta["difflab_config"]
        (export / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    else:
        meta["difflab_config"] = json.dumps(config)
    save_file(tensors, str(export / "model.safetensors"), metadata=meta)
    with pytest.raises(UntrustedFileError, match=r"model.diffusion.conditioner._target_ = os.mkdir"):
        module_from_checkpoint(export)
    assert not marker.exists()


def test_trust_flag_loads_a_benign_target_from_outside_difflab(tmp_path, capsys):
    """A researcher's own denoiser class: refused by default (naming the flag), sampled with trust_stored_code."""
    import difflab.sample as sample_cmd
    from difflab.checkpoints import module_from_checkpoint

    own = planted_checkpoint(tmp_path, ("model", "net", "_target_"), "tests.custom_targets.OwnDenoiser", "own.ckpt")
    with pytest.raises(UntrustedFileError, match=r"model.net._target_ = tests.custom_targets.OwnDenoiser"):
        module_from_checkpoint(own)
    module = module_from_checkpoint(own, trusted=True)
    assert type(module.denoiser).__name__ == "OwnDenoiser"
    argv = [f"ckpt_path={own}", f"out_dir={tmp_path / 'out'}", "n=2", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_hydra_main(sample_cmd.main, argv) == 2
    assert f"{TRUST_KEY}=true" in one_line(capsys.readouterr().err) and not (tmp_path / "out").exists()
    assert run_hydra_main(sample_cmd.main, [*argv, f"{TRUST_KEY}=true"]) == 0
    assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (2, 1, 8, 8)


def test_a_guide_checkpoint_passes_the_gate(tmp_path):
    from difflab.checkpoints import module_from_checkpoint

    marker = tmp_path / "marker"
    guide = planted_checkpoint(tmp_path, ("model", "objective"), mkdir_payload(marker), "guide.ckpt")
    module = module_from_checkpoint(LEGACY / "last.ckpt")
    with pytest.raises(UntrustedFileError, match=r"guide.ckpt: model.diffusion.objective._target_ = os.mkdir"):
        module.diffusion.sample(
            module, 2, torch.tensor([0, 1]), guidance={"method": "autoguidance", "guide_ckpt": str(guide), "scale": 2.0}
        )
    assert not marker.exists()


def test_the_stored_sampler_is_rebuilt_through_the_gate(tmp_path):
    from difflab.sampling import resolve_sampler

    marker = tmp_path / "marker"
    with pytest.raises(UntrustedFileError, match=r"evil.ckpt: model.diffusion.sampler._target_ = os.mkdir"):
        resolve_sampler({"_partial_": True, **mkdir_payload(marker)}, {"steps": 3}, str(tmp_path / "evil.ckpt"))
    sampler = resolve_sampler(
        {"_target_": "difflab.diffusion.samplers.heun", "_partial_": True, "steps": 10}, {"steps": 3}, "ok.ckpt"
    )
    assert sampler.keywords["steps"] == 3 and not marker.exists()


def test_report_export_and_eval_refuse_a_planted_checkpoint(tmp_path, capsys):
    import difflab.export as export_cmd
    import difflab.report as report_cmd

    marker = tmp_path / "marker"
    evil = planted_checkpoint(tmp_path, ("datamodule",), mkdir_payload(marker))  # report builds the datamodule
    for main, out in ((report_cmd.main, tmp_path / "report"), (export_cmd.main, tmp_path / "export")):
        code = run_hydra_main(main, [f"ckpt_path={evil}", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"])
        assert code == 2 and "datamodule._target_ = os.mkdir" in one_line(capsys.readouterr().err)
        assert not out.exists()
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval_digits.py"), str(evil), "--n", "10"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "--trust-stored-code" not in r.stderr and "datamodule._target_" in one_line(r.stderr)
    assert not marker.exists()


def test_reconstruct_ema_copies_no_refused_config_forward(tmp_path):
    from difflab.reconstruct_ema import run_section

    marker = tmp_path / "marker"
    infos = [{"difflab": {"config": {"model": mkdir_payload(marker)}}, "path": tmp_path / "snapshot.safetensors"}]
    with pytest.raises(UntrustedFileError, match=r"snapshot.safetensors: model._target_ = os.mkdir"):
        run_section(infos, tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ 2. sharded checkpoints
@pytest.mark.parametrize("pointer", ["ABS", "../victim", "last.ckpt.shards-x/../../victim", "victim"])
def test_a_sharded_pointer_outside_its_directory_is_refused_and_nothing_is_removed(tmp_path, pointer):
    from difflab.checkpoints import load_checkpoint
    from difflab.ops.fsdp import SHARDED_KEY, FSDPStrategy

    victim = tmp_path / "victim"
    shutil.copytree(next((LEGACY / "sharded").glob("last.ckpt.shards-*")), victim)
    run = tmp_path / "run"
    run.mkdir()
    target = str(victim) if pointer == "ABS" else pointer
    torch.save({"global_step": 2, SHARDED_KEY: {"dir": target}}, run / "last.ckpt")
    with pytest.raises(UntrustedFileError, match=r"difflab_sharded.dir"):
        load_checkpoint(run / "last.ckpt")
    with pytest.raises(UntrustedFileError):
        FSDPStrategy.remove_checkpoint(type("S", (), {"is_global_zero": True})(), run / "last.ckpt")
    assert (victim / ".metadata").is_file() and (victim / "__0_0.distcp").is_file()


def test_a_symlinked_shard_directory_is_refused(tmp_path):
    from difflab.checkpoints import load_checkpoint

    shards = next((LEGACY / "sharded").glob("last.ckpt.shards-*")).name
    shutil.copytree(LEGACY / "sharded" / shards, tmp_path / "elsewhere")
    shutil.copy(LEGACY / "sharded" / "last.ckpt", tmp_path / "last.ckpt")
    (tmp_path / shards).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UntrustedFileError, match="symbolic link"):
        load_checkpoint(tmp_path / "last.ckpt")


def test_a_pickle_payload_in_the_shard_index_is_refused(tmp_path):
    from difflab.checkpoints import load_checkpoint
    from tests.custom_targets import Payload

    marker = tmp_path / "marker"
    shutil.copytree(LEGACY / "sharded", tmp_path / "ckpt")
    index = next((tmp_path / "ckpt").glob("last.ckpt.shards-*")) / ".metadata"
    index.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(UntrustedFileError, match=r"\.metadata: its pickle asks for posix.mkdir"):
        load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert not marker.exists()
    pickle.loads(index.read_bytes())  # the payload is live
    assert marker.exists()


def test_a_pickle_payload_in_a_non_tensor_shard_entry_is_refused(tmp_path):
    """DCP's loader unpickles non-tensor entries (optimizer settings) with weights_only=False: checked first."""
    import torch.distributed.checkpoint as dcp

    from difflab.ops.fsdp import verify_shards
    from tests.custom_targets import Payload

    marker = tmp_path / "marker"
    dcp.save(
        {"state_dict": {"w": torch.ones(2)}, "optimizer_0": {"x": Payload(str(marker))}},
        checkpoint_id=tmp_path / "shards",
        no_dist=True,
    )
    assert not marker.exists()
    with pytest.raises(UntrustedFileError, match=r"entry optimizer_0.x is a pickle"):
        verify_shards(tmp_path / "shards")
    assert not marker.exists()
    legit = verify_shards(next((LEGACY / "sharded").glob("last.ckpt.shards-*")))
    assert "state_dict.denoiser.out.weight" in legit.state_dict_metadata or legit.state_dict_metadata


# ------------------------------------------------------------------------------------------------ 3. autoencoders
def test_autoencoder_checkpoints_and_cache_manifests_cannot_name_a_prefixed_popen(tmp_path, capsys):
    import difflab.encode_latents as encode_cmd
    from difflab.autoencoders.loading import load_autoencoder
    from difflab.latents.cache import load_cache_autoencoder

    marker = tmp_path / "marker"
    payload = {"_target_": "difflab.ops.signals.subprocess.Popen", "args": ["touch", str(marker)]}
    ae = tmp_path / "ae.ckpt"
    torch.save({"difflab": {"kind": "autoencoder", "config": payload}, "state_dict": {}}, ae)
    with pytest.raises(
        UntrustedFileError,
        match=r"autoencoder._target_ = difflab.ops.signals.subprocess.Popen "
        r"resolves to subprocess.Popen",
    ):
        load_autoencoder({"ckpt_path": str(ae)})
    code = run_hydra_main(
        encode_cmd.main,
        [
            "autoencoder=kl_vae",
            f"autoencoder.ckpt_path={ae}",
            f"out_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    assert code == 2 and "subprocess.Popen" in one_line(capsys.readouterr().err)
    cache = tmp_path / "legacy_cache"
    shutil.copytree(LEGACY / "cache", cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["autoencoder"]["spec"] = payload
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UntrustedFileError, match=rf"refusing {cache}/manifest.json: autoencoder._target_"):
        load_cache_autoencoder(cache)
    wait_absent(marker)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------ 4. manifest values
def _edited_cache(tmp_path: Path, **changes) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(LEGACY / "cache", cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.update(changes)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return cache


def test_manifest_values_must_be_data(tmp_path):
    from difflab.datamodules.latents import LatentDataModule

    marker = tmp_path / "marker"
    cache = _edited_cache(tmp_path, class_names=mkdir_payload(marker))
    with pytest.raises(UntrustedFileError, match=r"manifest.json: class_names must be a list of strings"):
        LatentDataModule(str(cache))
    (cache / "manifest.json").write_text(
        json.dumps({**json.loads((cache / "manifest.json").read_text()), "class_names": ["a", 3], "prompts": None})
    )
    with pytest.raises(UntrustedFileError, match="found a int"):
        LatentDataModule(str(cache))
    assert not marker.exists()


def test_a_class_name_that_is_an_interpolation_is_refused(tmp_path, monkeypatch):
    """A manifest's (or an image folder's) class name "${oc.env:SECRET}" would be resolved when the model config is
    built and saved: refused in one line, the secret never read."""
    from types import SimpleNamespace

    from difflab.pipeline import fill_from_datamodule
    from difflab.utils.errors import instantiate_reporting
    from tests.helpers import compose_train

    monkeypatch.setenv(SECRET_VAR, "hunter2")
    name = f"${{oc.env:{SECRET_VAR}}}"
    cfg = compose_train(
        tmp_path,
        [
            "datamodule.image_size=8",
            "model.net.base_channels=8",
            "model.net.channel_mults=[1,2]",
            "model.net.attention_levels=[]",
            "model.net.groups=4",
        ],
    )
    dm = SimpleNamespace(
        sample_shape=(1, 8, 8), class_names=[name] + [str(i) for i in range(1, 10)], prompts=None, num_classes=10
    )
    with pytest.raises(UntrustedFileError, match=r"refusing SimpleNamespace: class_names\[0\] holds the interp"):
        fill_from_datamodule(cfg, dm)
    dm.class_names[0] = "zero"
    fill_from_datamodule(cfg, dm)
    assert instantiate_reporting(cfg.model).diffusion.class_names[0] == "zero"
    cache = _edited_cache(tmp_path, prompts=[name, "b", "c"])
    from difflab.datamodules.latents import LatentDataModule

    with pytest.raises(UntrustedFileError, match=r"manifest.json: prompts\[0\] holds the interpolation"):
        LatentDataModule(str(cache))


# ------------------------------------------------------------------------------------------------ 5. shards
def test_the_shard_writer_never_writes_pickle(tmp_path, monkeypatch):
    """litdata stores a text that names an existing file as a pickle: difflab's writer stores it as text."""
    from difflab.storage.litdata_shards import write_shard

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists.txt").write_text("x")
    split = tmp_path / "shards" / "train"
    split.mkdir(parents=True)
    write_shard(split, 0, 4, np.zeros((2, 1, 2, 2), np.float16), np.arange(2), texts=["exists.txt", "b"])
    index = json.loads((split / "0.index.json").read_text())
    assert index["config"]["data_format"] == ["numpy", "int", "str"]


def _planted_shards(tmp_path: Path, marker: Path) -> Path:
    """The legacy shard set with its train split rewritten by plain litdata: texts as pickles of a payload."""
    from litdata.streaming.writer import BinaryWriter

    from tests.custom_targets import Payload

    shards = tmp_path / "shards"
    shutil.copytree(LEGACY / "shards", shards)
    split = shards / "train"
    shutil.rmtree(split)
    split.mkdir()
    writer = BinaryWriter(str(split), chunk_size=8)
    for i in range(8):
        writer[i] = {"z": np.zeros((2, 2, 2), np.float16), "index": i, "label": i % 3, "text": Payload(str(marker))}
    writer.done()
    writer.merge()
    assert json.loads((split / "index.json").read_text())["config"]["data_format"][-1] == "pickle"
    return shards


def test_a_shard_field_stored_as_pickle_is_refused_before_decoding(tmp_path):
    from difflab.datamodules.streaming_latents import StreamingLatentDataModule

    marker = tmp_path / "marker"
    shards = _planted_shards(tmp_path, marker)
    with pytest.raises(UntrustedFileError, match=r"train/index.json: field 'text' is stored as 'pickle'"):
        StreamingLatentDataModule(str(shards), batch_size=4)
    assert not marker.exists()


def test_chunk_names_must_be_bare(tmp_path):
    from difflab.latents.shard_reader import open_shards

    shards = tmp_path / "shards"
    shutil.copytree(LEGACY / "shards", shards)
    index = json.loads((shards / "train" / "index.json").read_text())
    index["chunks"][0]["filename"] = "../../etc/passwd"
    (shards / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UntrustedFileError, match=r"chunks\[\]\.filename is '../../etc/passwd'"):
        open_shards(shards)


# ------------------------------------------------------------------------------------------------ 6. deletes by name
def test_overwrite_removes_only_train_val_test_inside_the_cache(tmp_path):
    from difflab.latents.encode import encode_dataset
    from difflab.latents.shards import cache_to_shards

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    cache = _edited_cache(tmp_path, splits={"train": {"count": 8, "done": 8}, "../victim": {"count": 1}})
    with pytest.raises(UntrustedFileError, match=r"splits names the split '../victim'"):
        encode_dataset(torch.nn.Identity(), object(), cache, overwrite=True, progress=False)
    shards = tmp_path / "shards"
    shutil.copytree(LEGACY / "shards", shards)
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["../victim"] = m["splits"]["val"]
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UntrustedFileError, match="'../victim'"):
        cache_to_shards(LEGACY / "cache", shards, overwrite=True)
    assert (victim / "keep.txt").read_text() == "precious"


def test_clip_shards_overwrite_removes_only_their_own_splits(tmp_path):
    from difflab.datamodules.streaming_clips import CLIP_FORMAT, _prepare_out_dir

    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "clips"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": CLIP_FORMAT, "splits": {"../victim": {}}}))
    with pytest.raises(UntrustedFileError, match="'../victim'"):
        _prepare_out_dir(out, overwrite=True)
    assert victim.is_dir()


# ------------------------------------------------------------------------------------------------ 7. sweeps and links
def test_ablate_never_resolves_a_job_config_and_refuses_a_linked_output(tmp_path, monkeypatch, capsys):
    import yaml

    from difflab.ablate import main

    monkeypatch.setenv(SECRET_VAR, "hunter2")
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["model.lr=1,2"]}}}))
    for num, lr in enumerate((1, 2)):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.lr={lr}"]))
        (job / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "seed": f"${{oc.env:{SECRET_VAR}}}",
                    "callbacks": {"sample_metrics": {"seed": f"${{oc.env:{SECRET_VAR}}}", "n_samples": 100}},
                }
            )
        )
        (job / "final_metrics.json").write_text(
            json.dumps({"status": "completed", "step": 10, "metrics": {"val/loss": 0.5 + lr}})
        )

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["difflab-ablate", *map(str, argv)])
        try:
            main()
            return 0
        except SystemExit as exit_:
            return exit_.code

    assert run(sweep) == 0
    out = capsys.readouterr()
    assert "hunter2" not in out.out + (sweep / "ablation" / "summary.md").read_text()
    shutil.rmtree(sweep / "ablation")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (sweep / "ablation").symlink_to(elsewhere)
    assert run(sweep) == 2
    assert "symbolic link" in one_line(capsys.readouterr().err) and not any(elsewhere.iterdir())


def test_writers_replace_or_refuse_a_planted_link(tmp_path):
    from difflab.diagnostics.video_grid import write_sample_videos
    from difflab.ops.atomic import write_text
    from difflab.utils.logging import append_figure_index

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").symlink_to(victim)
    write_text(out / "report.json", "{}")  # report.py, ablate.py, encode.py's texts.json
    assert victim.read_text() == "precious" and not (out / "report.json").is_symlink()
    (out / "figures.csv").symlink_to(victim)
    with pytest.raises(UntrustedFileError, match="symbolic link"):
        append_figure_index(out, "k", 1, "p.png")
    (out / "videos").mkdir()
    (out / "videos" / "videos.mp4").symlink_to(victim)
    with pytest.raises(UntrustedFileError, match="symbolic link"):
        write_sample_videos(out / "videos", torch.zeros(1, 1, 2, 8, 8), None, fps=4)
    assert victim.read_text() == "precious"


def test_encoding_into_a_cache_with_a_planted_link_is_refused(tmp_path):
    from difflab.latents.encode import open_map

    victim = tmp_path / "victim.npy"
    np.save(victim, np.zeros(4, np.float16))
    before = victim.read_bytes()
    (tmp_path / "latents.npy").symlink_to(victim)
    for fresh in (True, False):
        with pytest.raises(UntrustedFileError, match="symbolic link"):
            open_map(tmp_path / "latents.npy", fresh, np.float16, (4,))
    assert victim.read_bytes() == before


def test_a_text_encoder_folder_with_its_own_code_is_refused_without_running_it(tmp_path):
    """A local encoder folder whose config maps to its own code (`auto_map`): transformers runs that code only with
    trust_remote_code, which difflab never passes."""
    from transformers import AutoConfig, BertConfig

    from difflab.conditioning.text_encoders import load_text_encoder
    from difflab.utils.errors import ConfigError

    marker = tmp_path / "marker"
    folder = tmp_path / "encoder"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    with pytest.raises(ConfigError):
        load_text_encoder(str(folder))
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - the payload is live: asking transformers to trust it runs it
        AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert marker.exists()


def test_allowlist_is_stated_in_the_docs():
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    assert ALLOWLIST in " ".join(text.split()) and TRUST_KEY in text and trusting.__name__ in text
