"""Allowed values of the trainer group (configs/trainer/*.yaml: Lightning Trainer arguments), checked by
difflab.config_checks before a job starts, so a bad one is one line instead of a Lightning traceback after setup."""

from difflab.config_checks import (
    Rule,
    any_of,
    boolean,
    directory_path,
    duration,
    integer,
    list_of,
    mapping,
    matches,
    number,
    one_of,
    optional,
)

# Lightning 2.6's registries (lightning.pytorch.accelerators / strategies), plus `auto` and `gpu`
ACCELERATORS = ["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
STRATEGIES = [
    "auto",
    "ddp",
    "ddp_spawn",
    "ddp_fork",
    "ddp_notebook",
    "ddp_find_unused_parameters_true",
    "ddp_find_unused_parameters_false",
    "ddp_spawn_find_unused_parameters_true",
    "ddp_spawn_find_unused_parameters_false",
    "ddp_fork_find_unused_parameters_true",
    "ddp_fork_find_unused_parameters_false",
    "ddp_notebook_find_unused_parameters_true",
    "ddp_notebook_find_unused_parameters_false",
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme",
    "fsdp",
    "fsdp_cpu_offload",
    "single_device",
    "single_tpu",
    "single_xla",
    "xla",
    "xla_debug",
]
# Lightning's _PRECISION_INPUT, plus `auto` (resolved per machine by src/ops/precision.py)
PRECISIONS = [
    "auto",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    64,
    32,
    16,
    "64",
    "32",
    "16",
    "bf16",
]


def _batches(v) -> bool:
    """Lightning's batch limits: a fraction in [0, 1] or a whole number of batches."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and (v <= 1 or v % 1 == 0)


BATCH_LIMIT = optional(Rule(_batches, "an integer >= 0 (batches) or a fraction in [0, 1]"))

RULES = {
    "accelerator": any_of(one_of(ACCELERATORS), mapping()).described_as(
        "one of " + ", ".join(ACCELERATORS) + " (or a _target_ mapping)"
    ),
    "devices": any_of(
        integer(min=1),
        one_of([-1, "auto"]),
        list_of(integer(min=0), min_len=1),
        matches(r"-1|\d+|\d+(\s*,\s*\d+)*\s*,?", ""),
    ).described_as("auto, -1 (all), a count >= 1, a list of device indices or a string such as '0,1'"),
    "num_nodes": integer(min=1),
    "strategy": any_of(one_of(STRATEGIES), mapping()).described_as(
        "auto, ddp, ddp_spawn, fsdp, deepspeed ... (a Lightning strategy name) or a _target_ mapping"
    ),
    "precision": one_of(PRECISIONS).described_as(
        "auto, 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true, transformer-engine[-float16] or 64, 32, 16, "
        "bf16"
    ),
    "max_steps": integer(min=-1).described_as("an integer >= -1 (-1: no limit)"),
    "min_steps": optional(integer(min=0)),
    "max_epochs": optional(integer(min=-1)).described_as("an integer >= -1 (-1: no limit) or null"),
    "min_epochs": optional(integer(min=0)),
    "max_time": optional(any_of(duration(), mapping())),
    "accumulate_grad_batches": integer(min=1),
    "gradient_clip_val": optional(number(min=0)),
    "gradient_clip_algorithm": optional(one_of(["norm", "value"])),
    "val_check_interval": optional(
        any_of(integer(min=1), number(min=0, max=1, min_open=True), duration())
    ).described_as("an integer >= 1 (batches), a fraction in (0, 1] of an epoch, a duration DD:HH:MM:SS or null"),
    "check_val_every_n_epoch": optional(integer(min=1)),
    "limit_train_batches": BATCH_LIMIT,
    "limit_val_batches": BATCH_LIMIT,
    "limit_test_batches": BATCH_LIMIT,
    "overfit_batches": BATCH_LIMIT,
    "fast_dev_run": any_of(boolean(), integer(min=0)),
    "log_every_n_steps": optional(integer(min=0)).described_as("an integer >= 0 (0: no logging) or null"),
    "num_sanity_val_steps": integer(min=-1).described_as("an integer >= -1 (-1: all validation batches)"),
    "deterministic": optional(any_of(boolean(), one_of(["warn"]))),
    "benchmark": optional(boolean()),
    "enable_model_summary": optional(boolean()),
    "enable_progress_bar": optional(boolean()),
    "enable_checkpointing": optional(boolean()),
    "sync_batchnorm": boolean(),
    "use_distributed_sampler": boolean(),
    "default_root_dir": optional(directory_path()),
}


def fraction_needs_epochs(trainer: dict):
    """Lightning takes a fractional val_check_interval only with check_val_every_n_epoch set."""
    if isinstance(trainer.get("val_check_interval"), float) and trainer.get("check_val_every_n_epoch") is None:
        return "val_check_interval", (
            "an integer >= 1 (batches) or a duration DD:HH:MM:SS; a fraction of an epoch "
            "needs trainer.check_val_every_n_epoch"
        )
    return None


CHECKS = [fraction_needs_epochs]


# trainer=fsdp (difflab.ops.fsdp.FSDPStrategy)
FSDP_STRATEGY = "difflab.ops.fsdp.FSDPStrategy"
FSDP_PRECISIONS = ["auto", "32-true", "bf16-mixed", 32, "32", "bf16"]
RULES["strategy.reshard_after_forward"] = boolean()
RULES["strategy.process_group_backend"] = optional(one_of(["nccl", "gloo"]))


def fsdp_precision(trainer: dict):
    """FSDP2 through Lightning's ModelParallelStrategy trains in 32-true or bf16-mixed (no fp16 gradient scaler, and
    16-true / bf16-true would cast the sharded master weights)."""
    strategy = trainer.get("strategy")
    if (
        isinstance(strategy, dict)
        and strategy.get("_target_") == FSDP_STRATEGY
        and trainer.get("precision") not in FSDP_PRECISIONS
    ):
        return "precision", "auto, 32-true or bf16-mixed with trainer=fsdp (bf16 gathered weights, fp32 reductions)"
    return None


CHECKS.append(fsdp_precision)
