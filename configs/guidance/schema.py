"""Allowed values of the guidance group (configs/guidance/*.yaml: src/diffusion/guidance.py's classes), checked by
difflab.config_checks before a job starts. What a method needs of its settings together (CFG++'s lambda in [0, 1],
autoguidance's guide) its class's constructor states; the pre-flight builds it (config_checks.constructor_problems)."""

from difflab.config_checks import (
    any_of,
    existing_path,
    mapping,
    non_negative,
    number,
    one_of,
    optional,
    probability,
    sigma_interval,
)

RULES = {
    # diffusers convention: out = u + scale (c - u); 1 = none, 0 = unconditional
    "scale": non_negative(),
    "rescale": probability(),
    "interval": optional(sigma_interval()),
    "per_class": optional(mapping(non_negative())),
    "eta": number(),  # apg: weight of the parallel component
    "norm_threshold": non_negative(),  # apg: 0 = no norm clipping
    "momentum": number(min=-1, max=1, min_open=True, max_open=True),  # apg: running-sum momentum
    "guide_ckpt": optional(any_of(one_of(["kept"]), existing_path())).described_as(
        "an existing checkpoint or export of the guide model, or `kept` (this run's own early weights; "
        "null unless guidance=autoguidance)"
    ),
    # autoguidance with guide_ckpt=kept: the fraction of the training budget at which the run keeps its guide
    "keep_at": number(min=0, max=1, min_open=True, max_open=True),
    # autoguidance_cfg: CFG's scale and band beside the guide's
    "cfg_scale": non_negative(),
    "cfg_interval": optional(sigma_interval()),
}
