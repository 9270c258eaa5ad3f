"""The sample-metrics callback: ``difflab.metrics.sample_metrics.SampleMetrics`` with the EMA weights on the
diagnostics schedule (every ``every_n_steps`` and at the end), every rank sampling its share."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from difflab.callbacks.figures import DiagnosticCallback
from difflab.metrics.protocol import protocol_line, write_protocol
from difflab.metrics.sample_metrics import SampleMetrics

log = logging.getLogger(__name__)


class SampleMetricsCallback(DiagnosticCallback):
    """Sample metrics with EMA weights every ``every_n_steps`` (not densely early by default) and at the end.

    Runs on every rank (sampling is sharded); rank 0 logs ``metrics/...`` scalars. All other arguments go to
    ``SampleMetrics`` (see the module docstring).
    """

    kind = "sample_metrics"
    all_ranks = True

    def __init__(self, every_n_steps: int = 1000, dense_early: bool = False, at_end: bool = True, **kwargs):
        super().__init__(every_n_steps, dense_early, at_end)
        self.metrics = SampleMetrics(**kwargs)
        self.last: dict[str, float] = {}

    def draw(self, module, path: Path, context: dict[str, Any]) -> dict[str, float]:
        trainer = context.get("trainer")
        run_dir = trainer.default_root_dir if trainer is not None else path.parent
        first = not self.metrics._prepared
        self.metrics.prepare(module, context.get("datamodule"), run_dir)
        if first and self.metrics.protocol and (trainer is None or trainer.global_rank == 0):
            path = write_protocol(run_dir, self.metrics.protocol)
            for name, entry in self.metrics.protocol.items():
                log.info("metric protocol (%s): %s", path, protocol_line(name, entry))
        self.last = self.metrics.evaluate(module)
        scored = self.metrics.scored_protocol(module, self.last)
        if scored:
            self.metrics.protocol.update(scored)
            if trainer is None or trainer.global_rank == 0:
                write_protocol(run_dir, scored)
        if self.last and (trainer is None or trainer.global_rank == 0):
            log.info(
                "sample metrics at step %s: %s",
                context.get("step"),
                ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.last.items())),
            )
        return self.last
