"""Allowed values of the callbacks group (configs/callbacks/*.yaml, a dict of callback configs; src/callbacks/ and
Lightning's ModelCheckpoint / LearningRateMonitor), checked by difflab.config_checks before a job starts.
`*` matches any callback name (renamed or added ones included); an exact key wins over a `*` one. The ops group
(configs/ops/) lands in `callbacks` too and has its own schema there."""

from difflab.config_checks import (
    Rule,
    any_of,
    boolean,
    directory_path,
    integer,
    list_of,
    mapping,
    non_negative,
    number,
    one_of,
    optional,
    positive,
    probability,
    string,
)
from difflab.registry import GUIDANCE_SETTINGS

LPIPS_NETS = ["alex", "vgg", "squeeze"]

# what a grid / metrics callback may override of the guidance group (configs/guidance/*.yaml)
GUIDANCE_KEYS = {"method", *(k for keys in GUIDANCE_SETTINGS.values() for k in keys)}

RULES = {
    # shared by the figure / grid callbacks (src/callbacks/schedule.py: 0 = only dense-early and at the end)
    "*.every_n_steps": integer(min=0).described_as("an integer >= 0 (0: only dense-early steps and at the end)"),
    "*.dense_early": boolean(),
    "*.at_end": boolean(),
    "*.seed": integer(),
    "*.n_cols": integer(min=1),
    "*.max_rows": integer(min=1),
    "*.guidance_scale": optional(non_negative()).described_as(
        "a number >= 0 (1: no guidance, 0: unconditional) or null (guidance.scale)"
    ),
    "*.guidance": optional(
        Rule(
            lambda v: isinstance(v, dict) and set(v) <= GUIDANCE_KEYS,
            f"a dict of guidance overrides with keys among {', '.join(sorted(GUIDANCE_KEYS))}, e.g. "
            "{method: apg, scale: 4}",
        )
    ),
    "*.sampler.steps": integer(min=1),
    "*.lpips_net": optional(one_of(LPIPS_NETS)),
    "*.lpips_backbone": optional(string()),
    # class_grid (src/callbacks/class_grid.py, src/eval/grid_judge.py)
    "class_grid.judge": one_of(["auto", "digit_classifier", "clip", "none"]),
    "class_grid.clip_model": optional(string()),
    "class_grid.digit_classifier_weights": optional(string()),
    # ema (src/callbacks/ema.py)
    "ema.decay": optional(probability()).described_as("a number in [0, 1], or null with ema.sigma_rel"),
    "ema.sigma_rel": optional(number(min=0, max=0.3, min_open=True)),
    "ema.update_every": integer(min=1),
    "ema.start_step": integer(min=0),
    "ema.warmup": boolean(),
    # posthoc_ema (src/callbacks/posthoc_ema.py, configs/callbacks/posthoc.yaml): EDM2 lengths on the one-to-one
    # branch of sigma_rel(gamma), whose maximum is ~0.300
    "posthoc_ema.sigma_rels": list_of(number(min=0, max=0.3, min_open=True), min_len=1),
    "posthoc_ema.snapshot_every": integer(min=1),
    "posthoc_ema.max_snapshots": optional(integer(min=1)).described_as("an integer >= 1 or null (keep all)"),
    "posthoc_ema.dir": optional(directory_path()),
    # Lightning's ModelCheckpoint and LearningRateMonitor
    "model_checkpoint.dirpath": optional(directory_path()),
    "model_checkpoint.filename": optional(string(nonempty=True)),
    "model_checkpoint.every_n_train_steps": optional(integer(min=0)),
    "model_checkpoint.every_n_epochs": optional(integer(min=0)),
    "model_checkpoint.save_top_k": integer(min=-1).described_as("an integer >= -1 (-1: keep all)"),
    "model_checkpoint.save_last": optional(any_of(boolean(), one_of(["link"]))),
    "model_checkpoint.save_on_train_epoch_end": optional(boolean()),
    "model_checkpoint.auto_insert_metric_name": boolean(),
    "model_checkpoint.monitor": optional(string(nonempty=True)).described_as(
        "a logged metric (val/loss, metrics/fd_digit200, metrics/grid_agreement, ...) or null (no ranking)"
    ),
    "model_checkpoint.mode": one_of(["min", "max"]),
    "lr_monitor.logging_interval": optional(one_of(["step", "epoch"])),
    "*.tag_suffix": string(),
    # diagnostics (configs/callbacks/diagnostics.yaml)
    "reconstruction.t_fractions": list_of(probability(), min_len=1),
    "reconstruction.n_images": integer(min=1),
    "reconstruction.steps": integer(min=1),
    "reconstruction.guidance_scale": non_negative(),
    "denoise_collage.n_columns": integer(min=2),
    "denoise_collage.n_uncond": integer(min=0),
    "guidance_grid.scales": list_of(non_negative(), min_len=1),
    "timestep_loss.every_n_validations": integer(min=1),
    "embedding_tsne.max_prompts": integer(min=1),
    "training_health.every_n_steps": optional(integer(min=0)).described_as(
        "an integer >= 0 or null (the trainer's log_every_n_steps)"
    ),
    "training_health.spike_factor": number(min=1, min_open=True),
    "training_health.spike_window": integer(min=1),
    "training_health.spike_min_history": integer(min=0),
    "sample_metrics.n_samples": integer(min=2),
    "sample_metrics.batch_size": integer(min=1),
    "sample_metrics.feature": any_of(
        one_of(["auto", "digit_classifier", "inception", "dinov2", "i3d", "none"]), mapping()
    ),
    "sample_metrics.dinov2_weights": optional(string()),
    "sample_metrics.kid_subsets": integer(min=1),
    "sample_metrics.kid_subset_size": integer(min=1),
    "sample_metrics.n_real": integer(min=1),
    "sample_metrics.real_split": one_of(["train", "val"]),
    "sample_metrics.lpips_pairs": integer(min=0),
    "sample_metrics.inception_weights": optional(string()),
    "sample_metrics.i3d_weights": optional(string()),
    "sample_metrics.digit_classifier_weights": optional(string()),
    "sample_metrics.second_opinions": boolean(),
    "sample_metrics.stats_dir": optional(directory_path()),
    "sample_metrics.clip_model": optional(string()),
    # video_grid (src/callbacks/video_grid.py)
    "video_grid.max_prompts": integer(min=0),
    "video_grid.include_uncond": boolean(),
    "video_grid.fps": positive(),
    "video_grid.min_size": integer(min=1),
    "video_grid.formats": list_of(one_of(["mp4", "gif"]), min_len=1),
    "video_grid.sampler_steps": optional(integer(min=1)),
}
