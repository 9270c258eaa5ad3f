"""Allowed values of the lr_schedule group (configs/lr_schedule/*.yaml: src/optim/lr_schedules.py), checked by
difflab.config_checks before a job starts."""

from difflab.config_checks import any_of, integer, list_of, non_negative, one_of, probability
from difflab.optim.lr_schedules import PERIOD_ALLOWED

RULES = {
    "warmup": non_negative().described_as("an integer number of steps >= 0 or a fraction in [0, 1) of the budget"),
    "start_factor": non_negative(),
    "final_fraction": probability(),
    "budget": one_of(["auto", "steps", "time"]),
    "period": any_of(integer(min=1), list_of(integer(min=1), min_len=1)).described_as(PERIOD_ALLOWED),
}
