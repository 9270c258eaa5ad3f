"""Names and presets that both the config pre-flight (``configs/*/schema.py``, which must not import torch so
``--help`` stays fast) and the code use: each is stated here once."""

# guidance.method -> the settings its class takes (src/diffusion/guidance.py; a test keeps the two equal)
GUIDANCE_SETTINGS: dict[str, tuple[str, ...]] = {
    "cfg": ("scale", "rescale", "interval", "per_class"),
    "cfgpp": ("scale", "interval", "per_class"),
    "apg": ("scale", "eta", "norm_threshold", "momentum", "interval", "per_class"),
    "autoguidance": ("scale", "guide_ckpt", "rescale", "interval", "per_class", "keep_at"),
    "distilled": ("scale", "per_class"),
    "autoguidance_cfg": (
        "scale",
        "guide_ckpt",
        "rescale",
        "interval",
        "per_class",
        "keep_at",
        "cfg_scale",
        "cfg_interval",
    ),
}
CFGPP_LAMBDA = "a number in [0, 1] with guidance.method=cfgpp (CFG++'s lambda, e.g. 0.6)"


def cfgpp_lambda_ok(values) -> bool:
    """CFG++'s lambda (its guidance scale, per class too) lies in [0, 1] (Chung et al. 2024)."""
    return all(0.0 <= float(v) <= 1.0 for v in values)


GUIDANCE_CLASSES = {
    "cfg": "CFG",
    "cfgpp": "CFGpp",
    "apg": "APG",
    "autoguidance": "Autoguidance",
    "distilled": "DistilledGuidance",
    "autoguidance_cfg": "AutoguidanceCFG",
}
GUIDANCE_TARGETS = {f"difflab.diffusion.guidance.{cls}": name for name, cls in GUIDANCE_CLASSES.items()}

# DiT presets: size -> (depth, width, heads) (T is ours, CPU-sized; S, B, L, XL are the DiT paper's)
DIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "T": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
