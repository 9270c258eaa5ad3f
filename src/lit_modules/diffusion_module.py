"""DiffusionModule: the LightningModule that trains any denoiser under any noise process, objective and conditioning."""
from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import nn

from difflab.conditioning.base import Conditioner, NoConditioner
from difflab.diffusion.guidance import GUIDE_NETWORK_METHODS, check_method, guided_model_fn
from difflab.conditioning.templates import labels_to_prompts
from difflab.diffusion.objectives import LOG_SNR_BUCKET_RANGE, Objective, log_snr_buckets
from difflab.diffusion.processes import NoiseProcess
from difflab.diffusion.samplers import check_sampler, sampler_name
from difflab.lit_modules.lr_schedules import resolve_steps, time_progress, warmup_cosine, warmup_cosine_progress
from difflab.utils.errors import ConfigError
from difflab.utils.frozen import Frozen

log = logging.getLogger(__name__)

VALIDATION_SEED = 1234  # validation noise and times: seed + batch index, the same in every run and every arm


class DiffusionModule(L.LightningModule):
    """Denoiser + noise process + objective + conditioner + sampler, with classifier-free guidance and AdamW.

    ``denoiser`` is a factory (Hydra ``_partial_``) called with the conditioner's widths, so the network always has
    the inputs its conditioning produces. ``sample_shape`` is filled from the datamodule by the training pipeline.
    ``process`` is a ``difflab.diffusion.processes.NoiseProcess`` (``vp``: a ``DiscreteSchedule``); ``schedule`` is
    the name configs saved before the process axis used for it.
    """

    def __init__(self, net: Callable[..., nn.Module], process: NoiseProcess | None = None,
                 objective: Objective | None = None, sampler: Callable | None = None,
                 conditioner: Conditioner | None = None, autoencoder: Any = None,
                 sample_shape: Sequence[int] = (1, 16, 16), p_uncond: float = 0.1,
                 guidance: dict | None = None, lr: float = 2e-4, betas: Sequence[float] = (0.9, 0.999),
                 weight_decay: float = 0.0, eps: float = 1e-8, warmup_steps: float | int = 0.05,
                 warmup_start_factor: float = 0.01, final_lr_fraction: float = 0.1, loss_buckets: int = 10,
                 class_names: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                 compile: bool = False, channels_last: bool = False, schedule: NoiseProcess | None = None):
        super().__init__()
        process = process if process is not None else schedule
        if process is None or objective is None or sampler is None:
            raise ConfigError("DiffusionModule needs a process (model.process), an objective and a sampler")
        try:
            objective.check_process(process)
            check_sampler(sampler, process)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.conditioner = conditioner if conditioner is not None else NoConditioner()
        self.denoiser = net(cond_dim=self.conditioner.vector_dim, context_dim=self.conditioner.context_dim) \
            if not isinstance(net, nn.Module) else net
        self.process, self.objective, self.sampler = process, objective, sampler
        self.autoencoder = Frozen(autoencoder) if isinstance(autoencoder, nn.Module) else autoencoder
        self.sample_shape = tuple(sample_shape)
        self.p_uncond = p_uncond
        # "method" is absent from checkpoints saved before the guidance registry: those guided with cfg
        self.guidance = {"method": "cfg", "scale": 1.0, "rescale": 0.0, "interval": None, "per_class": None,
                         **(guidance or {})}
        try:
            check_method(self.guidance["method"], self.guidance["scale"])
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.guidance["method"] in GUIDE_NETWORK_METHODS and not self.guidance.get("guide_ckpt"):
            raise ConfigError("model.guidance.method=autoguidance needs model.guidance.guide_ckpt (a weaker checkpoint "
                              "of the same setup: an earlier step, a shorter EMA or a smaller model)")
        self.optim_cfg = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
        self.lr_cfg = dict(warmup_steps=warmup_steps, start_factor=warmup_start_factor, final_fraction=final_lr_fraction)
        self.loss_buckets = loss_buckets
        self.class_names = list(class_names) if class_names else None
        self.prompts = list(prompts) if prompts else None
        self.channels_last = channels_last
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints
        self._check_conditioning_is_consumed()
        if hasattr(self.conditioner, "prepare_table") and self.prompts:
            self.conditioner.prepare_table(self.prompts)  # precomputed embeddings for the fixed prompt set
        if channels_last:
            self.denoiser = self.denoiser.to(memory_format=torch.channels_last)
        # The compiled wrapper is kept out of the module tree so its weights are not registered (and saved) twice.
        self.__dict__["_compiled"] = torch.compile(self.denoiser) if compile else None
        self._bucket_sums = None

    # ---------------------------------------------------------------- setup checks
    def _check_conditioning_is_consumed(self) -> None:
        """Fail loudly if conditioning is configured but the denoiser has no path that consumes it."""
        c = self.conditioner
        n_xattn = self.denoiser.count_cross_attention() if hasattr(self.denoiser, "count_cross_attention") else None
        if c.context_dim and n_xattn == 0:
            raise ConfigError(f"conditioner {type(c).__name__} produces context tokens (width {c.context_dim}) but the "
                              f"denoiser has no cross-attention: set model.net.cross_attention_levels")
        if c.vector_dim and getattr(getattr(self.denoiser, "embed", None), "cond_proj", True) is None:
            raise ConfigError(f"conditioner {type(c).__name__} produces a vector but the denoiser ignores it")
        self.num_cross_attention = n_xattn or 0
        ctx = f"B x {getattr(c, 'max_length', 'L')} x {c.context_dim}" if c.context_dim else "none"
        log.info("conditioning: %s; context shape: %s; active cross-attention modules: %d", c.describe(), ctx,
                 self.num_cross_attention)

    # ---------------------------------------------------------------- forward pieces
    def condition(self, raw) -> dict:
        """Conditioning dict (vector / context / mask) for raw conditions (labels, prompts, or None)."""
        return self.conditioner(raw)

    def net(self, x_in: torch.Tensor, t_net: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's raw output for its input (x_t, scaled as the objective says) at the process's time input."""
        if self.channels_last and x_in.ndim == 4:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        compiled = self.__dict__.get("_compiled")
        fn = self.denoiser if compiled is None else compiled
        return fn(x_in, t_net, cond["vector"], cond["context"], cond["context_mask"])

    def batch_condition(self, batch: dict):
        key = self.conditioner.batch_key
        if key is None:
            return None
        if key == "text" and "text" not in batch and "label" in batch and self.prompts:
            return labels_to_prompts(batch["label"], self.prompts)  # a class dataset feeding a text model
        if key not in batch:
            raise ConfigError(f"conditioner {type(self.conditioner).__name__} needs batch['{key}'] but the datamodule "
                              f"yields only {sorted(batch)}; pick a matching conditioning= or datamodule=")
        return batch[key]

    def diffusion_losses(self, batch: dict, drop_conditions: bool, t: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> dict:
        """Per-sample losses on a batch (conditions dropped with probability p_uncond when training; times drawn from
        the process's density unless ``t`` is given)."""
        x0 = batch["x"]
        raw = self.batch_condition(batch)
        if drop_conditions:
            raw = self.conditioner.drop(raw, self.p_uncond)
        cond = self.condition(raw)
        if t is None:
            t = self._frame_shifted_times(batch, generator)  # None unless process.frame_shift_base is set
        return self.objective.losses(lambda x_in, t_net: self.net(x_in, t_net, cond), x0, self.process, t=t,
                                     generator=generator)

    def _frame_shifted_times(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor | None:
        """Training times of a video batch under ``process.frame_shift_base`` (flow): the process's density with
        the shift ``frame_shift(process.shift, T, frame_shift_base, H W, H0 W0)`` per sample, T from
        ``batch["num_frames"]`` (bucketed loaders) or the clips' frame axis, H0 x W0 the configured sample size
        (``sample_shape``), so the shift at the configured clip size is ``process.shift``. None otherwise (the
        objective then draws with the process's own shift)."""
        base = getattr(self.process, "frame_shift_base", None)
        x0 = batch["x"]
        if base is None or x0.ndim != 5:
            return None
        from difflab.diffusion.processes import frame_shift

        n = x0.shape[0]
        frames = batch.get("num_frames")
        frames = torch.full((n,), x0.shape[2]) if frames is None else torch.as_tensor(frames).reshape(-1).expand(n)
        base_pixels = int(self.sample_shape[-2]) * int(self.sample_shape[-1]) if len(self.sample_shape) >= 2 else None
        shift = frame_shift(self.process.shift, frames.to(device=x0.device, dtype=torch.float64), base,
                            x0.shape[-2] * x0.shape[-1], base_pixels)
        return self.process.sample_times(n, device=x0.device, generator=generator, shift=shift)

    def validation_losses(self, batch: dict, batch_idx: int) -> dict:
        """Unweighted per-sample losses at fixed noise levels and noise, the same every validation run (curves are
        comparable over training) and for every process: log-SNRs stratified over the bucket range
        (``objectives.LOG_SNR_BUCKET_RANGE``, one stratum per sample), mapped to the process's times; with each
        sample's log-SNR bucket."""
        g = torch.Generator().manual_seed(VALIDATION_SEED + batch_idx)
        n = batch["x"].shape[0]
        lo, hi = LOG_SNR_BUCKET_RANGE
        frac = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
        t = self.process.time_from_log_snr(hi - frac * (hi - lo)).to(self.device)
        out = self.diffusion_losses(batch, drop_conditions=False, t=t, generator=g)
        out["bucket"] = log_snr_buckets(out["log_snr"], self.loss_buckets)
        return out

    def evaluation_protocol(self) -> dict[str, dict]:
        """How the validation losses are measured (``metrics/protocol.json``): on fixed noise and log-SNR levels,
        so two runs' values differ only by their models, and in the objective's own units."""
        entry = {"eval_seed": VALIDATION_SEED, "noise": "fixed per validation batch (seed + batch index)",
                 "levels": f"log-SNR stratified over {list(LOG_SNR_BUCKET_RANGE)}", "units": "the objective's "
                 f"raw loss ({self.objective.prediction} target, {self.objective.loss})"}
        return {"val/loss": entry, "val_loss_t/bucket_*": entry}

    # ---------------------------------------------------------------- Lightning hooks
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.diffusion_losses(batch, drop_conditions=True)
        loss = out["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._bucket_sums = torch.zeros(2, self.loss_buckets, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.validation_losses(batch, batch_idx)
        self.log("val/loss", out["raw"].mean(), prog_bar=True, batch_size=batch["x"].shape[0], sync_dist=True)
        b = out["bucket"]
        self._bucket_sums[0].index_add_(0, b, out["raw"].double())
        self._bucket_sums[1].index_add_(0, b, torch.ones_like(out["raw"], dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._bucket_sums, reduce_op="sum") if self.trainer.world_size > 1 else self._bucket_sums
        means = (sums[0] / sums[1].clamp(min=1)).tolist()
        self.val_loss_per_bucket = means
        for i, m in enumerate(means):
            if sums[1, i] > 0:
                self.log(f"val_loss_t/bucket_{i:02d}", m)  # reduced over ranks: every rank logs the same value

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, **self.optim_cfg)
        start, final = self.lr_cfg["start_factor"], self.lr_cfg["final_fraction"]
        total = self.trainer.estimated_stepping_batches
        if math.isfinite(total):  # a step budget (trainer.max_steps)
            total = max(1, int(total))
            schedule = functools.partial(warmup_cosine, warmup_steps=resolve_steps(self.lr_cfg["warmup_steps"], total),
                                         total_steps=total, start_factor=start, final_fraction=final)
        else:  # only a time budget (trainer.max_steps=-1, trainer.max_time): the schedule spans the wall-clock
            schedule = self._time_budget_schedule(start, final)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _time_budget_schedule(self, start: float, final: float):
        from lightning.pytorch.callbacks import Timer

        timer = next((cb for cb in self.trainer.callbacks if isinstance(cb, Timer)), None)
        warmup = self.lr_cfg["warmup_steps"]
        if timer is None:
            raise ConfigError("trainer.max_steps=-1 needs trainer.max_time (the LR schedule decays over the budget); "
                              "set one of them")
        if not (isinstance(warmup, float) and warmup < 1):
            raise ConfigError(f"model.warmup_steps={warmup}: a run bounded only by trainer.max_time needs the warm-up "
                              f"as a fraction of the budget (e.g. 0.05)")
        progress = time_progress(timer)
        return lambda step: warmup_cosine_progress(progress(), warmup, start, final)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if batch_idx % 10 == 0:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {"config": copy.deepcopy(self.run_config), "kind": "diffusion",
                                 "sample_shape": list(self.sample_shape)}

    def configure_model(self) -> None:
        """trainer=fsdp: shard the denoiser with FSDP2 (each transformer / UNet block its own unit, the rest at the
        denoiser's root) and the conditioner's trainable part; frozen encoders and autoencoders (``Frozen``) stay
        whole. A no-op under every other strategy (``difflab.ops.fsdp.configure_sharding``)."""
        from difflab.ops.fsdp import configure_sharding

        configure_sharding(self)

    def on_fit_start(self) -> None:
        if isinstance(self.autoencoder, Frozen):
            self.autoencoder.to(self.device)
        if self.guidance["method"] in GUIDE_NETWORK_METHODS:  # refuse a mismatched guide now, not at the first grid
            self.guide_module(str(self.guidance["guide_ckpt"]))

    # ---------------------------------------------------------------- sampling
    def null_condition(self, raw):
        return self.conditioner.null_like(raw)

    def default_sample_conditions(self, n: int):
        """Balanced raw conditions for n samples: cycling class labels, prompts, or None."""
        key = self.conditioner.batch_key
        if key == "label":
            return torch.arange(n, device=self.device) % self.conditioner.num_classes
        if key == "text":
            prompts = self.prompts or [""]
            return [prompts[i % len(prompts)] for i in range(n)]
        return None

    def guidance_scales(self, raw, scale=None):
        """Guidance scale per sample: ``per_class`` overrides for labelled samples, else the global scale."""
        scale = self.guidance["scale"] if scale is None else scale
        per_class = self.guidance.get("per_class")
        if per_class and isinstance(raw, torch.Tensor):
            table = torch.full((self.conditioner.num_classes + 1,), float(scale))
            for k, v in dict(per_class).items():
                table[int(k)] = float(v)
            return table[raw.cpu()].to(self.device)
        return scale

    @torch.no_grad()
    def sample(self, n: int, raw=None, sampler: Callable | None = None, guidance_scale=None,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               progress: bool = False, decode: bool = True, guidance: dict | None = None) -> torch.Tensor:
        """n samples in [-1, 1] (decoded to pixels for latent models) for raw conditions (balanced if None).

        ``guidance``: overrides of the module's guidance settings for this call (``method`` and its keys; None
        entries keep the module's), e.g. ``{"method": "apg", "eta": 0.0}``."""
        was_training = self.training
        self.eval()
        raw = self.default_sample_conditions(n) if raw is None else raw
        cond = self.condition(raw)
        null = self.condition(self.null_condition(raw)) if raw is not None else None
        if guidance_scale is None:
            guidance_scale = (guidance or {}).get("scale")
        model_fn = self.model_fn(cond, null, self.guidance_scales(raw, guidance_scale), raw=raw, guidance=guidance)
        sampler = sampler or self.sampler
        if noise is None:
            noise = torch.randn((n, *self.sample_shape), generator=generator)
        noise = noise * self.process.prior_std
        x = sampler(model_fn, noise.to(self.device), self.process, generator=generator, progress=progress)
        if decode:
            x = self.to_pixels(x)
        self.train(was_training)
        return x.clamp(-1, 1)

    def guidance_settings(self, overrides: dict | None = None) -> dict:
        """The module's guidance settings with the non-None entries of ``overrides`` on top."""
        return {**self.guidance, **{k: v for k, v in (overrides or {}).items() if v is not None}}

    def model_fn(self, cond: dict, null: dict | None = None, scale=None, interval="model", raw=None,
                 guidance: dict | None = None):
        """The guided ``model_fn(x_t, t) -> (x0_hat, eps_hat)`` every sampler and diagnostic uses (the module's
        guidance settings, ``guidance`` overrides on top, unless given; ``interval=None`` guides everywhere).
        Autoguidance needs the raw conditions (``raw``) to condition its guide network."""
        g = self.guidance_settings(guidance)
        scale = g["scale"] if scale is None else scale
        try:
            guide = self.guide_fn(g, raw) if g["method"] in GUIDE_NETWORK_METHODS and not self._plain(scale) else None
            return guided_model_fn(self.net, self.process, self.objective.prediction, cond, null, scale=scale,
                                   rescale=g["rescale"], interval=g["interval"] if interval == "model" else interval,
                                   x0_clip=self.objective.x0_clip, sigma_data=self.objective.sigma_data,
                                   method=g["method"], options=g, guide=guide)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @staticmethod
    def _plain(scale) -> bool:
        return not isinstance(scale, torch.Tensor) and float(scale) == 1.0

    # ---------------------------------------------------------------- autoguidance
    def guide_fn(self, guidance: dict, raw) -> Callable:
        """``guide(x_in, t_net) -> output``: the autoguidance guide network (``guidance["guide_ckpt"]``) with its
        own conditioning of ``raw`` bound in."""
        path = guidance.get("guide_ckpt")
        if not path:
            raise ConfigError("guidance.method=autoguidance needs guidance.guide_ckpt (a weaker checkpoint of the same "
                              "setup: an earlier step, a shorter EMA or a smaller model)")
        guide = self.guide_module(str(path))
        if raw is None and guide.conditioner.batch_key is not None:
            raise ConfigError("autoguidance needs the raw conditions (labels / prompts) to condition its guide")
        guide_cond = guide.condition(raw)
        return lambda x_in, t_net: guide.net(x_in, t_net, guide_cond)

    def guide_module(self, path: str) -> "DiffusionModule":
        """The guide loaded from ``path`` (EMA weights, cached, outside the module tree so it is never saved,
        averaged or optimised), on this module's device; refused when it is not a guide for this model."""
        from difflab.checkpoints import module_from_checkpoint

        held = self.__dict__.get("_guide")
        if held is None or held[0] != path:
            guide = module_from_checkpoint(path)
            check_guide(self, guide, path)
            held = (path, Frozen(guide))
            self.__dict__["_guide"] = held
        return held[1].to(self.device).module

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Decode latents to pixels for latent models; identity for pixel models."""
        if self.autoencoder is None:
            return x
        with torch.no_grad():
            return self.autoencoder.module.decode(x.float())

    def describe_sampler(self, sampler=None) -> str:
        return sampler_name(sampler or self.sampler)


def _schedule(module: DiffusionModule) -> torch.Tensor:
    """(alpha, sigma) on a 16-step sampling grid: equal processes have equal paths, whatever their config spelling."""
    times = module.process.sampling_times(16, None, False).to(torch.float64)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in module.process.coefficients(times)])


def guide_mismatch(main: DiffusionModule, guide: DiffusionModule) -> str | None:
    """What an autoguidance guide does not share with its main model (None: combinable)."""
    if main.process.name != guide.process.name:
        return f"process (guide {guide.process.name}, main {main.process.name})"
    a, b = _schedule(main), _schedule(guide)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-9, atol=1e-12):
        return f"noise schedule (both {main.process.name}, other coefficients)"
    pm, pg = main.objective, guide.objective
    if (pm.prediction, float(pm.sigma_data)) != (pg.prediction, float(pg.sigma_data)):
        return f"prediction (guide {pg.prediction}, main {pm.prediction})"
    if tuple(guide.sample_shape) != tuple(main.sample_shape):
        return f"sample shape (guide {tuple(guide.sample_shape)}, main {tuple(main.sample_shape)})"
    cm, cg = main.conditioner, guide.conditioner
    key = lambda c: f"{type(c).__name__}({c.batch_key}, {getattr(c, 'num_classes', None)} classes)"  # noqa: E731
    if key(cm) != key(cg):
        return f"conditioning (guide {key(cg)}, main {key(cm)})"
    return None


def check_guide(main: DiffusionModule, guide, path) -> None:
    """One-line refusal of an autoguidance guide whose process, prediction, sample shape or conditioning differ."""
    if not isinstance(guide, DiffusionModule):
        raise ConfigError(f"guidance.guide_ckpt={path} is not a diffusion model checkpoint")
    problem = guide_mismatch(main, guide)
    if problem is not None:
        raise ConfigError(f"guidance.guide_ckpt={path} cannot guide this model: different {problem}")
