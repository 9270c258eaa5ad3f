"""Loading difflab checkpoints safely and rebuilding their models from the stored config.

Two on-disk formats are read:
- Lightning checkpoints (``*.ckpt``), always with ``torch.load(weights_only=True)``: ``state_dict`` holds the EMA
  weights when EMA was on, ``current_model_state`` the raw ones, ``difflab.config`` the resolved run config.
  Sharded checkpoints of ``trainer=fsdp`` (a ``.ckpt`` file pointing to its ``.shards-*`` directory, or a Lightning
  sharded directory) are consolidated on read into that same layout (``difflab.ops.fsdp``);
- exports written by ``export.py`` (a directory or its ``model.safetensors``): EMA weights as safetensors, the run
  config in the safetensors metadata and in ``config.yaml`` beside it. Safetensors never runs code.

A stored config is data written by someone else: ``module_from_checkpoint`` builds it through the trust gate
(``difflab.trust.check_config``), which refuses targets outside the allowlist and interpolations (``${...}``).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from difflab.ops.fsdp import read_sharded_checkpoint, sharded_checkpoint_dir
from difflab.registry import GUIDANCE_CLASSES, GUIDANCE_SETTINGS
from difflab.trust import check_config
from difflab.utils.errors import CheckpointError, DifflabError, instantiate_reporting

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_FORMAT = "difflab-export-v1"


KEPT_GUIDE_KEY = "kept_guide"  # checkpoint key / export tensor prefix of the kept autoguidance guide


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; missing, corrupt or unsafe files raise one-line CheckpointErrors.
    A sharded checkpoint (``trainer=fsdp``: its committed ``.ckpt`` file or its shard directory) is consolidated into
    the single-file layout (``load_sharded_checkpoint``)."""
    path = Path(path)
    if path.is_dir() and is_sharded_checkpoint(path):
        return load_sharded_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check ckpt_path)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "GLOBAL" in msg or "Unsupported global" in msg or "global" in msg.lower():
            what = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "global" in ln.lower()), "")
            raise CheckpointError(
                f"refusing to load {path}: it pickles arbitrary objects that could run code, and was "
                f"not executed ({what[:160]}); only load checkpoints you trust with other tools"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint, or corrupt") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).splitlines()[0][:120] if str(err) else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt or truncated file ({type(err).__name__}: {first})"
        ) from None
    if isinstance(ckpt, dict) and SHARDED_KEY in ckpt:
        return load_sharded_checkpoint(path, ckpt)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


# ---------------------------------------------------------------------------------------------- sharded (trainer=fsdp)
SHARDED_KEY = "difflab_sharded"  # difflab.ops.fsdp.SHARDED_KEY: a committed sharded checkpoint's pointer to its shards


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A sharded checkpoint written by ``trainer=fsdp`` (its ``.ckpt`` file) or a Lightning sharded checkpoint
    directory (torch.distributed.checkpoint files + ``meta.pt``)."""
    path = Path(path)
    if path.is_dir():
        return (path / "meta.pt").is_file() and (path / ".metadata").is_file()
    if not path.is_file():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and SHARDED_KEY in ckpt


def load_sharded_checkpoint(path: str | Path, metadata: dict | None = None) -> dict[str, Any]:
    """Consolidate a sharded checkpoint on the CPU, without a process group: ``state_dict`` = EMA weights (raw when
    the run had no EMA), ``current_model_state`` = raw, and every metadata entry (step, run config, ...)."""

    path = Path(path)
    shards = sharded_checkpoint_dir(path)
    if shards is None:
        where = (metadata or {}).get(SHARDED_KEY, {}).get("dir", "?")
        raise CheckpointError(
            f"cannot read sharded checkpoint {path}: its shard directory {path.parent / where} "
            f"is missing or incomplete (copy it along with the .ckpt file)"
        )
    try:
        return read_sharded_checkpoint(path, metadata=metadata)
    except DifflabError:
        raise
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as err:
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read sharded checkpoint {path} ({shards.name}): {first}") from None


MOVED_TARGETS = {  # classes (or whole modules) stored configs name by a path they no longer have
    "difflab.lit_modules.lr_schedules": "difflab.optim.lr_schedules",
    "difflab.diffusion.schedules.DiscreteSchedule": "difflab.diffusion.processes.VPProcess",
}
LEGACY_OPTIMIZER_KEYS = ("betas", "weight_decay", "eps")
LEGACY_SCHEDULE_KEYS = {
    "warmup_steps": "warmup",
    "warmup_start_factor": "start_factor",
    "final_lr_fraction": "final_fraction",
}
LEGACY_DIFFUSION_KEYS = (
    "process",
    "objective",
    "sampler",
    "conditioner",
    "autoencoder",
    "sample_shape",
    "p_uncond",
    "class_names",
    "prompts",
)


def _renamed(target: str) -> str:
    if target.startswith("src."):  # before the package was named difflab
        target = "difflab." + target[len("src.") :]
    module, _, name = target.rpartition(".")
    return f"{MOVED_TARGETS[module]}.{name}" if module in MOVED_TARGETS else MOVED_TARGETS.get(target, target)


def _rename_targets(config: Any) -> None:
    if isinstance(config, dict):
        if isinstance(config.get("_target_"), str):
            config["_target_"] = _renamed(config["_target_"])
        for value in config.values():
            _rename_targets(value)
    elif isinstance(config, list):
        for value in config:
            _rename_targets(value)


def _guidance_object(guidance: dict | None) -> dict:
    """A guidance dict of before the guidance objects (method name and keys) as its class's config."""
    guidance = dict(guidance or {})
    if "_target_" in guidance:
        return guidance
    method = guidance.pop("method", "cfg")  # absent: saved before the method registry, so cfg
    keys = GUIDANCE_SETTINGS[method]
    return {
        "_target_": f"difflab.diffusion.guidance.{GUIDANCE_CLASSES[method]}",
        **{k: v for k, v in guidance.items() if k in keys},
    }


def _nested_diffusion_module(model: dict) -> dict:
    """A DiffusionModule config of before the Diffusion object (22 flat keys) in today's layout."""
    model = dict(model)
    if "schedule" in model and model.get("process") is None:  # the process axis's first name
        model["process"] = model.pop("schedule")
    model.pop("schedule", None)
    diffusion = {
        "_target_": "difflab.diffusion.system.Diffusion",
        **{k: model.pop(k) for k in LEGACY_DIFFUSION_KEYS if k in model},
        "guidance": _guidance_object(model.pop("guidance", None)),
    }
    optimizer = {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        **{k: model.pop(k) for k in LEGACY_OPTIMIZER_KEYS if k in model},
    }
    schedule = {
        "_target_": "difflab.optim.lr_schedules.WarmupCosine",
        **{new: model.pop(old) for old, new in LEGACY_SCHEDULE_KEYS.items() if old in model},
    }
    return {**model, "diffusion": diffusion, "optimizer": optimizer, "lr_schedule": schedule}


def migrate_config(config: Any) -> Any:
    """Bring a stored run config to today's layout (in place, and returned), so every checkpoint and export ever
    written loads: renamed classes (``MOVED_TARGETS``, the ``src.`` package), the ``schedule`` alias of the process,
    and the flat DiffusionModule keys of before the ``Diffusion`` object, optimizer and LR-schedule groups."""
    _rename_targets(config)
    model = config.get("model") if isinstance(config, dict) else None
    if (
        isinstance(model, dict)
        and str(model.get("_target_", "")).endswith(".DiffusionModule")
        and "diffusion" not in model
    ):
        config["model"] = _nested_diffusion_module(model)
    return config


def run_config(ckpt: dict, path: str | Path = "<checkpoint>") -> dict:
    """The resolved training config stored in a difflab checkpoint."""
    cfg = (ckpt.get("difflab") or {}).get("config")
    if not cfg:
        raise CheckpointError(
            f"{path} has no difflab config (checkpoint['difflab']['config']); was it written by train.py?"
        )
    return migrate_config(cfg)


# ---------------------------------------------------------------------------------------------- exports (safetensors)
def is_export(path: str | Path) -> bool:
    """True for an export directory (holding model.safetensors) or a ``.safetensors`` file."""
    path = Path(path)
    return path.suffix == ".safetensors" or (path.is_dir() and (path / EXPORT_WEIGHTS).is_file())


def load_export(path: str | Path) -> dict[str, Any]:
    """Read an export: ``{"state_dict": EMA weights, "config": run config, "metadata": header strings}``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    weights = path / EXPORT_WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"export not found: {weights} (ckpt_path must be an export dir or a .safetensors file)")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {weights}: corrupt or truncated safetensors file "
            f"({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})"
        ) from None
    if "difflab_config" in metadata:
        config = json.loads(metadata["difflab_config"])
    elif (weights.parent / EXPORT_CONFIG).is_file():
        config = OmegaConf.to_container(OmegaConf.load(weights.parent / EXPORT_CONFIG), resolve=False)
    else:
        raise CheckpointError(
            f"{weights} has no difflab config (no 'difflab_config' metadata, no {EXPORT_CONFIG} "
            f"beside it); was it written by export.py?"
        )
    return {"state_dict": state, "config": migrate_config(config), "metadata": metadata}


def load_weights(path: str | Path) -> dict[str, Any]:
    """Weights of a checkpoint or an export: ``{"raw", "ema", "config", "step", "path"}`` (raw == ema when EMA was
    off or for exports, which hold EMA weights only)."""
    if is_export(path):
        exp = load_export(path)
        step = exp["metadata"].get("global_step")
        state, kept = split_kept_guide(exp["state_dict"], exp["metadata"])
        return {
            "raw": state,
            "ema": state,
            "config": exp["config"],
            "step": int(step) if step is not None else None,
            "path": str(path),
            KEPT_GUIDE_KEY: kept,
        }
    ckpt = load_checkpoint(path)
    raw = drop_compiled_aliases(ckpt.get("current_model_state") or ckpt["state_dict"])
    return {
        "raw": raw,
        "ema": drop_compiled_aliases(ckpt["state_dict"]),
        "config": run_config(ckpt, path),
        "step": ckpt.get("global_step"),
        "path": str(path),
        "checkpoint": ckpt,
        KEPT_GUIDE_KEY: ckpt.get(KEPT_GUIDE_KEY),
    }


def split_kept_guide(tensors: dict[str, Any], metadata: dict[str, str]) -> tuple[dict[str, Any], dict | None]:
    """An export's tensors without the kept autoguidance guide (``kept_guide.*``), and that guide's state (or None)."""
    prefix = KEPT_GUIDE_KEY + "."
    kept = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    if not kept:
        return rest, None
    return rest, {"step": int(metadata.get("kept_guide_step", -1)), "state_dict": kept}


# ---------------------------------------------------------------------------------------------- state-dict matching
def drop_compiled_aliases(state_dict: dict) -> dict:
    """Drop alias entries (a ``torch.compile`` wrapper's ``*._orig_mod.*`` or an older ``_net.*`` alias of the
    denoiser) that share storage with a canonical entry, so checkpoints of compiled and eager models load into each
    other and into the current module layout."""

    def is_alias(k: str) -> bool:
        return "_orig_mod." in k or k.startswith("_net.")

    ptrs = {v.data_ptr() for k, v in state_dict.items() if not is_alias(k) and torch.is_tensor(v) and v.numel()}
    return {
        k: v
        for k, v in state_dict.items()
        if not (is_alias(k) and torch.is_tensor(v) and v.numel() and v.data_ptr() in ptrs)
    }


def _aliases(module: nn.Module) -> dict[str, set[str]]:
    """State-dict keys that name the same tensor (e.g. ``denoiser.*`` and a compiled ``_net._orig_mod.*``)."""
    groups: dict[int, list[str]] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(v), []).append(k)
    return {k: set(ks) - {k} for ks in groups.values() for k in ks}


def compare_state_dict(module: nn.Module, state_dict: dict) -> dict[str, list]:
    """Keys of ``state_dict`` against the module: ``missing`` / ``unexpected`` (key, shape) and ``mismatched``
    (key, checkpoint shape, model shape); keys aliasing a loaded tensor are not missing."""
    own = module.state_dict()
    aliases = _aliases(module)

    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else None

    mismatched = [
        (k, shape(v), shape(own[k]))
        for k, v in state_dict.items()
        if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    missing = [
        (k, shape(own[k])) for k in own if k not in state_dict and not (aliases.get(k, set()) & state_dict.keys())
    ]
    unexpected = [(k, shape(v)) for k, v in state_dict.items() if k not in own]
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def format_key_table(report: dict[str, list], title: str = "") -> str:
    """The missing / unexpected / shape-mismatched keys of ``compare_state_dict`` as an aligned text table."""
    rows = [("status", "key", "checkpoint", "model")]
    rows += [("missing", k, "-", str(s)) for k, s in report["missing"]]
    rows += [("unexpected", k, str(s), "-") for k, s in report["unexpected"]]
    rows += [("mismatched", k, str(a), str(b)) for k, a, b in report["mismatched"]]
    if len(rows) == 1:
        return f"{title}all keys match" if title else "all keys match"
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [title.rstrip()] if title else []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_state_dict_checked(
    module: nn.Module, state_dict: dict, path: str | Path = "<checkpoint>", strict: bool = True
) -> dict[str, list]:
    """Load weights. Strict: any missing / unexpected / shape-mismatched key raises a CheckpointError listing them.
    Non-strict: load the tensors that match and return the report (``format_key_table`` prints it)."""
    report = compare_state_dict(module, state_dict)
    missing, unexpected, mismatched = report["missing"], report["unexpected"], report["mismatched"]
    if strict and (missing or unexpected or mismatched):

        def show(items):
            keys = [f"{it[0]} {it[1]} vs model {it[2]}" if len(it) == 3 else it[0] for it in items]
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        raise CheckpointError(
            f"{path} does not match the model architecture: missing {len(missing)} [{show(missing)}]; "
            f"unexpected {len(unexpected)} [{show(unexpected)}]; shape-mismatched {len(mismatched)} [{show(mismatched)}]"
            f"; use a checkpoint of the same model config (or init_strict=false to load what matches)"
        )
    own = module.state_dict()
    ok = {k: v for k, v in state_dict.items() if k in own and not (hasattr(v, "shape") and v.shape != own[k].shape)}
    module.load_state_dict(ok, strict=False)
    report["loaded"] = sorted(ok)
    return report


# ---------------------------------------------------------------------------------------------- rebuilding models
def module_from_checkpoint(
    path: str | Path, overrides: dict | None = None, map_location="cpu", trusted: bool | None = None
) -> nn.Module:
    """Rebuild the LightningModule a checkpoint (or an export) was trained with and load its EMA weights. The stored
    config passes the trust gate first (``trusted``: see ``difflab.trust``); ``overrides`` are the caller's own."""
    weights = load_weights(path)
    cfg = OmegaConf.create(check_config(weights["config"], path, trusted=trusted))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    if "model" not in cfg:
        raise CheckpointError(f"{path}: the stored config has no 'model' section")
    module = instantiate_reporting(cfg.model)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    load_state_dict_checked(module, weights["ema"], path)
    restore_kept_guide(module, weights.get(KEPT_GUIDE_KEY), path)
    return module.to(map_location).eval()


def restore_kept_guide(module: nn.Module, state: dict | None, path: str | Path) -> None:
    """Hand a checkpoint's kept autoguidance guide to the module's guidance (when it guides with a kept guide)."""
    guidance: Any = getattr(getattr(module, "diffusion", None), "guidance", None)
    if state is None or guidance is None or not getattr(guidance, "uses_kept_guide", False):
        return
    try:
        guidance.keep(state["state_dict"], state["step"], like=module)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: its kept guide does not fit its own model ({str(err).splitlines()[0]})"
        ) from None
