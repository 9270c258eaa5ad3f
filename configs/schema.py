"""Allowed values of the top-level keys of each primary config (train.yaml, sample.yaml, export.yaml, report.yaml,
encode_latents.yaml), checked by difflab.config_checks before a job starts. Groups have their own
configs/<group>/schema.py; `sample.yaml`'s `guidance` block is no group, so its rules are here."""
from pathlib import Path

from difflab.config_checks import (Rule, any_of, boolean, device, directory_path, existing_file, existing_path,
                                   integer, list_of, non_negative, one_of, optional, positive, probability,
                                   sigma_interval, string)

EXPORT_WEIGHTS = "model.safetensors"


def _checkpoint_found(value) -> bool:
    """What src/checkpoints.py loads: an export (a directory holding model.safetensors, or a .safetensors file) or a
    checkpoint file."""
    path = Path(value)
    if path.is_dir():
        return (path / EXPORT_WEIGHTS).is_file()
    return isinstance(value, str) and path.is_file()


def _not_found(key: str, value) -> str:
    """The loaders' own lines for a missing checkpoint / export (src/checkpoints.py), now given before anything is
    written."""
    if not isinstance(value, str):
        return f"{key}={value} is invalid: {CHECKPOINT.allowed}"
    path = Path(value)
    if path.suffix == ".safetensors":
        return f"export not found: {path} (ckpt_path must be an export dir or a .safetensors file)"
    return f"checkpoint not found: {path} (check ckpt_path)"


CHECKPOINT = Rule(_checkpoint_found, "an existing checkpoint (*.ckpt), export directory or model.safetensors") \
    .reported_as(_not_found)
SPLITS = ("train", "val", "test")

TRAIN = {
    "task_name": string(nonempty=True),
    "tags": optional(list_of(string())),
    "seed": optional(integer(min=0, max=2**32 - 1)),       # Lightning's seed_everything bounds
    # `last`: <run>/checkpoints/last.ckpt of hydra.run.dir (src/ops/resume.py reports a missing one in one line)
    "ckpt_path": optional(any_of(one_of(["last", ""]), existing_file())).described_as(
        "last, an existing checkpoint file or null").reported_as(
        lambda key, value: f"ckpt_path={value}: no checkpoint at {Path(str(value))}"),   # src/ops/resume.py's line
    "resume": optional(one_of(["auto", "never"])),
    "init_from": optional(existing_path()).described_as("an existing checkpoint or export (file or directory) "
                                                         "or null"),
    "init_strict": boolean(),
}

SAMPLE = {
    "task_name": string(nonempty=True),
    "ckpt_path": CHECKPOINT,
    "n": integer(min=1),
    "out_dir": directory_path(),
    "batch_size": integer(min=1),
    "labels": optional(list_of(integer(min=0))),            # upper bound: the checkpoint's classes (checked on load)
    "prompts": optional(list_of(string())),
    "seed": integer(),
    "device": device(),
    # diffusers convention: 1 = no guidance, 0 = unconditional (src/diffusion/guidance.py); null = the checkpoint's
    "guidance.scale": optional(non_negative()),
    "guidance.rescale": optional(probability()),
    "guidance.interval": optional(sigma_interval()),
}

EXPORT = {
    "task_name": string(nonempty=True),
    "ckpt_path": CHECKPOINT,
    "out_dir": directory_path(),
    "weights": one_of(["ema", "raw"]),
}

REPORT = {
    "task_name": string(nonempty=True),
    "ckpt_path": CHECKPOINT,
    "out_dir": directory_path(),
    "device": device(),
    "figures": optional(list_of(string(nonempty=True))),
    "class_grid": boolean(),
    "metrics": boolean(),
    "val_batches": optional(integer(min=1)),
}

ENCODE_LATENTS = {
    "task_name": string(nonempty=True),
    "out_dir": directory_path(),
    "splits": Rule(lambda v: isinstance(v, list) and "train" in v and all(s in SPLITS for s in v),
                   "a list of splits from train, val, test that includes train (normalisation comes from it)"),
    "batch_size": integer(min=1),
    "num_workers": integer(min=0),
    "dtype": one_of(["float16", "float32"]),
    "target_std": positive(),
    "per_channel": boolean(),
    "overwrite": boolean(),
    "device": device(),
    "progress": boolean(),
}


def resume_xor_init(cfg: dict):
    """init_from starts a new run from old weights, ckpt_path resumes the old run: not both."""
    if cfg.get("init_from") and cfg.get("ckpt_path"):
        return "init_from", "null when ckpt_path is set (init_from starts a new run, ckpt_path resumes one)"


def sampler_steps_fit_schedule(cfg: dict):
    """A sampler cannot take more steps than the schedule has timesteps."""
    steps = (cfg.get("sampler") or {}).get("steps")
    total = (cfg.get("process", cfg.get("schedule")) or {}).get("num_timesteps")   # discrete (vp) processes only
    if isinstance(steps, int) and isinstance(total, int) and 2 <= total < steps:
        return "sampler.steps", f"an integer in [1, {total}] (schedule.num_timesteps={total})"


def sampler_defined_on_process(cfg: dict):
    """DDPM's ancestral chain exists on the discrete vp process only; EDM's churn needs a continuous process."""
    sampler, process = cfg.get("sampler") or {}, cfg.get("process") or {}
    discrete = str(process.get("_target_", "")).endswith("DiscreteSchedule")
    name = str(sampler.get("_target_", "")).rsplit(".", 1)[-1]
    if name == "ddpm" and process.get("_target_") and not discrete:
        kind = str(process["_target_"]).rsplit(".", 1)[-1]
        return "sampler._target_", f"sampler=ddim, euler, heun or dpmpp_2m with {kind} (ddpm needs process=vp)"
    if discrete and isinstance(sampler.get("s_churn"), (int, float)) and sampler["s_churn"] > 0:
        return "sampler.s_churn", "0 with process=vp (churn needs a continuous process: edm or flow)"


RULES = {"train": TRAIN, "sample": SAMPLE, "export": EXPORT, "report": REPORT, "encode_latents": ENCODE_LATENTS}
CHECKS = {"train": [resume_xor_init, sampler_steps_fit_schedule, sampler_defined_on_process]}
