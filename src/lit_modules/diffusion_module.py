"""DiffusionModule: Lightning's loop around a denoiser and a ``Diffusion`` (``difflab.diffusion.system``).

The module owns what only training needs: the network's weights, the optimizer and LR schedule (config groups
``optimizer`` and ``lr_schedule``), validation buckets, FSDP sharding and checkpoint metadata. Losses, sampling and
guidance are the ``Diffusion`` object's; its forward is the denoiser's, so ``module.diffusion.sample(module, n)``
samples with the module's (EMA-swapped) weights.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import lightning as L
import torch
from torch import nn

from difflab.diffusion.system import Diffusion
from difflab.methods.base import DiffusionTraining, TrainingMethod
from difflab.ops.fsdp import configure_sharding, is_sharding
from difflab.ops.resume import refuse_changed_settings, stored_config
from difflab.optim.lr_schedules import WarmupCosine
from difflab.utils.errors import ConfigError

log = logging.getLogger(__name__)
METHOD_STATE_KEY = "difflab_method"  # a training method's resume state (a distillation round and its teacher)


class DiffusionModule(L.LightningModule):
    """Trains ``net`` (a Hydra ``_partial_`` built with the conditioner's widths, or a built module) under
    ``diffusion``'s process, objective and conditioning, with ``optimizer`` (a partial taking the parameters and
    ``lr``, the rate tuned for this network) and ``lr_schedule`` (``difflab.optim.lr_schedules``). ``method``
    (``difflab.methods``, config group ``method``) is what a step optimises: diffusion training by default."""

    def __init__(
        self,
        net: Callable[..., nn.Module] | nn.Module,
        diffusion: Diffusion,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_schedule: Callable | None = None,
        lr: float = 2e-4,
        loss_buckets: int = 10,
        compile: bool = False,
        channels_last: bool = False,
        method: TrainingMethod | None = None,
    ):
        super().__init__()
        self.diffusion = diffusion
        self.method = method if method is not None else DiffusionTraining()
        self.conditioner = diffusion.conditioner  # registered here so its trainable part is saved and optimised
        c = self.conditioner
        self.denoiser = net if isinstance(net, nn.Module) else net(cond_dim=c.vector_dim, context_dim=c.context_dim)
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.lr = lr
        self.lr_schedule = lr_schedule or WarmupCosine()
        self.loss_buckets = loss_buckets
        self.channels_last = channels_last
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints
        self.num_cross_attention = check_conditioning_is_consumed(self.denoiser, c)
        if channels_last:
            self.denoiser = self.denoiser.to(memory_format=torch.channels_last)
        # The compiled wrapper is kept out of the module tree so its weights are not registered (and saved) twice.
        self.__dict__["_compiled"] = torch.compile(self.denoiser) if compile else None
        self._bucket_sums: torch.Tensor | None = None

    def forward(self, x_in: torch.Tensor, t_net: torch.Tensor, vector=None, context=None, context_mask=None, **inputs):
        """The denoiser's output (compiled and channels-last when configured); ``inputs``: the optional keyword inputs
        (``system.NETWORK_INPUTS``: MeanFlow's ``interval``, a distilled student's ``guidance_scale``), passed on when
        given, for denoisers built with them."""
        if self.channels_last and x_in.ndim == 4:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        compiled = self.__dict__.get("_compiled")
        fn = self.denoiser if compiled is None else compiled
        return fn(x_in, t_net, vector, context, context_mask, **{k: v for k, v in inputs.items() if v is not None})

    # ---------------------------------------------------------------- Lightning hooks
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.method.loss(self, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._bucket_sums = torch.zeros(2, self.loss_buckets, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.diffusion.validation_losses(self, batch, batch_idx, self.loss_buckets)
        self.log("val/loss", out["raw"].mean(), prog_bar=True, batch_size=batch["x"].shape[0], sync_dist=True)
        self._bucket_sums[0].index_add_(0, out["bucket"], out["raw"].double())
        self._bucket_sums[1].index_add_(0, out["bucket"], torch.ones_like(out["raw"], dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        sums = self._bucket_sums
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = (sums[0] / sums[1].clamp(min=1)).tolist()
        self.val_loss_per_bucket = means
        for i, m in enumerate(means):
            if sums[1, i] > 0:
                self.log(f"val_loss_t/bucket_{i:02d}", m)  # reduced over ranks: every rank logs the same value

    def configure_optimizers(self):
        own = [p for p in self.parameters() if p.requires_grad]
        if self.method.parameters() and is_sharding(getattr(self, "_trainer", None)):
            raise ConfigError(
                f"method={self.method.name}: a learned loss weighting (method.adaptive_weighting) does not run under "
                "trainer=fsdp yet: use trainer=gpu or ddp, or set method.adaptive_weighting=false"
            )
        opt = self.optimizer_factory(own + self.method.parameters(), lr=self.lr)
        try:
            return {"optimizer": opt, "lr_scheduler": self.lr_schedule(opt, self.trainer)}
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def setup(self, stage: str) -> None:
        self.method.setup(self, stage)
        if stage == "fit":
            log.info("method: %s", self.method.describe())

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.method.on_train_batch_start(self, self.trainer.global_step)
        if batch_idx % 10 == 0:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Average the method's own gradients over ranks (DDP averages only the wrapped network's)."""
        if self.trainer.world_size > 1:
            for p in self.method.parameters():
                if p.grad is not None:
                    p.grad = self.trainer.strategy.reduce(p.grad, reduce_op="mean")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {
            "config": copy.deepcopy(self.run_config),
            "kind": "diffusion",
            "sample_shape": list(self.diffusion.sample_shape),
        }
        method_state = self.method.state_dict()
        if method_state:  # beside "difflab", which holds plain values only (post-hoc EMA snapshots copy it as JSON)
            checkpoint[METHOD_STATE_KEY] = method_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the last guard for a fit outside pipeline.train (the pre-flight and train check first); a module built
        # without the pipeline's run_config compares its method's own settings
        refuse_changed_settings("ckpt_path", stored_config(checkpoint), self.run_config or self._method_config())
        self.method.load_state_dict(checkpoint.get(METHOD_STATE_KEY) or {})

    def _method_config(self) -> dict:
        """The run-config shape of this module's method: its class and ``fixed_on_resume`` settings."""
        kind = type(self.method)
        fixed = {k: getattr(self.method, k) for k in kind.fixed_on_resume if hasattr(self.method, k)}
        return {"model": {"method": {"_target_": f"{kind.__module__}.{kind.__qualname__}", **fixed}}}

    def configure_model(self) -> None:
        """trainer=fsdp: shard the denoiser with FSDP2 and the conditioner's trainable part; frozen encoders and
        autoencoders stay whole. A no-op under every other strategy (``difflab.ops.fsdp.configure_sharding``)."""

        configure_sharding(self)

    def on_fit_start(self) -> None:
        self.diffusion.to(self.device)
        guidance = self.diffusion.guidance.in_effect()  # a guide kept later in training is not there yet
        if guidance.uses_guide:  # refuse a mismatched guide now, not at the first grid
            try:
                guidance.guide_model(self.diffusion)
            except ValueError as err:
                raise ConfigError(str(err)) from None


def check_conditioning_is_consumed(denoiser: nn.Module, conditioner: Any) -> int:
    """Fail loudly if conditioning is configured but the denoiser has no path that consumes it; returns the number
    of cross-attention modules."""
    c = conditioner
    n_xattn = denoiser.count_cross_attention() if hasattr(denoiser, "count_cross_attention") else None
    if c.context_dim and n_xattn == 0:
        raise ConfigError(
            f"conditioner {type(c).__name__} produces context tokens (width {c.context_dim}) but the "
            f"denoiser has no cross-attention: set model.net.cross_attention_levels"
        )
    if c.vector_dim and getattr(getattr(denoiser, "embed", None), "cond_proj", True) is None:
        raise ConfigError(f"conditioner {type(c).__name__} produces a vector but the denoiser ignores it")
    ctx = f"B x {getattr(c, 'max_length', 'L')} x {c.context_dim}" if c.context_dim else "none"
    log.info("conditioning: %s; context shape: %s; active cross-attention modules: %d", c.describe(), ctx, n_xattn or 0)
    return n_xattn or 0
