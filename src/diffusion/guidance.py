"""Guidance methods and the guided model function every sampler consumes.

Convention (diffusers' ``guidance_scale``): ``out = uncond + scale * (cond - uncond)``; ``scale = 1 + w`` in Ho &
Salimans' notation ``(1 + w) cond - w uncond``, so ``scale = 1`` is plain conditional sampling (one forward pass) and
``scale = 0`` is unconditional. Guidance acts on the network's raw output (eps, x0 or v: the combination is linear,
so for a fixed x_t it is the same in every parameterisation); rescale (Lin et al.) matches the per-sample std of
the guided output to the conditional one; the interval (Kynkaanniemi et al.) limits guidance to a noise range.

The guidance interval's unit, for every process: sigma_ve = sigma / alpha, the variance-exploding (EDM) noise level
(sqrt((1 - alpha_bar) / alpha_bar) on vp, sigma itself on edm, t / (1 - t) on flow).

Methods (``GUIDANCE_METHODS``, chosen by ``guidance.method``): each is one function
``method(step: GuidanceStep, scale, **options) -> (x0_hat, eps_hat)`` of the two network outputs of one step
(conditional and reference: the unconditional one, or the guide network's for autoguidance); ``scale`` is a float
or a per-sample tensor (per-class scales). Outside the interval every method returns the plain conditional
prediction (one forward pass; autoguidance_cfg: outside both of its bands). ``cfg`` (classifier-free guidance), ``cfgpp`` (CFG++), ``apg`` (adaptive projected
guidance), ``autoguidance``, ``autoguidance_cfg`` (autoguidance plus CFG in its own band: the only method with two
references, the guide's and the unconditional output).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import torch

from difflab.diffusion.objectives import clip_x0, eps_from_x0, input_scale, predictions_from_output
from difflab.registry import CFGPP_LAMBDA, cfgpp_lambda_ok
from difflab.utils.errors import ConfigError

if TYPE_CHECKING:
    from difflab.diffusion.processes import NoiseProcess
    from difflab.diffusion.system import Diffusion

log = logging.getLogger(__name__)
Tensor = torch.Tensor
ModelFn = Callable[[Tensor, float], tuple[Tensor, Tensor]]
Scale = float | Tensor  # a guidance scale: one number, or one per sample (per-class scales)
# net(x_in, net_time, cond) -> raw output; a guide: net(x_in, net_time) with its conditioning bound in
CondNet = Callable[[Tensor, Tensor, dict[str, Any]], Tensor]
GuideNet = Callable[[Tensor, Tensor], Tensor]


def _per_sample(value: Scale, like: Tensor) -> Tensor | float:
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return float(value)


def cfg_combine(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """uncond + scale (cond - uncond); ``scale`` may be a float or a per-sample tensor (per-class scales)."""
    return uncond + _per_sample(scale, cond) * (cond - uncond)


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al.'s guidance rescale: match the per-sample std of the conditional output, mixed by ``phi``."""
    if phi <= 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-12))
    return phi * rescaled + (1 - phi) * guided


def check_interval(interval: Sequence[float | None] | None) -> tuple[float, float] | None:
    """Validate a guidance interval [sigma_lo, sigma_hi] (None entries: 0 / inf); None means always guide."""
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"guidance.interval must be [sigma_lo, sigma_hi] or null, got {list(interval)}")
    lo = 0.0 if interval[0] is None else float(interval[0])
    hi = math.inf if interval[1] is None else float(interval[1])
    if not 0 <= lo < hi:
        raise ValueError(f"guidance.interval needs 0 <= sigma_lo < sigma_hi, got [{lo}, {hi}]")
    return lo, hi


def guidance_active(sigma: float, interval: Sequence[float | None] | None) -> bool:
    """Guidance interval (Kynkaanniemi et al.): guide only when sigma_lo < sigma <= sigma_hi; None = always.

    sigma is the variance-exploding noise level sigma_ve = sigma / alpha of the current time (module docstring).
    """
    return bool(guidance_active_per_sample(torch.tensor([float(sigma)], dtype=torch.float64), interval))


def guidance_active_per_sample(sigma: Tensor, interval: Sequence[float | None] | None) -> Tensor:
    """``guidance_active`` for a tensor of noise levels sigma_ve (one per sample): a bool tensor of its shape."""
    bounds = check_interval(interval)
    if bounds is None:
        return torch.ones_like(sigma, dtype=torch.bool)
    lo, hi = bounds
    return (sigma > lo) & (sigma <= hi)


def concat_cond(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Concatenate two conditioning dicts along the batch (None entries stay None)."""
    return {k: (None if a[k] is None else torch.cat([a[k], b[k]])) for k in a}


# --------------------------------------------------------------------------------------------------- methods
@dataclass
class GuidanceStep:
    """One guided step: the raw network outputs (conditional ``out_c``, reference ``out_r``: unconditional, or the
    guide's for autoguidance), their conversion to float64 (x0, eps) at this x_t, and the per-sampling-call state
    (APG's momentum)."""

    out_c: Tensor
    out_r: Tensor
    to_x0_eps: Callable[[Tensor], tuple[Tensor, Tensor]]
    x_t: Tensor  # float64
    alpha: Tensor  # float64, broadcastable to x_t
    sigma: Tensor
    state: dict[str, Any] = field(default_factory=dict)
    out_u: Tensor | None = None  # the unconditional output too, for a guide-based method that also takes CFG's


# method(step: GuidanceStep, scale: Scale, **options) -> (x0_hat, eps_hat): a Guidance class's ``combine``
GuidanceMethod = Callable[..., tuple[Tensor, Tensor]]


def cfg(step: GuidanceStep, scale: Scale, rescale: float = 0.0, **_: Any) -> tuple[Tensor, Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598): u + s (c - u) on the raw output, then
    Lin et al.'s rescale (arXiv 2305.08891); the pair is the one consistent with x_t."""
    return step.to_x0_eps(rescale_guidance(cfg_combine(step.out_c, step.out_r, scale), step.out_c, rescale))


def cfgpp(step: GuidanceStep, scale: Scale, **_: Any) -> tuple[Tensor, Tensor]:
    """CFG++ (Chung et al. 2024, arXiv 2406.08070): x0_hat from eps_u + lambda (eps_c - eps_u) with lambda = scale
    in [0, 1], and eps_hat = the UNCONDITIONAL eps, so a DDIM step re-noises with eps_u:
    x' = alpha' x0_lambda + sigma' eps_u. The pair is deliberately not consistent with x_t.

    Samplers that take eps_hat from model_fn see the re-noising: ddim, euler (the same update) and heun (both slopes
    with eps_u: our extension); dpmpp_2m and ddpm use x0_hat alone, so there CFG++ acts as CFG at scale lambda (the
    paper's DPM++ variant would need a sampler change)."""
    x0, _eps = step.to_x0_eps(cfg_combine(step.out_c, step.out_r, scale))
    _x0, eps_u = step.to_x0_eps(step.out_r)
    return x0, eps_u


def apg(
    step: GuidanceStep, scale: Scale, eta: float = 0.0, norm_threshold: float = 0.0, momentum: float = 0.0, **_: Any
) -> tuple[Tensor, Tensor]:
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416) on the denoised predictions:
    diff = x0_c - x0_u, with momentum a running sum diff + momentum * previous (over this sampling call's guided
    model evaluations), norm-clipped to ``norm_threshold`` (0: off; L2 over each sample), split into the parts
    parallel and orthogonal to x0_c; x0 = x0_c + (s - 1) (orthogonal + eta parallel). eps_hat is recomputed so the
    pair is consistent with x_t. Same result as diffusers' ``normalized_guidance(x0_c, x0_u, s - 1, ...,
    use_original_formulation=True)``."""
    x0_c, _eps_c = step.to_x0_eps(step.out_c)
    x0_u, _eps_u = step.to_x0_eps(step.out_r)
    dims = tuple(range(1, x0_c.ndim))
    diff = x0_c - x0_u
    if momentum != 0.0:
        diff = diff + momentum * step.state.get("running", 0.0)
        step.state["running"] = diff
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    # torch's stub types normalize's dim as int; it is handed to Tensor.norm, which takes a tuple of dims
    unit = torch.nn.functional.normalize(x0_c, dim=dims)  # type: ignore[arg-type]
    parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
    update = (diff - parallel) + eta * parallel
    x0 = x0_c + (_per_sample(scale, x0_c) - 1) * update
    return x0, eps_from_x0(step.x_t, x0, step.alpha, step.sigma)


def autoguidance(step: GuidanceStep, scale: Scale, rescale: float = 0.0, **_: Any) -> tuple[Tensor, Tensor]:
    """Autoguidance (Karras et al. 2024, arXiv 2406.02507): D = D_guide + w (D_main - D_guide) with both networks
    conditional and D_guide a weaker version of the main model (edm2's ``gnet(x).lerp(net(x), w)``); w = scale, on
    the raw output (linear, so the same in every parameterisation, as the guide shares process and prediction)."""
    return cfg(step, scale, rescale)


def autoguidance_cfg(
    step: GuidanceStep, scale: Scale, rescale: float = 0.0, cfg_scale: float = 1.0, **_: Any
) -> tuple[Tensor, Tensor]:
    """Autoguidance and classifier-free guidance added (Karras et al. 2024 note the two combine): D = D_c + (w - 1)
    (D_c - D_guide) + (s - 1) (D_c - D_uncond), w = ``scale``, s = ``cfg_scale``, on the raw output. A reference
    outside its own band is the conditional output itself, so its term vanishes there."""
    out_u = step.out_c if step.out_u is None else step.out_u
    ag = cfg_combine(step.out_c, step.out_r, scale)
    guided = ag + (float(cfg_scale) - 1.0) * (step.out_c - out_u)
    return step.to_x0_eps(rescale_guidance(guided, step.out_c, rescale))


# --------------------------------------------------------------------------------------------------- objects
NOT_OPTIONS = ("scale", "interval", "per_class", "guide_ckpt", "keep_at")  # settings that are not combine's options
GUIDANCE_METHODS: dict[str, type["Guidance"]] = {}  # guidance.method name -> class (every subclass registers)


class Guidance:
    """Classifier-free guidance settings (``configs/guidance/cfg.yaml``) and the base of every method: a subclass
    names itself (``name``), its combination of one step's outputs (``combine``) and its keyword options."""

    name = "cfg"
    combine: GuidanceMethod = staticmethod(cfg)
    uses_guide = False  # the reference output comes from a guide network, not the null condition
    uses_null_too = False  # a guide-based method that also takes the unconditional output (in ``cfg_interval``)
    own_eps = False  # eps_hat is kept after x0 clipping (not rebuilt from x0)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        GUIDANCE_METHODS[cls.name] = cls

    def __init__(
        self,
        scale: float = 1.0,
        rescale: float = 0.0,
        interval: Sequence[float | None] | None = None,
        per_class: dict[Any, float] | None = None,
    ) -> None:
        self.scale, self.rescale, self.interval, self.per_class = scale, rescale, interval, per_class
        self.check()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The settings this method takes (its constructor's arguments)."""
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    @property
    def method(self) -> str:
        return self.name

    def settings(self) -> dict[str, Any]:
        """The method name and every setting, as a config would write them."""
        return {"method": self.name, **{k: getattr(self, k) for k in self.keys()}}

    def options(self) -> dict[str, Any]:
        """The method's own keyword options passed to ``combine`` (beyond scale, interval and per-class scales)."""
        return {k: getattr(self, k) for k in self.keys() if k not in NOT_OPTIONS}

    def check(self) -> None:
        """Refuse settings this method cannot use (one line, naming the key)."""
        try:
            check_method(self.name, self.scale)
            check_interval(self.interval)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def updated(self, overrides: dict[str, Any] | None = None) -> "Guidance":
        """A copy with the non-None entries of ``overrides`` on top; ``method`` switches to another method's class
        (keeping the shared settings it also takes)."""
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        if not overrides:
            return self
        method = overrides.pop("method", self.name)
        if method not in GUIDANCE_METHODS:
            raise ConfigError(f"guidance.method={method!r} is unknown: one of {', '.join(GUIDANCE_METHODS)}")
        cls = GUIDANCE_METHODS[method]
        merged = {**self.settings(), **overrides}
        unknown = sorted(set(overrides) - set(cls.keys()))
        if unknown:
            raise ConfigError(
                f"guidance.{unknown[0]} is not a setting of guidance.method={method} (its settings: "
                f"{', '.join(cls.keys())})"
            )
        new = cls(**{k: merged[k] for k in cls.keys() if k in merged})
        new.carry_state_from(self)
        return new

    def scales(self, raw: Any, num_classes: int | None, scale: Scale | None = None) -> Scale:
        """The scale per sample: ``per_class`` overrides for labelled samples, else the global (or given) scale."""
        scale = self.scale if scale is None else scale
        if self.per_class and isinstance(raw, Tensor) and num_classes:
            table = torch.full((num_classes + 1,), float(scale))
            for k, v in dict(self.per_class).items():
                table[int(k)] = float(v)
            return table[raw.cpu()].to(raw.device)
        return scale

    def reference(self, raw: Any, main: Diffusion) -> GuideNet | None:
        """The reference network for methods that use a guide (None: the null condition is the reference)."""
        return None

    def in_effect(self) -> "Guidance":
        """The guidance that samples now (itself, unless what it needs does not exist yet)."""
        return self

    def carry_state_from(self, other: "Guidance") -> None:
        """Take over what ``other`` holds at run time (a loaded or kept guide) when built from its settings."""

    def network_conditions(
        self, cond: dict[str, Any], null: dict[str, Any] | None, scale: Scale
    ) -> tuple[dict[str, Any], dict[str, Any] | None, Scale]:
        """The conditions, null conditions and scale the guided model function combines (unchanged, except for a
        method that hands the scale to the network itself)."""
        return cond, null, scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items() if k != 'method')})"


class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022): the base class under its config name."""


class CFGpp(Guidance):
    """CFG++ (Chung et al. 2024): lambda = scale in [0, 1], re-noised with the unconditional eps."""

    name = "cfgpp"
    combine = staticmethod(cfgpp)
    own_eps = True

    def __init__(
        self,
        scale: float = 0.6,
        interval: Sequence[float | None] | None = None,
        per_class: dict[Any, float] | None = None,
    ) -> None:
        self.scale, self.interval, self.per_class = scale, interval, per_class
        self.check()


class APG(Guidance):
    """Adaptive projected guidance (Sadat et al. 2024) on the denoised predictions."""

    name = "apg"
    combine = staticmethod(apg)

    def __init__(
        self,
        scale: float = 1.0,
        eta: float = 0.0,
        norm_threshold: float = 0.0,
        momentum: float = 0.0,
        interval: Sequence[float | None] | None = None,
        per_class: dict[Any, float] | None = None,
    ) -> None:
        self.scale, self.interval, self.per_class = scale, interval, per_class
        self.eta, self.norm_threshold, self.momentum = eta, norm_threshold, momentum
        self.check()


class DistilledGuidance(Guidance):
    """Guidance learned by a guidance-distilled student (Meng et al. 2023, arXiv 2210.03142; ``method.guidance_scales``
    of progressive distillation, reflow, consistency distillation and sCM): the network takes the scale as an input
    and samples with one conditional pass per step, any scale from one student. The guidance interval and rescale were
    the teacher's and are in what it learned."""

    name = "distilled"

    def __init__(self, scale: float = 1.0, per_class: dict[Any, float] | None = None) -> None:
        self.scale, self.per_class = scale, per_class
        self.rescale, self.interval = 0.0, None
        self.check()

    def network_conditions(
        self, cond: dict[str, Any], null: dict[str, Any] | None, scale: Scale
    ) -> tuple[dict[str, Any], dict[str, Any] | None, Scale]:
        w = scale.float() if isinstance(scale, Tensor) else torch.tensor(float(scale))
        return {**cond, "guidance_scale": w}, None, 1.0


KEPT_GUIDE = "kept"  # guidance.guide_ckpt value: the run's own weights kept early in training (KeepGuide)


class Autoguidance(Guidance):
    """Autoguidance (Karras et al. 2024): the reference is a weaker model of the same setup, read from
    ``guide_ckpt`` once (EMA weights), checked against the main model and kept outside its module tree.

    ``guide_ckpt: kept`` guides with the run's own EMA weights copied at ``keep_at`` of its training budget
    (``difflab.callbacks.keep_guide.KeepGuide`` keeps them; every later checkpoint and export carries them), so a
    recipe guides itself with no second model to train. Until they exist (early in training, or a checkpoint
    saved before ``keep_at``) sampling falls back to CFG at the same scale, said once in the log."""

    name = "autoguidance"
    combine = staticmethod(autoguidance)
    uses_guide = True

    def __init__(
        self,
        scale: float = 1.0,
        guide_ckpt: str | None = None,
        rescale: float = 0.0,
        interval: Sequence[float | None] | None = None,
        per_class: dict[Any, float] | None = None,
        keep_at: float = 0.2,
    ) -> None:
        self.guide_ckpt = None if guide_ckpt is None else str(guide_ckpt)
        self.keep_at = float(keep_at)
        super().__init__(scale, rescale, interval, per_class)
        self._held: tuple[str | None, Any] | None = None
        self._kept: dict[str, Any] = {}  # shared by shallow copies (EMA module, per-call overrides): guide, step

    @property
    def uses_kept_guide(self) -> bool:
        """Whether the guide is the run's own early weights (kept in its checkpoints) rather than a file."""
        return self.guide_ckpt == KEPT_GUIDE

    def check(self) -> None:
        super().check()
        if not self.guide_ckpt:
            raise ConfigError(
                f"guidance.method={self.name} needs guidance.guide_ckpt (a weaker checkpoint of the same "
                "setup: an earlier step, a shorter EMA or a smaller model; or `kept`: this run's own early weights)"
            )
        if not 0.0 < self.keep_at < 1.0:
            raise ConfigError(
                f"guidance.keep_at={self.keep_at} is invalid: the fraction of the training budget (0 < keep_at < 1) "
                "at which the run keeps its guide"
            )

    # the loaded guide is shared, never copied into an EMA
    def __deepcopy__(self, memo: dict[int, Any]) -> "Autoguidance":
        clone = copy.copy(self)
        return clone

    def carry_state_from(self, other: Guidance) -> None:
        if isinstance(other, Autoguidance) and other.guide_ckpt == self.guide_ckpt:
            self._held, self._kept = other._held, other._kept

    # ---------------------------------------------------------------- the kept guide
    def keep(self, state_dict: dict[str, Tensor], step: int, like: Any) -> None:
        """Hold ``state_dict`` (a module's weights at ``step``) as the guide, in a frozen copy of the module ``like``."""
        guide = copy.deepcopy(like)
        guide.load_state_dict(state_dict)
        guide.requires_grad_(False)
        guide.eval()
        self._kept.clear()
        self._kept.update(guide=guide, step=int(step))

    @property
    def kept_step(self) -> int | None:
        """The training step of the kept guide's weights (None: none kept yet)."""
        return self._kept.get("step")

    def kept_state(self) -> dict[str, Any] | None:
        """``{"step", "state_dict"}`` of the kept guide for a checkpoint (None when none is kept)."""
        if "guide" not in self._kept:
            return None
        state = {k: v.detach().cpu() for k, v in self._kept["guide"].state_dict().items()}
        return {"step": self._kept["step"], "state_dict": state}

    def in_effect(self) -> Guidance:
        if not self.uses_kept_guide or "guide" in self._kept:
            return self
        fallback = self.before_guide()
        if not self._kept.get("warned"):
            log.warning(
                "%s with the kept guide: no guide kept yet (it is kept at %.0f%% of the training budget); "
                "sampling with %s until then",
                self.name,
                100 * self.keep_at,
                fallback,
            )
            self._kept["warned"] = True
        return fallback

    def before_guide(self) -> Guidance:
        """What samples until the kept guide exists: CFG at the same scale."""
        return CFG(self.scale, self.rescale, self.interval, self.per_class)

    # ---------------------------------------------------------------- the guide network
    def guide_model(self, main: Diffusion) -> Any:
        """The guide (a module with its own ``Diffusion``): the kept one, or one loaded once from ``guide_ckpt`` and
        checked against ``main`` (a ``Diffusion``); on main's device."""
        if self.uses_kept_guide:
            if "guide" not in self._kept:
                raise ValueError("autoguidance with guide_ckpt=kept: no guide has been kept yet")
            return self._kept["guide"].to(main.device)
        if self._held is None or self._held[0] != self.guide_ckpt:
            from difflab.checkpoints import module_from_checkpoint  # file IO stays out of the math's imports

            guide = module_from_checkpoint(cast(str, self.guide_ckpt))  # check() refused a missing guide_ckpt
            main.check_guide(guide, self.guide_ckpt)
            guide.requires_grad_(False)
            self._held = (self.guide_ckpt, guide)
        return self._held[1].to(main.device)

    def reference(self, raw: Any, main: Diffusion) -> GuideNet:
        guide = self.guide_model(main)
        if raw is None and guide.diffusion.conditioner.batch_key is not None:
            raise ValueError("autoguidance needs the raw conditions (labels / prompts) to condition its guide")
        cond = guide.diffusion.condition(raw)
        return lambda x_in, t_net: guide(x_in, t_net, cond["vector"], cond["context"], cond["context_mask"])


class AutoguidanceCFG(Autoguidance):
    """Autoguidance at ``scale`` in ``interval`` plus CFG at ``cfg_scale`` in ``cfg_interval`` (sigma / alpha bands):
    the guide keeps diversity, the unconditional reference keeps the class. Where both bands hold a step costs three
    network evaluations (two batched), in one band two, outside both one. Before the kept guide exists it samples as
    CFG at ``cfg_scale`` in ``cfg_interval``. A per-call scale (a guidance grid's, a callback's ``guidance_scale``) is
    the guide's w: scale 1 is CFG in its band alone, not the plain conditional model."""

    name = "autoguidance_cfg"
    combine = staticmethod(autoguidance_cfg)
    uses_null_too = True

    def __init__(
        self,
        scale: float = 1.0,
        guide_ckpt: str | None = None,
        rescale: float = 0.0,
        interval: Sequence[float | None] | None = None,
        per_class: dict[Any, float] | None = None,
        keep_at: float = 0.2,
        cfg_scale: float = 1.0,
        cfg_interval: Sequence[float | None] | None = None,
    ) -> None:
        self.cfg_scale, self.cfg_interval = float(cfg_scale), cfg_interval
        super().__init__(scale, guide_ckpt, rescale, interval, per_class, keep_at)

    def check(self) -> None:
        super().check()
        if self.cfg_scale < 0:
            raise ConfigError(f"guidance.cfg_scale={self.cfg_scale} is invalid: CFG's scale is >= 0 (1 = no CFG term)")
        try:
            check_interval(self.cfg_interval)
        except ValueError as err:
            raise ConfigError(str(err).replace("guidance.interval", "guidance.cfg_interval")) from None

    def before_guide(self) -> Guidance:
        return CFG(self.cfg_scale, self.rescale, self.cfg_interval, None)


def check_method(method: str, scale: Scale | None = None) -> None:
    """Fail on an unknown method, or a CFG++ lambda (the scale) outside [0, 1]."""
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"guidance.method={method!r} is unknown: one of {', '.join(GUIDANCE_METHODS)}")
    if method == "cfgpp" and scale is not None:
        values = scale.flatten().tolist() if isinstance(scale, Tensor) else [float(scale)]
        if not cfgpp_lambda_ok(values):
            shown = scale if not isinstance(scale, Tensor) else values
            raise ValueError(f"guidance.scale={shown} is invalid: {CFGPP_LAMBDA}")


def _plain_conditional(method: str, scale: Scale, has_reference: bool) -> bool:
    """Whether one conditional forward pass gives the method's result: no reference, or scale 1 (except CFG++,
    whose lambda = 1 still re-noises with the unconditional eps)."""
    if not has_reference:
        return True
    return method != "cfgpp" and not isinstance(scale, Tensor) and float(scale) == 1.0


def guided_model_fn(
    net: CondNet,
    process: NoiseProcess,
    prediction: str,
    cond: dict[str, Any],
    null_cond: dict[str, Any] | None = None,
    scale: Scale = 1.0,
    rescale: float = 0.0,
    interval: Sequence[float | None] | None = None,
    x0_clip: str | Callable[[Tensor], Tensor] | None = None,
    sigma_data: float = 0.5,
    method: str = "cfg",
    options: dict[str, Any] | None = None,
    guide: GuideNet | None = None,
) -> ModelFn:
    """Wrap ``net(x_in, net_time, cond) -> output`` into ``model_fn(x_t, t) -> (x0_hat, eps_hat)`` with guidance.

    ``t`` is a scalar process time (``process.sampling_times`` entries); ``model_fn(x_t, t, end)`` hands the network
    the interval net_time(t) - net_time(end) as ``cond["interval"]`` (an average-velocity network's step from t to
    ``end``; a DDIM step to ``end`` with that prediction is MeanFlow's update). The process gives the path coefficients
    and the denoiser's time input, the prediction type converts the output. ``method`` names a ``GUIDANCE_METHODS``
    entry, ``options`` its keys (apg: eta, norm_threshold, momentum); the reference output is the unconditional one
    (conditional and unconditional passes run as one batched forward) or, for autoguidance, ``guide(x_in, net_time)``
    (the guide network with its own conditioning bound in). ``x0_clip`` is a mode name (none / static / dynamic) or a
    callable (``Objective.x0_clip``); after clipping, eps is recomputed from the clipped x0 so the pair stays
    consistent with x_t (as GLIDE does), which every sampler relies on (CFG++ keeps its unconditional eps). State
    (APG's momentum) lives in this closure: a new model_fn per sampling call starts afresh. Conversions run in
    float64; outputs have x_t's dtype.
    """
    check_method(method, scale)
    rule = GUIDANCE_METHODS[method]
    uses_guide = rule.uses_guide
    if uses_guide and guide is None and not _plain_conditional(method, scale, True):
        raise ValueError(f"guidance.method={method} needs a guide network (guidance.guide_ckpt)")
    opts = {**(options or {}), "rescale": rescale}
    null_bounds = check_interval(opts.get("cfg_interval"))  # autoguidance_cfg: the unconditional pass's own band
    null_too = rule.uses_null_too and null_cond is not None and float(opts.get("cfg_scale", 1.0)) != 1.0
    opts = {k: opts[k] for k in rule.keys() if k not in NOT_OPTIONS and opts.get(k) is not None}
    single = _plain_conditional(method, scale, guide is not None if uses_guide else null_cond is not None)
    bounds = check_interval(interval)  # fail on a bad interval before sampling starts
    clip: Callable[[Tensor], Tensor] | None
    if callable(x0_clip):
        clip = x0_clip
    elif x0_clip in (None, "none"):
        clip = None
    else:
        clip = lambda x0: clip_x0(x0, x0_clip)  # noqa: E731
    state: dict[str, Any] = {}

    def model_fn(x_t: Tensor, t: float, end: float | None = None) -> tuple[Tensor, Tensor]:
        t64 = torch.full((x_t.shape[0],), float(t), dtype=torch.float64, device=x_t.device)
        alpha, sigma = process.coefficients(t64[:1])
        sigma_ve = float(sigma / alpha) if float(alpha) > 0 else math.inf
        x_in = x_t * float(input_scale(alpha, sigma, prediction, sigma_data))
        t_net = process.net_time(t64).to(x_t.device)
        c, n = cond, null_cond
        if end is not None:  # an average-velocity (MeanFlow) network's prediction over [end, t]
            interval = t_net - process.net_time(torch.full_like(t64, float(end))).to(x_t.device)
            c = {**cond, "interval": interval}
            n = None if null_cond is None else {**null_cond, "interval": interval}
        x64 = x_t.to(torch.float64)
        a, s = (v.to(x64.device).reshape(1, *([1] * (x64.ndim - 1))) for v in (alpha, sigma))
        derivs = process.derivatives(t64[:1]) if prediction == "flow" else (None, None)
        da, ds = (None if v is None else v.to(x64.device).reshape(a.shape) for v in derivs)

        def to_x0_eps(out: Tensor) -> tuple[Tensor, Tensor]:
            return predictions_from_output(out.to(torch.float64), x64, a, s, prediction, da, ds, sigma_data)

        referenced = not single and guidance_active(sigma_ve, bounds)
        unconditional_too = null_too and guidance_active(sigma_ve, null_bounds)
        if not (referenced or unconditional_too):
            x0, eps = to_x0_eps(net(x_in, t_net, c))
            own_eps = False
        else:
            out_u = None
            if uses_guide:
                # a guide is given when referenced (the check above); a reference outside its band is out_c
                if unconditional_too:
                    out_c, out_u = net(
                        torch.cat([x_in, x_in]), torch.cat([t_net, t_net]), concat_cond(c, cast("dict[str, Any]", n))
                    ).chunk(2)
                else:
                    out_c = net(x_in, t_net, c)
                out_r = cast(GuideNet, guide)(x_in, t_net) if referenced else out_c
            else:
                both = net(
                    torch.cat([x_in, x_in]),
                    torch.cat([t_net, t_net]),
                    concat_cond(c, cast("dict[str, Any]", n)),
                )
                out_c, out_r = both.chunk(2)
            step = GuidanceStep(out_c, out_r, to_x0_eps, x64, a, s, state, out_u)
            x0, eps = rule.combine(step, scale, **opts)
            own_eps = rule.own_eps
        if clip is not None:
            x0 = clip(x0)
            if not own_eps:
                eps = eps_from_x0(x64, x0, a, s)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    return model_fn
