"""Allowed values of the objective group (configs/objective/*.yaml; src/diffusion/objectives.py), checked by
difflab.config_checks before a job starts."""

from difflab.config_checks import non_negative, number, one_of, optional, positive, string

RULES = {
    "prediction": one_of(["eps", "x0", "v", "flow", "edm"]),
    "loss": one_of(["mse", "l1", "huber"]),
    "huber_delta": positive(),
    "weighting": one_of(["uniform", "min_snr", "inv_snr_clamped", "edm"]),
    "min_snr_gamma": positive(),
    "snr_min": positive(),
    "snr_max": positive(),
    "sigma_data": positive(),
    # read from configs saved before the training density moved to the process (only warned about there)
    "timestep_sampling": one_of(["uniform", "logit_normal"]),
    "logit_mean": number(),
    "logit_std": positive(),
    "offset_noise": non_negative(),
    "x0_clip": optional(one_of(["none", "static", "dynamic"])),
    "clip_range": positive(),
    "dynamic_quantile": number(min=0, max=1, min_open=True),
    "dynamic_max": optional(positive()),
    "lpips_weight": non_negative(),
    "lpips_net": one_of(["alex", "vgg", "squeeze"]),
    "lpips_backbone": optional(string()),
}


def snr_clamp_ordered(objective: dict):
    """inv_snr_clamped clamps SNR to [snr_min, snr_max]."""
    lo, hi = objective.get("snr_min"), objective.get("snr_max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
        return "snr_max", f"a number >= snr_min={lo}"
    return None


CHECKS = [snr_clamp_ordered]
