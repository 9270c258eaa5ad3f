"""Check that every DDP rank holds the same raw and EMA weights (catches "EMA never synced/updated on rank k" bugs).

``RankConsistencyCheck`` fingerprints the weights on each rank (per tensor: float64 sum and sum of squares), gathers
the fingerprints and compares them to rank 0's exactly. Results are logged, written by rank 0 to
``<run>/ddp_check.json`` and, with ``strict``, a mismatch stops training. Single-process runs skip the check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch import nn

from difflab.ops.atomic import write_text
from difflab.ops.ema_weights import ema_provider
from difflab.ops.fsdp import is_sharding
from difflab.utils.errors import DifflabError

log = logging.getLogger(__name__)


class RankMismatchError(DifflabError):
    """DDP ranks hold different weights."""


def fingerprint(module: nn.Module) -> torch.Tensor:
    """Per-tensor float64 (sum, sum of squares) of all floating parameters and buffers, concatenated."""
    parts = [
        torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
        for t in list(module.parameters()) + list(module.buffers())
        if t.is_floating_point()
    ]
    return torch.cat(parts) if parts else torch.zeros(2, dtype=torch.float64)


class RankConsistencyCheck(L.Callback):
    """Every ``every_n_steps`` optimizer steps (0: never) and at the last step, compare weights across ranks."""

    def __init__(
        self,
        every_n_steps: int = 1000,
        at_end: bool = True,
        strict: bool = True,
        report_file: str | None = "ddp_check.json",
    ):
        self.every_n_steps, self.at_end, self.strict, self.report_file = every_n_steps, at_end, strict, report_file
        self.reports: list[dict] = []
        self.active = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if is_sharding(trainer):  # it compares whole weights across ranks; under FSDP each rank holds its own shards
            self.active = False
            log.info("trainer=fsdp: the DDP rank-consistency check is off (each rank holds its own shards)")

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        last = trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps
        return (self.every_n_steps > 0 and step % self.every_n_steps == 0) or (self.at_end and last)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (
            self.active
            and trainer.world_size > 1
            and self._due(trainer)
            and getattr(self, "_last", -1) != trainer.global_step
        ):
            self._last = trainer.global_step
            self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Gather fingerprints of the raw and EMA weights from all ranks and compare them to rank 0 (collective)."""
        provider = ema_provider(trainer)
        models = {"raw": pl_module} if provider is None else provider.whole_copies(pl_module)
        report = {"step": trainer.global_step, "world_size": trainer.world_size}
        for name, module in models.items():
            fp = fingerprint(module).to(trainer.strategy.root_device)
            allfp = trainer.strategy.all_gather(fp).reshape(trainer.world_size, -1).cpu()
            diff = (allfp - allfp[0]).abs().max().item()
            report[name] = {
                "max_abs_diff": diff,
                "equal": diff == 0.0,
                "rank_checksums": [float(r.sum()) for r in allfp],
            }
        self.reports.append(report)
        equal = all(report[n]["equal"] for n in models)
        if trainer.is_global_zero and self.report_file:
            path = Path(trainer.default_root_dir) / self.report_file
            write_text(path, json.dumps(self.reports, indent=1))
        if not equal:
            diffs = ", ".join(f"{n} max diff {report[n]['max_abs_diff']:.3g}" for n in models)
            msg = f"step {trainer.global_step}: DDP ranks hold different weights ({diffs})"
            if self.strict:
                raise RankMismatchError(msg)
            log.error(msg)
        return report
