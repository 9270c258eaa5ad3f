"""Allowed values of the sampler group (configs/sampler/*.yaml; src/diffusion/samplers.py), checked by
difflab.config_checks before a job starts. sampler=checkpoint (sample.yaml's default) has no _target_: its nulls
mean "the checkpoint's value"."""

from difflab.config_checks import Rule, integer, non_negative, one_of, optional

RULES = {
    "steps": optional(integer(min=1)),
    "eta": optional(non_negative()).described_as("a number >= 0 (0: deterministic DDIM, 1: DDPM-like)"),
    # vp: the timestep spacing; flow: the sampling grid's shift (process=flow refuses a name, vp a number)
    "spacing": optional(
        Rule(
            lambda v: (
                v in ("leading", "trailing", "linspace")
                or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
            ),
            "leading | trailing | linspace (vp) or a number > 0 (flow: the grid's shift)",
        )
    ),
    "variance": one_of(["small", "large"]),
    "euler_above": optional(non_negative()),
    # EDM stochastic churn (euler, heun; continuous processes)
    "s_churn": non_negative(),
    "s_tmin": non_negative(),
    "s_tmax": Rule(
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
        "a number >= 0 (.inf: no upper limit)",
    ),
    "s_noise": non_negative(),
}


def nulls_only_where_meaningful(sampler: dict):
    """steps=null means "every timestep" for ddpm and "the checkpoint's" for sampler=checkpoint; eta=null only the
    latter. A configured sampler function would crash on them."""
    target = str(sampler.get("_target_", ""))
    if not target:
        return None
    if "steps" in sampler and sampler["steps"] is None and not target.endswith(".ddpm"):
        return "steps", "an integer >= 1 (null only for sampler=ddpm or sampler=checkpoint)"
    if "eta" in sampler and sampler["eta"] is None:
        return "eta", "a number >= 0 (null only for sampler=checkpoint)"
    return None


CHECKS = [nulls_only_where_meaningful]
