"""Allowed values of the paths group (configs/paths/default.yaml), checked by difflab.config_checks before a job
starts: each is a directory that may not exist yet but must not be an existing file."""

from difflab.config_checks import directory_path

RULES = {
    "root_dir": directory_path(),
    "data_dir": directory_path(),
    "log_dir": directory_path(),
    "output_dir": directory_path(),
}
