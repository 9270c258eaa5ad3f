"""Allowed values of the logger group (configs/logger/*.yaml, a dict of logger configs), checked by
difflab.config_checks before a job starts. `*` matches any logger name."""

from difflab.config_checks import any_of, boolean, directory_path, integer, list_of, one_of, optional, string

RULES = {
    "*.save_dir": directory_path(),
    "*.name": optional(string()),
    "*.version": optional(any_of(string(), integer(min=0))),
    "tensorboard.default_hp_metric": boolean(),
    "wandb.project": string(nonempty=True),
    "wandb.entity": optional(string(nonempty=True)),
    "wandb.group": optional(string()),
    "wandb.tags": optional(list_of(string())),
    "wandb.job_type": optional(string()),
    "wandb.log_model": any_of(boolean(), one_of(["all"])),
    "wandb.mode": optional(one_of(["online", "offline", "disabled"])),
}
