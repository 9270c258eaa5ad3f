"""Allowed values of the schedule group (configs/schedule/*.yaml; src/diffusion/schedules.py), checked by
difflab.config_checks before a job starts."""

from difflab.config_checks import boolean, integer, number, one_of, positive

BETA = number(min=0, max=1, min_open=True, max_open=True)

RULES = {
    "kind": one_of(["linear", "scaled_linear", "cosine", "sigmoid"]),
    "num_timesteps": integer(min=2),
    "zero_terminal_snr": boolean(),
    "spacing": one_of(["leading", "trailing", "linspace"]),
    "steps_offset": integer(min=0),
    "offset": number(min=0),  # the cosine schedule's s
    "max_beta": number(min=0, max=1, min_open=True),
    "logsnr_shift": number(),
    "beta_start": BETA,
    "beta_end": BETA,
    "width": positive(),
    "density": one_of(["uniform", "logit_normal"]),  # training timesteps
    "logit_mean": number(),
    "logit_std": positive(),
}
