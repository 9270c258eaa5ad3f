"""``<run>/final_metrics.json``: how a job ended and the metrics it ended with; ``ablate.py`` reads it (a job
directory without it is running or failed). ``train.py`` and ``sample.py judge=...`` write it."""

from __future__ import annotations

import json
from pathlib import Path

from difflab.ops.atomic import atomic_write

FINAL_METRICS = "final_metrics.json"


def write_final_metrics(
    out_dir: str | Path,
    metrics: dict[str, float],
    step: int | None,
    stopped: bool = False,
    optimized: str | None = None,
) -> Path:
    """Write the record atomically: status (completed / stopped), the last step, the optimized metric's name."""
    record = {
        "status": "stopped" if stopped else "completed",
        "step": None if step is None else int(step),
        "optimized_metric": optimized,
        "metrics": dict(sorted(metrics.items())),
    }
    text = json.dumps(record, indent=2) + "\n"
    return atomic_write(Path(out_dir) / FINAL_METRICS, lambda tmp: Path(tmp).write_text(text))
