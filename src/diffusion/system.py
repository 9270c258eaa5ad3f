"""Diffusion: a noise process, an objective, a sampler, guidance, a conditioner and an optional decoder, composed
into training losses and sampling for any denoiser, with no Lightning.

``net`` below is any callable ``net(x_in, t_net, vector, context, context_mask) -> output`` (a difflab denoiser, or
a ``DiffusionModule``, whose forward is its denoiser's): the object holds no weights of the network it trains or
samples, so one ``Diffusion`` serves a model, its EMA copy and an autoguidance guide alike. From a notebook::

    diffusion, denoiser = load_for_sampling("run/checkpoints/last.ckpt")
    images = diffusion.sample(denoiser, 16)   # balanced labels / prompts, the checkpoint's sampler and guidance
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from torch import nn

from difflab.conditioning.base import Conditioner, NoConditioner
from difflab.conditioning.templates import labels_to_prompts
from difflab.diffusion.guidance import CFG, Guidance, ModelFn, Scale, guided_model_fn
from difflab.diffusion.objectives import LOG_SNR_BUCKET_RANGE, Objective, log_snr_buckets
from difflab.diffusion.processes import FlowProcess, NoiseProcess, frame_shift
from difflab.diffusion.samplers import Sampler, check_sampler, sampler_name
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen

log = logging.getLogger(__name__)

Net = Callable[..., torch.Tensor]
# optional keyword inputs of a denoiser beside (x, t, conditions): MeanFlow's interval, a distilled student's scale
NETWORK_INPUTS = ("interval", "guidance_scale")
VALIDATION_SEED = 1234  # validation noise and times: seed + batch index, the same in every run and every arm


def network_inputs(cond: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optional keyword inputs of a network call (``NETWORK_INPUTS``: MeanFlow's interval, a distilled student's
    guidance scale) that the conditions carry: a denoiser without such an input is never handed one."""
    return {k: cond[k] for k in NETWORK_INPUTS if cond.get(k) is not None}


def _device_of(net: Any, fallback: torch.device) -> torch.device:
    if isinstance(net, nn.Module):
        for p in net.parameters():
            return p.device
    return fallback


class Diffusion:
    """Training losses and sampling of one diffusion setup (process + objective + sampler + guidance + conditioner,
    with the frozen autoencoder that decodes latents). Its checks run when it is built, so a bad combination fails
    before any network exists."""

    def __init__(
        self,
        process: NoiseProcess,
        objective: Objective,
        sampler: Sampler,
        guidance: Guidance | None = None,
        conditioner: Conditioner | None = None,
        autoencoder: Any = None,
        sample_shape: Sequence[int] = (1, 16, 16),
        p_uncond: float = 0.1,
        class_names: Sequence[str] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        self.check_pairing(process, objective, sampler)
        self.process, self.objective, self.sampler = process, objective, sampler
        self.guidance = guidance if guidance is not None else CFG()
        self.conditioner = conditioner if conditioner is not None else NoConditioner()
        # a Frozen autoencoder, None (pixel models), or any object with the same interface (``module.decode``)
        self.autoencoder: Any = Frozen(autoencoder) if isinstance(autoencoder, nn.Module) else autoencoder
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.p_uncond = p_uncond
        self.class_names = list(class_names) if class_names else None
        self.prompts = list(prompts) if prompts else None
        if hasattr(self.conditioner, "prepare_table") and self.prompts:
            # nn.Module.__getattr__ types a subclass's attributes as Tensor | Module
            self.conditioner.prepare_table(self.prompts)  # type: ignore[operator]  # embeddings for the prompt set

    @staticmethod
    def check_pairing(process: NoiseProcess, objective: Objective, sampler: Sampler) -> None:
        """Refuse an objective or a sampler the process does not define (one line; the pre-flight calls it too)."""
        try:
            objective.check_process(process)
            check_sampler(sampler, process)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    # ---------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        for p in self.conditioner.parameters():
            return p.device
        for b in self.conditioner.buffers():
            return b.device
        return getattr(self, "_device", torch.device("cpu"))

    def to(self, device: str | torch.device) -> "Diffusion":
        """Move the conditioner and the autoencoder (the networks this object holds); returns self."""
        self.conditioner.to(device)
        if isinstance(self.autoencoder, Frozen):
            self.autoencoder.to(device)
        self._device = torch.device(device)
        return self

    # ---------------------------------------------------------------- conditions
    def condition(self, raw: Any) -> dict[str, Any]:
        """Conditioning dict (vector / context / mask) for raw conditions (labels, prompts, or None)."""
        return cast("dict[str, Any]", self.conditioner(raw))  # nn.Module.__call__ returns Any

    def batch_condition(self, batch: dict[str, Any]) -> Any:
        """The raw conditions of a batch (labels mapped to prompts for a text model on a class dataset)."""
        key = self.conditioner.batch_key
        if key is None:
            return None
        if key == "text" and "text" not in batch and "label" in batch and self.prompts:
            return labels_to_prompts(batch["label"], self.prompts)
        if key not in batch:
            raise ConfigError(
                f"conditioner {type(self.conditioner).__name__} needs batch['{key}'] but the datamodule "
                f"yields only {sorted(batch)}; pick a matching conditioning= or datamodule="
            )
        return batch[key]

    def default_conditions(self, n: int, device: torch.device | None = None) -> torch.Tensor | list[str] | None:
        """Balanced raw conditions for n samples: cycling class labels, prompts, or None."""
        key = self.conditioner.batch_key
        if key == "label":
            # nn.Module.__getattr__ types num_classes (an int of the label conditioner) as Tensor | Module
            num_classes: int = self.conditioner.num_classes  # type: ignore[assignment]
            return torch.arange(n, device=device or self.device) % num_classes
        if key == "text":
            prompts = self.prompts or [""]
            return [prompts[i % len(prompts)] for i in range(n)]
        return None

    def null_condition(self, raw: Any) -> Any:
        return self.conditioner.null_like(raw)

    # ---------------------------------------------------------------- training
    def losses(
        self,
        net: Net,
        batch: dict[str, Any],
        drop_conditions: bool = True,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses on a batch: conditions dropped with probability ``p_uncond`` when ``drop_conditions``,
        times from the process's density unless ``t`` is given, fresh noise unless ``noise`` is given (a coupling's),
        the network's optional ``inputs`` (``NETWORK_INPUTS``: a distilled student's guidance scale) when given."""
        raw = self.batch_condition(batch)
        if drop_conditions:
            raw = self.conditioner.drop(raw, self.p_uncond)
        cond = {**self.condition(raw), **(inputs or {})}
        if t is None:
            t = self.frame_shifted_times(batch, generator)
        call = lambda x_in, t_net: net(  # noqa: E731
            x_in, t_net, cond["vector"], cond["context"], cond["context_mask"], **network_inputs(cond)
        )
        return self.objective.losses(call, batch["x"], self.process, t=t, generator=generator, eps=noise)

    def loss(self, net: Net, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss of a batch (mean of ``losses``)."""
        return self.losses(net, batch, generator=generator)["loss"].mean()

    def x0_estimate(self, net: Net, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The denoiser's x0 estimate (float32) at noisy ``x_t`` and per-sample process times ``t``, unguided: what a
        distillation loss compares with its target (a consistency model's f(x, t))."""
        return self.x0_eps_estimate(net, x_t, t, cond)[0]

    def x0_eps_estimate(
        self, net: Net, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's unguided (x0, eps) estimates (float32) at ``x_t`` and per-sample process times ``t``;
        differentiable in both, forward mode included (``torch.func.jvp``)."""
        path = self.objective.path_at(self.process, t, x_t)
        out = net(
            x_t * self.objective.input_scale(path["alpha"], path["sigma"]),
            self.process.net_time(t).to(x_t.device),
            cond["vector"],
            cond["context"],
            cond["context_mask"],
            **network_inputs(cond),
        )
        return self.objective.to_x0_eps(out.float(), x_t.float(), {k: v.float() for k, v in path.items()})

    def frame_shifted_times(self, batch: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor | None:
        """Training times of a video batch under ``process.frame_shift_base`` (flow): the process's density with
        ``frame_shift(shift, T, frame_shift_base, H W, H0 W0)`` per sample, T from ``batch["num_frames"]`` or the
        clips' frame axis, H0 x W0 the configured sample size. None otherwise (the objective draws its own)."""
        base = getattr(self.process, "frame_shift_base", None)
        x0 = batch["x"]
        if base is None or x0.ndim != 5:
            return None
        n = x0.shape[0]
        frames = batch.get("num_frames")
        frames = torch.full((n,), x0.shape[2]) if frames is None else torch.as_tensor(frames).reshape(-1).expand(n)
        base_pixels = int(self.sample_shape[-2]) * int(self.sample_shape[-1]) if len(self.sample_shape) >= 2 else None
        process = cast(FlowProcess, self.process)  # only the flow process has a frame_shift_base
        shift = frame_shift(
            process.shift,
            frames.to(device=x0.device, dtype=torch.float64),
            base,
            x0.shape[-2] * x0.shape[-1],
            base_pixels,
        )
        return process.sample_times(n, device=x0.device, generator=generator, shift=shift)

    def validation_losses(
        self, net: Net, batch: dict[str, Any], batch_idx: int, buckets: int = 10
    ) -> dict[str, torch.Tensor]:
        """Unweighted per-sample losses at fixed noise levels and noise, the same in every run and for every process:
        log-SNRs stratified over ``LOG_SNR_BUCKET_RANGE`` mapped to the process's times; with each sample's bucket."""
        g = torch.Generator().manual_seed(VALIDATION_SEED + batch_idx)
        n = batch["x"].shape[0]
        lo, hi = LOG_SNR_BUCKET_RANGE
        frac = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
        t = self.process.time_from_log_snr(hi - frac * (hi - lo)).to(batch["x"].device)
        out = self.losses(net, batch, drop_conditions=False, t=t, generator=g)
        out["bucket"] = log_snr_buckets(out["log_snr"], buckets)
        return out

    def evaluation_protocol(self) -> dict[str, dict[str, Any]]:
        """How the validation losses are measured (``metrics/protocol.json``): fixed noise and log-SNR levels, in
        the objective's own units, so two runs' values differ only by their models."""
        entry = {
            "eval_seed": VALIDATION_SEED,
            "noise": "fixed per validation batch (seed + batch index)",
            "levels": f"log-SNR stratified over {list(LOG_SNR_BUCKET_RANGE)}",
            "units": f"the objective's raw loss ({self.objective.prediction} target, {self.objective.loss})",
        }
        return {"val/loss": entry, "val_loss_t/bucket_*": entry}

    # ---------------------------------------------------------------- sampling
    def guidance_for(self, guidance: Guidance | dict[str, Any] | None) -> Guidance:
        """This setup's guidance, another ``Guidance``, or this one with a dict of overrides on top (as it samples now:
        a kept-guide autoguidance before its guide is kept samples with CFG)."""
        if isinstance(guidance, Guidance):
            return guidance.in_effect()
        try:
            return self.guidance.updated(guidance).in_effect()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def model_fn(
        self,
        net: Net,
        cond: dict[str, Any],
        null: dict[str, Any] | None = None,
        scale: Scale | None = None,
        raw: Any = None,
        guidance: Guidance | dict[str, Any] | None = None,
        interval: Sequence[float | None] | str | None = "guidance",
    ) -> ModelFn:
        """The guided ``model_fn(x_t, t) -> (x0_hat, eps_hat)`` every sampler and diagnostic uses; ``interval=None``
        guides everywhere, the default keeps the guidance's own interval."""
        g = self.guidance_for(guidance)
        cond, null, scale = g.network_conditions(cond, null, g.scale if scale is None else scale)
        plain = not isinstance(scale, torch.Tensor) and float(scale) == 1.0
        call = lambda x_in, t_net, c: net(
            x_in, t_net, c["vector"], c["context"], c["context_mask"], **network_inputs(c)
        )  # noqa: E731
        try:
            guide = g.reference(raw, self) if g.uses_guide and not plain else None
            return guided_model_fn(
                call,
                self.process,
                self.objective.prediction,
                cond,
                null,
                scale=scale,
                rescale=getattr(g, "rescale", 0.0),
                interval=(
                    g.interval
                    if interval == "guidance"  # otherwise not a str
                    else cast("Sequence[float | None] | None", interval)
                ),
                x0_clip=self.objective.x0_clip,
                sigma_data=self.objective.sigma_data,
                method=g.name,
                options=g.options(),
                guide=guide,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def guided_fn(
        self, net: Net, raw: Any, guidance: Guidance | dict[str, Any] | None = None, scale: Scale | None = None
    ) -> ModelFn:
        """The guided model function for raw conditions (labels, prompts or None), with their null conditions and
        per-sample scales: what a sampler, or a teacher's steps in distillation, calls."""
        g = self.guidance_for(guidance)
        cond = self.condition(raw)
        null = self.condition(self.null_condition(raw)) if raw is not None else None
        scales = g.scales(raw, getattr(self.conditioner, "num_classes", None), scale)
        return self.model_fn(net, cond, null, scales, raw=raw, guidance=g)

    @torch.no_grad()
    def sample(
        self,
        net: Net,
        n: int,
        conditions: Any = None,
        *,
        sampler: Sampler | None = None,
        guidance: Guidance | dict[str, Any] | None = None,
        guidance_scale: Scale | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        decode: bool = True,
    ) -> torch.Tensor:
        """n samples in [-1, 1] (decoded to pixels for latent models; their latents unclipped with ``decode=False``)
        for raw ``conditions`` (balanced if None), with this setup's sampler and guidance unless others are given
        (``guidance``: a ``Guidance`` or a dict of overrides such as ``{"method": "apg", "eta": 0.0}``)."""
        was_training = net.training if isinstance(net, nn.Module) else None
        if isinstance(net, nn.Module):
            net.eval()
        device = _device_of(net, self.device)
        raw = self.default_conditions(n, device) if conditions is None else conditions
        model_fn = self.guided_fn(net, raw, guidance, guidance_scale)
        if noise is None:
            noise = torch.randn((n, *self.sample_shape), generator=generator)
        noise = noise * self.process.prior_std
        x = (sampler or self.sampler)(model_fn, noise.to(device), self.process, generator=generator, progress=progress)
        pixels = decode or self.autoencoder is None
        if decode:
            x = self.to_pixels(x)
        if was_training:
            cast(nn.Module, net).train()  # was_training is set only for an nn.Module
        return x.clamp(-1, 1) if pixels else x

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Decode latents to pixels for latent models; identity for pixel models."""
        if self.autoencoder is None:
            return x
        with torch.no_grad():
            return cast(torch.Tensor, self.autoencoder.module.decode(x.float()))  # duck-typed autoencoder: Any

    def describe_sampler(self, sampler: Sampler | None = None) -> str:
        """The sampler with its step count and, on flow, a shifted grid: 'heun-10 (grid shift 0.33)'."""
        sampler = sampler or self.sampler
        name = sampler_name(sampler)
        if isinstance(self.process, FlowProcess):
            grid = self.process.grid_shift(getattr(sampler, "keywords", {}).get("spacing"))
            name += f" (grid shift {grid:g})" if grid != 1.0 else ""
        return name

    # ---------------------------------------------------------------- autoguidance
    def path(self) -> torch.Tensor:
        """What the denoiser is shown at 16 fixed noise levels (log-SNR -10 .. 10): the time input and the log-SNR
        of the process's time there (the nearest step on a discrete schedule). Two setups whose denoisers see the
        same inputs have equal paths, whatever their spelling, training density or sampling grid."""
        times = self.process.time_from_log_snr(torch.linspace(-10.0, 10.0, 16, dtype=torch.float64))
        alpha, sigma = (torch.as_tensor(v, dtype=torch.float64) for v in self.process.coefficients(times))
        net_time = torch.as_tensor(self.process.net_time(times), dtype=torch.float64)
        return torch.stack([net_time, 2 * (alpha.log() - sigma.log())])

    def mismatch(self, other: "Diffusion", roles: tuple[str, str] = ("guide", "main")) -> str | None:
        """What ``other`` (a guide or a teacher: ``roles`` names it and this setup) does not share with this setup
        (None: the two combine)."""
        o, me = roles
        if self.process.name != other.process.name:
            return f"process ({o} {other.process.name}, {me} {self.process.name})"
        a, b = self.path(), other.path()
        if a.shape != b.shape or not torch.allclose(a[1], b[1], rtol=1e-9, atol=1e-12):
            return f"noise schedule (both {self.process.name}, other coefficients)"
        if not torch.allclose(a[0], b[0], rtol=1e-9, atol=1e-12):
            k = int((a[0] - b[0]).abs().argmax())
            hint = (
                "give both the same process.time_scale"
                if hasattr(self.process, "time_scale")
                else "the processes time the network differently"
            )
            return f"time input at the same noise level ({o} {b[0, k].item():.4g}, {me} {a[0, k].item():.4g}): {hint}"
        pm, pg = self.objective, other.objective
        if (pm.prediction, float(pm.sigma_data)) != (pg.prediction, float(pg.sigma_data)):
            return f"prediction ({o} {pg.prediction}, {me} {pm.prediction})"
        if tuple(other.sample_shape) != tuple(self.sample_shape):
            return f"sample shape ({o} {tuple(other.sample_shape)}, {me} {tuple(self.sample_shape)})"
        key: Callable[[Conditioner], str]
        key = lambda c: f"{type(c).__name__}({c.batch_key}, {getattr(c, 'num_classes', None)} classes)"  # noqa: E731
        if key(self.conditioner) != key(other.conditioner):
            return f"conditioning ({o} {key(other.conditioner)}, {me} {key(self.conditioner)})"
        return None

    def check_guide(self, guide: Any, path: object) -> None:
        """One-line refusal of an autoguidance guide (a loaded checkpoint) that cannot guide this setup."""
        other = getattr(guide, "diffusion", None)
        if not isinstance(other, Diffusion):
            raise ConfigError(f"guidance.guide_ckpt={path} is not a diffusion model checkpoint")
        problem = self.mismatch(other)
        if problem is not None:
            raise ConfigError(f"guidance.guide_ckpt={path} cannot guide this model: different {problem}")


def load_for_sampling(
    path: str | Path, device: str | torch.device = "cpu", trusted: bool | None = None
) -> tuple[Diffusion, nn.Module]:
    """The ``Diffusion`` and the EMA denoiser of a checkpoint or export, ready to sample without a Trainer."""
    from difflab.checkpoints import module_from_checkpoint  # reading files is the caller's choice, not the math's

    module: Any = module_from_checkpoint(path, trusted=trusted).to(device)  # a DiffusionModule
    return module.diffusion.to(device), module.denoiser
