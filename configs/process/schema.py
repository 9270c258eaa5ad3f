"""Allowed values of the process group (configs/process/*.yaml; src/diffusion/processes.py), checked by
difflab.config_checks before a job starts. process=vp is `${schedule}` (checked in configs/schedule/schema.py); the
rules below are edm's and flow's keys."""

from difflab.config_checks import integer, number, one_of, optional, positive

RULES = {
    # the objective the process trains (configs/objective/*.yaml interpolate them)
    "prediction": one_of(["eps", "x0", "v", "flow", "edm"]),
    "weighting": one_of(["uniform", "min_snr", "inv_snr_clamped", "edm"]),
    # edm (EDMProcess)
    "sigma_min": positive(),
    "sigma_max": positive(),
    "rho": positive(),
    "p_mean": number(),
    "p_std": positive(),
    "time_scale": positive(),
    # flow (FlowProcess); vp's density is the schedule's (uniform | logit_normal, checked there)
    "density": one_of(["uniform", "logit_normal", "mode", "cosmap"]),
    "mean": number(),
    "std": positive(),
    "mode_scale": number(),
    "shift": positive(),
    "sampling_shift": optional(positive()).described_as("null (the grid uses `shift`) or a number > 0"),
    "t_min": number(min=0, max=1, max_open=True),  # flow: 0 = a grid evenly to 0 (halving, for distillation)
    "frame_shift_base": optional(integer(min=1)).described_as(
        "null (off) or the frame count at which the video time shift is `shift`"
    ),
}


def sigma_range(process: dict):
    """edm: 0 < sigma_min < sigma_max."""
    lo, hi = process.get("sigma_min"), process.get("sigma_max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < hi <= lo:
        return "sigma_max", f"a number > sigma_min={lo}"
    return None


CHECKS = [sigma_range]
