"""Allowed values of the ops group (configs/ops/*.yaml, merged into `callbacks` by `# @package callbacks`; src/ops/),
checked by difflab.config_checks before a job starts."""

from difflab.config_checks import boolean, integer, list_of, optional, signal_name, string

PACKAGE = "callbacks"

RULES = {
    "nonfinite_guard.max_consecutive": integer(min=0).described_as("an integer >= 0 (0: never stop)"),
    "nonfinite_guard.check_loss": boolean(),
    "graceful_shutdown.signals": list_of(signal_name()),
    "graceful_shutdown.requeue_signal": optional(signal_name()),
    "graceful_shutdown.save_checkpoint": boolean(),
    "graceful_shutdown.filename": string(nonempty=True),
    "rank_consistency.every_n_steps": integer(min=0).described_as("an integer >= 0 (0: only at the end)"),
    "rank_consistency.at_end": boolean(),
    "rank_consistency.strict": boolean(),
    "rank_consistency.report_file": optional(string(nonempty=True)),
}
