"""Allowed values of the top-level keys of each primary config (train.yaml, sample.yaml, export.yaml, report.yaml,
encode_latents.yaml), checked by difflab.config_checks before a job starts. Groups have their own
configs/<group>/schema.py; `sample.yaml`'s `guidance` block is no group, so its rules are here."""

import re
from pathlib import Path

from difflab.config_checks import (
    Rule,
    any_of,
    boolean,
    device,
    directory_path,
    existing_file,
    existing_path,
    integer,
    list_of,
    non_negative,
    number,
    one_of,
    optional,
    positive,
    probability,
    sigma_interval,
    string,
)
from difflab.registry import CFGPP_LAMBDA, GUIDANCE_SETTINGS, cfgpp_lambda_ok

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


CHECKPOINT = Rule(
    _checkpoint_found, "an existing checkpoint (*.ckpt), export directory or model.safetensors"
).reported_as(_not_found)
SPLITS = ("train", "val", "test")

TRAIN = {
    "task_name": string(nonempty=True),
    "tags": optional(list_of(string())),
    "seed": optional(integer(min=0, max=2**32 - 1)),  # Lightning's seed_everything bounds
    # `last`: <run>/checkpoints/last.ckpt of hydra.run.dir (src/ops/resume.py reports a missing one in one line)
    "ckpt_path": optional(any_of(one_of(["last", ""]), existing_file()))
    .described_as("last, an existing checkpoint file or null")
    .reported_as(
        lambda key, value: f"ckpt_path={value}: no checkpoint at {Path(str(value))}"
    ),  # src/ops/resume.py's line
    "resume": optional(one_of(["auto", "never"])),
    "init_from": optional(existing_path()).described_as("an existing checkpoint or export (file or directory) or null"),
    "init_strict": boolean(),
    "optimized_metric": optional(string(nonempty=True)).described_as(
        "the name of a logged metric (val/loss, metrics/fd_digit200, ...) or null"
    ),
    "trust_stored_code": boolean(),  # difflab.trust
}

SAMPLE = {
    "task_name": string(nonempty=True),
    "ckpt_path": CHECKPOINT,
    "n": integer(min=1),
    "out_dir": directory_path(),
    "batch_size": integer(min=1),
    "labels": optional(list_of(integer(min=0))),  # upper bound: the checkpoint's classes (checked on load)
    "prompts": optional(list_of(string())),
    "seed": integer(),
    "device": device(),
    # diffusers convention: 1 = no guidance, 0 = unconditional (src/diffusion/guidance.py); null = the checkpoint's
    "guidance.scale": optional(non_negative()),
    "guidance.rescale": optional(probability()),
    "guidance.interval": optional(sigma_interval()),
    "judge": optional(one_of(["digits"])),  # score the samples (sample.py judge=digits)
    "guidance.method": optional(one_of(list(GUIDANCE_SETTINGS))),  # src/diffusion/guidance.py (difflab.registry)
    "guidance.eta": optional(number()),
    "guidance.norm_threshold": optional(non_negative()),
    "guidance.momentum": optional(number(min=-1, max=1, min_open=True, max_open=True)),
    "guidance.cfg_scale": optional(non_negative()),  # autoguidance_cfg
    "guidance.cfg_interval": optional(sigma_interval()),
    "guidance.guide_ckpt": optional(
        any_of(
            one_of(["kept"]),
            Rule(_checkpoint_found, "an existing checkpoint (*.ckpt) or export of the guide model"),
        )
    ),
    "trust_stored_code": boolean(),  # difflab.trust
}

EXPORT = {
    "task_name": string(nonempty=True),
    "ckpt_path": CHECKPOINT,
    "out_dir": directory_path(),
    "weights": one_of(["ema", "raw"]),
    "trust_stored_code": boolean(),  # difflab.trust
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
    "trust_stored_code": boolean(),  # difflab.trust
}

RECONSTRUCT_EMA = {  # src/reconstruct_ema.py; exactly one of sigma_rel / gamma: one_ema_length below
    "task_name": string(nonempty=True),
    "run_dir": existing_path().described_as("an existing run directory (trained with callbacks=posthoc)"),
    "sigma_rel": optional(number(min=0, max=0.3, min_open=True)),
    "gamma": optional(number(min=-0.38)).described_as("a number >= -0.38 (the one-to-one branch of sigma_rel) or null"),
    "step": optional(integer(min=1)),
    "snapshot_dir": optional(existing_path()),
    "out": optional(string(nonempty=True)),
    "overwrite": boolean(),
    "tolerance": number(min=0, max=1, min_open=True),
    "trust_stored_code": boolean(),  # difflab.trust
}

ENCODE_LATENTS = {
    "task_name": string(nonempty=True),
    "out_dir": directory_path(),
    "splits": Rule(
        lambda v: isinstance(v, list) and "train" in v and all(s in SPLITS for s in v),
        "a list of splits from train, val, test that includes train (normalisation comes from it)",
    ),
    "batch_size": integer(min=1),
    "num_workers": integer(min=0),
    "dtype": one_of(["float16", "float32"]),
    "target_std": positive(),
    "per_channel": boolean(),
    "overwrite": boolean(),
    "device": device(),
    "progress": boolean(),
    "format": one_of(["mmap", "shards"]),  # src/latents/shards.py
    "shard_samples": optional(integer(min=1)),
    "shard_seed": optional(integer(min=0)),
    "trust_stored_code": boolean(),  # difflab.trust
}


def sample_guidance_settings(cfg: dict):
    """sample.py's guidance overrides that need each other: CFG++'s lambda in [0, 1], autoguidance's guide (the
    checkpoint's own method and guide are known only once it is loaded: checked there)."""
    g = cfg.get("guidance") or {}
    scale = g.get("scale")
    if g.get("method") == "cfgpp" and isinstance(scale, (int, float)) and not cfgpp_lambda_ok([scale]):
        return "guidance.scale", CFGPP_LAMBDA
    return None


def kept_guide_is_kept(cfg: dict):
    """Autoguidance with ``guide_ckpt: kept`` needs the callback that keeps the guide."""
    if (cfg.get("guidance") or {}).get("guide_ckpt") != "kept" or "diffusion" not in (cfg.get("model") or {}):
        return None  # an autoencoder run has no guidance
    callbacks = [c for c in (cfg.get("callbacks") or {}).values() if isinstance(c, dict)]
    if not any(str(c.get("_target_", "")).endswith(".KeepGuide") for c in callbacks):
        return (
            "guidance.guide_ckpt",
            "kept only with the KeepGuide callback, which keeps the guide (in every callback set but none: add "
            "+callbacks.keep_guide._target_=difflab.callbacks.keep_guide.KeepGuide, or sample with guidance=cfg)",
        )
    return None


def resume_xor_init(cfg: dict):
    """init_from starts a new run from old weights, ckpt_path resumes the old run: not both."""
    if cfg.get("init_from") and cfg.get("ckpt_path"):
        return "init_from", "null when ckpt_path is set (init_from starts a new run, ckpt_path resumes one)"


def sampler_steps_fit_schedule(cfg: dict):
    """A sampler cannot take more steps than the schedule has timesteps."""
    steps = (cfg.get("sampler") or {}).get("steps")
    total = (cfg.get("process", cfg.get("schedule")) or {}).get("num_timesteps")  # discrete (vp) processes only
    if isinstance(steps, int) and isinstance(total, int) and 2 <= total < steps:
        return "sampler.steps", f"an integer in [1, {total}] (schedule.num_timesteps={total})"


def sampler_spacing_fits_process(cfg: dict):
    """sampler.spacing is a spacing name on vp and a grid shift (a number) on flow."""
    spacing = (cfg.get("sampler") or {}).get("spacing")
    target = str((cfg.get("process") or {}).get("_target_", ""))
    if spacing is None or not target.endswith(("FlowProcess", "VPProcess")):
        return None
    is_number = isinstance(spacing, (int, float)) and not isinstance(spacing, bool)
    if target.endswith("FlowProcess") and not is_number:
        return "sampler.spacing", "a number > 0 on process=flow (the sampling grid's shift, e.g. 0.5) or null"
    if target.endswith("VPProcess") and is_number:
        return "sampler.spacing", "leading | trailing | linspace on process=vp (a number is flow's grid shift) or null"
    return None


def patch_divides_image_size(cfg: dict):
    """Patch-based denoisers (DiT, ViViT, UNet3D space-to-depth) need the patch size to divide the image size; the
    denoiser checks it again at build time for data whose size the config does not state (latent caches)."""
    patch = ((cfg.get("model") or {}).get("net") or {}).get("patch_size")
    size = (cfg.get("datamodule") or {}).get("image_size")
    if isinstance(patch, int) and isinstance(size, int) and patch > 0 and size % patch:
        return "model.net.patch_size", f"a divisor of the image size (datamodule.image_size={size})"


def frames_within_temporal_positions(cfg: dict):
    """A video transformer has temporal positions for at most model.net.max_frames frames: the clips' frame count
    and, with variable-length buckets, the longest bucket (else the first long batch fails mid-training)."""
    most = ((cfg.get("model") or {}).get("net") or {}).get("max_frames")
    data = cfg.get("datamodule") or {}
    frames = data.get("num_frames")
    if isinstance(most, int) and isinstance(frames, int) and frames > most:
        return "model.net.max_frames", f"at least the clips' frame count (datamodule.num_frames={frames})"
    buckets = data.get("buckets")
    longest = (
        max(buckets)
        if isinstance(buckets, list) and buckets and all(isinstance(b, int) for b in buckets)
        else data.get("max_frames")
    )
    if isinstance(most, int) and isinstance(longest, int) and longest > most:
        return "model.net.max_frames", (
            f"at least the longest frame bucket ({longest}: datamodule.buckets / datamodule.max_frames)"
        )


PREPARE_CLIPS = {  # src/prepare_clips.py -> src/datamodules/streaming_clips.py
    "task_name": string(nonempty=True),
    "out_dir": directory_path(),
    "splits": Rule(
        lambda v: isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v) and all(s in SPLITS for s in v),
        "a non-empty list of distinct splits from train, val, test",
    ),
    "batch_size": integer(min=1),
    "num_workers": integer(min=0),
    "overwrite": boolean(),
    "progress": boolean(),
    "shard_samples": optional(integer(min=1)),
    "shard_seed": optional(integer(min=0)),
}


RULES = {
    "train": TRAIN,
    "sample": SAMPLE,
    "export": EXPORT,
    "report": REPORT,
    "encode_latents": ENCODE_LATENTS,
    "reconstruct_ema": RECONSTRUCT_EMA,
    "prepare_clips": PREPARE_CLIPS,
}


def _node(cfg: dict, path: str):
    node = _dotted(cfg, path)
    return node if isinstance(node, dict) else None


def targets_take_their_keys(cfg: dict):
    """Every key of the datamodule, the model, its denoiser, its diffusion pieces, the optimizer and the LR schedule
    must be an argument of the class it builds: keys an experiment set for another choice of the group (a UNet's
    channels under model=dit, the pixel datamodule's image_size under datamodule=latents) would otherwise fail deep
    inside instantiation."""
    import importlib
    import inspect

    for path in (
        "datamodule",
        "model",
        "model.net",
        "model.diffusion",
        "process",
        "objective",
        "sampler",
        "guidance",
        "optimizer",
        "lr_schedule",
        "method",
    ):
        node = _node(cfg, path)
        target = node.get("_target_") if node else None
        if not isinstance(target, str) or "." not in target:
            continue
        try:
            module, name = target.rsplit(".", 1)
            params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        except (ImportError, AttributeError, TypeError, ValueError):
            continue  # an unknown target is reported where it is built
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        unknown = sorted(k for k in node if not str(k).startswith("_") and k not in params)
        if unknown:
            return f"{path}.{unknown[0]}", (
                f"not an argument of {name} ({path}._target_); it was set for another "
                f"{path.split('.')[-1]} choice (e.g. by the experiment): drop it with "
                f"~{path}.{unknown[0]} or pick matching options"
            )


# Which callback logs a metrics/* name (src/callbacks/sample_metrics.py, src/callbacks/class_grid.py).
_SAMPLE_METRIC = re.compile(
    r"^metrics/(fd_|kd_|fid|kid|fvd|kvd|precision_|recall_|digit_accuracy|lenet_accuracy|clip_score|lpips_diversity)"
)
_SAMPLE_COUNT = re.compile(
    r"^metrics/(?:fd_[a-z0-9]*?|kd_[a-z0-9]*?|precision_[a-z]*?|recall_[a-z]*?|fid|kid|fvd|kvd)(\d+)(?:_\d+f)?(?:_floor|_std)?$"
)

_SECOND_OPINION = re.compile(r"^metrics/(fd_lenet|fd_pixel|precision_|recall_|lenet_accuracy)")


def _metric_source(cfg: dict, name: str):
    """(callback key, its config) that logs ``name``, or (None, why not) when no configured callback does."""
    callbacks = cfg.get("callbacks") or {}
    if name == "metrics/grid_agreement":
        grid = callbacks.get("class_grid")
        if not isinstance(grid, dict) or grid.get("judge") in (None, "none"):
            return None, "the class grid's judge (callbacks.class_grid.judge=auto) logs it"
        return "class_grid", grid
    if _SAMPLE_METRIC.match(name):
        metrics = callbacks.get("sample_metrics")
        if not isinstance(metrics, dict):
            return None, "callbacks.sample_metrics logs it: add callbacks=metrics"
        found = _SAMPLE_COUNT.match(name)
        n = metrics.get("n_samples")
        if found and isinstance(n, int) and int(found.group(1)) != n:
            return None, (
                f"callbacks.sample_metrics.n_samples={n} names its metrics with {n} "
                f"(e.g. {name.replace(found.group(1), str(n), 1)})"
            )
        if _SECOND_OPINION.match(name) and metrics.get("second_opinions") is False:
            return None, "the digits second opinions log it: callbacks.sample_metrics.second_opinions=true"
        return "sample_metrics", metrics
    return "", None  # val/loss, val_loss_t/*, train/*: logged by the module itself


def monitored_metrics_are_logged(cfg: dict):
    """``callbacks.model_checkpoint.monitor`` and ``optimized_metric`` must name a metric some callback logs, and a
    checkpoint that monitors a sample metric must come at steps where that metric was measured (Lightning stops
    with an error when a monitored metric is missing after validation has run)."""
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint")
    monitor = checkpoint.get("monitor") if isinstance(checkpoint, dict) else None
    for key, name in (
        ("callbacks.model_checkpoint.monitor", monitor),
        ("optimized_metric", cfg.get("optimized_metric")),
    ):
        if not isinstance(name, str) or not name.startswith("metrics/"):
            continue
        source, why = _metric_source(cfg, name)
        if source is None:
            return key, f"a metric this run logs; {name} is not: {why}"
        if key.startswith("callbacks.") and source:
            every = why.get("every_n_steps")
            ckpt_every = checkpoint.get("every_n_train_steps")
            if isinstance(every, int) and isinstance(ckpt_every, int) and every > 0 and ckpt_every % every:
                return "callbacks.model_checkpoint.every_n_train_steps", (
                    f"a multiple of callbacks.{source}.every_n_steps={every} (the monitored {name} is measured then)"
                )


def dinov2_weights_exist(cfg: dict):
    """FD in DINOv2 features loads the network from a local folder: a missing one fails at start, not at the first
    evaluation hours later."""
    metrics = (cfg.get("callbacks") or {}).get("sample_metrics")
    if isinstance(metrics, dict) and metrics.get("feature") == "dinov2":
        path = metrics.get("dinov2_weights")
        if not (isinstance(path, str) and (Path(path) / "config.json").is_file()):
            return "callbacks.sample_metrics.dinov2_weights", (
                "a local DINOv2 folder in Hugging Face format (config.json + model.safetensors; get it with "
                "`hf download facebook/dinov2-large --local-dir <dir>` where there is internet)"
            )


def one_ema_length(cfg: dict):
    """reconstruct_ema needs the length as exactly one of sigma_rel or gamma."""
    if (cfg.get("sigma_rel") is None) == (cfg.get("gamma") is None):
        return "sigma_rel", "a number in (0, 0.3] (e.g. 0.07) when gamma is null, null when gamma is set (give one)"


def one_ema_profile(cfg: dict):
    """The EMA callback averages with a constant decay or a power-function length: exactly one of the two is set."""
    ema = _node(cfg, "callbacks.ema")
    if isinstance(ema, dict) and (ema.get("decay") is None) == (ema.get("sigma_rel") is None):
        key = "callbacks.ema.sigma_rel" if ema.get("sigma_rel") is not None else "callbacks.ema.decay"
        return key, (
            "exactly one of callbacks.ema.decay (constant, e.g. 0.999) and callbacks.ema.sigma_rel (power-function "
            "length, e.g. 0.08) is set, the other null (give one)"
        )


def rounds_fit_the_budget(cfg: dict):
    """Progressive distillation's last round must start before training stops."""
    method = cfg.get("method") or {}
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    lengths = _round_lengths(method)
    if not isinstance(lengths, tuple) or not isinstance(max_steps, int) or max_steps < 1:
        return None  # listed_rounds_set_their_intervals names a bad round length
    if max_steps <= sum(lengths[:-1]):
        return "trainer.max_steps", (
            f"at least {sum(lengths[:-1]) + 1} for method={str(method.get('_target_', '')).rsplit('.', 1)[-1]}"
            f" ({len(lengths)} rounds of method.steps_per_round={method['steps_per_round']}: {sum(lengths)} "
            "runs every round in full)"
        )
    return None


ROUND_INTERVALS = (  # step counts that end each progressive round (digits_progressive: the rounds' gcd)
    "trainer.val_check_interval",
    "callbacks.class_grid.every_n_steps",
    "callbacks.model_checkpoint.every_n_train_steps",
)


def _round_lengths(method: dict) -> tuple[int, ...] | str | None:
    """A progressive config's round lengths (``difflab.methods.progressive.round_lengths``), what is wrong with them,
    or None when its step counts are not integers yet."""
    from difflab.methods.rounds import round_count, round_lengths
    from difflab.utils.errors import ConfigError

    per_round, teacher, student = (method.get(k) for k in ("steps_per_round", "teacher_steps", "student_steps"))
    if not all(isinstance(v, int) and v > 0 for v in (teacher, student)) or per_round is None:
        return None
    try:
        return round_lengths(per_round, max(1, round_count(teacher, student)))
    except ConfigError as error:
        return str(error).split(" is invalid: ", 1)[-1]


PER_ROUND_CADENCE = 4  # checkpoints, validations and class grids per round, on average, that listed lengths may cost


def listed_rounds_set_their_intervals(cfg: dict):
    """Listed round lengths need a cadence that ends every round: their gcd (refused when so small that it would keep
    a checkpoint nearly every step); a cadence key that repeats the list itself names that gcd (or the list's own
    fault, which those keys echo)."""
    from difflab.methods.rounds import round_gcd

    method = cfg.get("method") or {}
    lengths, fits = method.get("steps_per_round"), _round_lengths(method)
    if not isinstance(lengths, list) or fits is None:
        return None
    if isinstance(fits, str):
        return "method.steps_per_round", fits
    unit = round_gcd(lengths)
    every = [key for key in ROUND_INTERVALS if _dotted(cfg, key) == unit]
    if every and sum(fits) // unit > PER_ROUND_CADENCE * len(fits):
        return "method.steps_per_round", (
            f"lengths whose greatest common divisor is {unit} run {', '.join(every)} every {unit} steps "
            f"({sum(fits) // unit} times): give lengths sharing a larger divisor (at most {PER_ROUND_CADENCE} "
            "per round on average)"
        )
    listed = [key for key in ROUND_INTERVALS if _dotted(cfg, key) == lengths]
    if not listed:
        return None
    return "method.steps_per_round", (
        f"rounds of their own lengths need {', '.join(listed)} as one step count that ends every round: "
        f"set {' '.join(f'{key}={unit}' for key in listed)} (the lengths' greatest common divisor; "
        "'${round_gcd:${method.steps_per_round}}' computes it)"
    )


SAMPLING_ONLY = ("t_min", "sampling_shift", "spacing", "steps_offset")  # process keys that change no training input
# process keys that say where training times fall, not what the denoiser is shown at a time (a student may train on
# another density than its teacher)
TRAINING_DENSITY = ("density", "mean", "std", "mode_scale", "logit_mean", "logit_std")
# network inputs a student may add to its teacher's network (the teacher gains the input adding zero: a
# guidance-distilled student's scale)
STUDENT_INPUTS = ("guidance_input",)


READ_ERRORS = (OSError, RuntimeError, KeyError)  # DifflabError is a RuntimeError


def _stored_config(path: str) -> dict:
    """The config stored in a checkpoint or export, read through the trust gate (raises ``READ_ERRORS``)."""
    from difflab.checkpoints import load_weights
    from difflab.trust import check_config

    return check_config(load_weights(path)["config"] or {}, path)


def teacher_has_this_network(cfg: dict):
    """A teacher checkpoint must hold this run's process (its sampling grid and training density aside), objective's
    prediction and sigma_data, conditioning, image size and network (the student starts as it); read from its stored
    config through the trust gate, before anything is written."""
    path = (cfg.get("method") or {}).get("teacher_ckpt")
    model = cfg.get("model") or {}
    if not isinstance(path, str) or not Path(path).expanduser().exists() or not isinstance(model.get("net"), dict):
        return None  # a missing file is the teacher_ckpt rule's
    try:
        stored = _stored_config(path)
    except READ_ERRORS as err:
        return "method.teacher_ckpt", f"a readable difflab checkpoint or export ({str(err).splitlines()[0]})"
    theirs = {"model": stored.get("model") or {}, "datamodule": stored.get("datamodule") or {}}
    ours = {"model": model, "datamodule": cfg.get("datamodule") or {}}
    space = ["latents" if _dotted(tree, "model.diffusion.autoencoder") else "pixels" for tree in (theirs, ours)]
    if space[0] != space[1]:
        return "method.teacher_ckpt", (
            f"a teacher of this run's space: {path} was trained on {space[0]} and this run trains on {space[1]} (on "
            "digits, give the student +latent=digits and the teacher's datamodule.cache_dir, or neither)"
        )
    keys = ["model.diffusion.objective.prediction", "model.diffusion.objective.sigma_data"]
    keys += ["model.diffusion.conditioner._target_", "model.diffusion.conditioner.num_classes", "datamodule.image_size"]
    for node in ("model.diffusion.process", "model.net"):
        both = set(_dotted(theirs, node) or {}) | set(_dotted(ours, node) or {})
        keys += [f"{node}.{k}" for k in sorted(both) if k not in SAMPLING_ONLY + TRAINING_DENSITY + STUDENT_INPUTS]
    for key in keys:
        t, s = _setting(theirs, key), _setting(ours, key)
        filled_later = key.endswith(("num_classes", "image_size")) and ({t, s} & {None, "???"})  # from the data
        if t != s and not filled_later:
            return "method.teacher_ckpt", (
                f"a teacher of this run's setup: {path} has {key}={t!r} where this run has {s!r} (distil into the "
                "teacher's network, process and data)"
            )
    return None


def init_from_sees_the_same_time(cfg: dict):
    """``init_from`` weights were trained on the time input this run gives them (``process.time_scale``: a denoiser
    that learned 1000 t reads t as almost zero); ``init_strict=false`` starts from them anyway. Read from the file's
    stored config through the trust gate, before anything is written."""
    path = cfg.get("init_from")
    if not isinstance(path, str) or not Path(path).expanduser().exists() or not cfg.get("init_strict", True):
        return None  # a missing file is the init_from rule's
    if cfg.get("ckpt_path"):
        return None  # init_from with a resume: resume_xor_init's
    try:
        stored = _stored_config(path)
    except READ_ERRORS:
        return None  # an unreadable file: the run's loader says so, naming it
    key = "model.diffusion.process"
    theirs, ours = _dotted(stored, key), _dotted(cfg, key)
    if not isinstance(theirs, dict) or not isinstance(ours, dict) or theirs.get("_target_") != ours.get("_target_"):
        return None  # another process (or a config without one): a conversion, the user's call
    t, s = _setting(stored, f"{key}.time_scale"), _setting(cfg, f"{key}.time_scale")
    if t is not None and s is not None and float(t) != float(s):
        return "init_from", (
            f"weights trained on this run's time input: {path} saw {key}.time_scale={float(t):g} where this run has "
            f"{float(s):g} (set process.time_scale={float(t):g}, or init_strict=false to start from them anyway)"
        )
    return None


def distillation_runs_alone(cfg: dict):
    """A distillation student starts as its teacher: no init_from; and it does not shard (trainer=fsdp) yet."""
    if not (cfg.get("method") or {}).get("teacher_ckpt"):
        return None
    if cfg.get("init_from"):
        return "init_from", "null with a distillation method (the student starts as method.teacher_ckpt)"
    strategy = (
        str(((cfg.get("trainer") or {}).get("strategy") or {}).get("_target_", ""))
        if isinstance((cfg.get("trainer") or {}).get("strategy"), dict)
        else ""
    )
    if strategy.endswith("FSDPStrategy"):
        return "trainer.strategy", "not FSDP with a distillation method (trainer=gpu or ddp)"
    return None


def _setting(tree: dict, dotted: str):
    """The value at ``dotted``; where the node lacks the key (a config older than the option), its ``_target_``'s
    constructor default, so a teacher saved before a new network option still teaches a run that leaves it unset."""
    value = _dotted(tree, dotted)
    node_key, _, name = dotted.rpartition(".")
    node = _dotted(tree, node_key)
    if value is not None or not isinstance(node, dict) or name in node or not isinstance(node.get("_target_"), str):
        return value
    import importlib
    import inspect

    module, _, attr = node["_target_"].rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), attr)).parameters.get(name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return value
    return value if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _dotted(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


CHECKS = {
    "sample": [sample_guidance_settings],
    "reconstruct_ema": [one_ema_length],
    "train": [
        resume_xor_init,
        kept_guide_is_kept,
        sampler_steps_fit_schedule,
        sampler_spacing_fits_process,
        patch_divides_image_size,
        frames_within_temporal_positions,
        targets_take_their_keys,
        monitored_metrics_are_logged,
        dinov2_weights_exist,
        rounds_fit_the_budget,
        listed_rounds_set_their_intervals,
        one_ema_profile,
        teacher_has_this_network,
        distillation_runs_alone,
        init_from_sees_the_same_time,
    ],
}
