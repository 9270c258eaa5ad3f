"""Allowed values of the guidance group (configs/guidance/*.yaml: src/diffusion/guidance.py's classes), checked by
difflab.config_checks before a job starts. Each method's settings are difflab.registry.GUIDANCE_SETTINGS."""
from difflab.config_checks import existing_path, mapping, non_negative, number, optional, probability, sigma_interval
from difflab.registry import GUIDANCE_SETTINGS, GUIDANCE_TARGETS

RULES = {
    # diffusers convention: out = u + scale (c - u); 1 = none, 0 = unconditional
    "scale": non_negative(),
    "rescale": probability(),
    "interval": optional(sigma_interval()),
    "per_class": optional(mapping(non_negative())),
    "eta": number(),                                                 # apg: weight of the parallel component
    "norm_threshold": non_negative(),                                # apg: 0 = no norm clipping
    "momentum": number(min=-1, max=1, min_open=True, max_open=True),  # apg: running-sum momentum
    "guide_ckpt": optional(existing_path()).described_as(
        "an existing checkpoint or export of the guide model (null unless guidance=autoguidance)"),
}


def method_settings(guidance: dict):
    """What one method needs of its settings: CFG++'s lambda (the scale, per-class scales too) in [0, 1],
    autoguidance's guide checkpoint, and no setting the method does not take."""
    method = GUIDANCE_TARGETS.get(str(guidance.get("_target_")))
    if method is None:   # a forker's own class: its constructor checks it
        return None
    extra = sorted(k for k in guidance if not k.startswith("_") and k not in GUIDANCE_SETTINGS[method])
    if extra:
        return extra[0], f"absent with guidance={method} (its settings: {', '.join(GUIDANCE_SETTINGS[method])})"
    if method == "cfgpp":
        if isinstance(guidance.get("scale"), (int, float)) and not 0 <= guidance["scale"] <= 1:
            return "scale", "a number in [0, 1] with guidance=cfgpp (CFG++'s lambda, e.g. 0.6)"
        per_class = guidance.get("per_class") or {}
        if isinstance(per_class, dict) and any(isinstance(v, (int, float)) and v > 1 for v in per_class.values()):
            return "per_class", "scales in [0, 1] with guidance=cfgpp (CFG++'s lambda)"
    if method == "autoguidance" and not guidance.get("guide_ckpt"):
        return "guide_ckpt", "a checkpoint of the guide model with guidance=autoguidance"
    return None


CHECKS = [method_settings]
