"""Reproduce every diagnostic figure from a checkpoint alone, with its EMA weights and no trainer:

    difflab-report ckpt_path=<run>/checkpoints/last.ckpt out_dir=<dir> [device=cuda] [figures=[reconstruction]]

Writes <dir>/<kind>.png per diagnostic (the same drawing code as the training callbacks, settings from
configs/callbacks/diagnostics.yaml), <dir>/class_grid.png, and <dir>/report.json + <dir>/report.md (figures, scalars,
sample metrics). Real data come from the checkpoint's stored datamodule config (``+datamodule.<key>=`` overrides it).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.configs import CONFIG_PATH
from difflab.utils.cli import console_command

log = logging.getLogger("report")


def stored_callback_state(ckpt: dict, class_name: str) -> dict | None:
    """The state a callback class saved in the checkpoint (Lightning keys them by class name + options)."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).split("{")[0] == class_name:
            return state
    return None


def build_datamodule(run_config: dict, overrides: dict | None, source: str = "the checkpoint"):
    """The training datamodule from the checkpoint's config (read from ``source``: through the trust gate) plus the
    user's overrides, set up for fitting; None if absent."""
    from difflab.trust import check_config

    cfg = run_config.get("datamodule")
    if not cfg:
        return None
    stored = OmegaConf.create(check_config(cfg, source, where="datamodule"))
    dm = instantiate(OmegaConf.merge(stored, OmegaConf.create(overrides or {})))
    dm.setup("fit")
    return dm


def diagnostics(cfg: DictConfig, wanted) -> dict[str, Any]:
    """Instantiate the configured callbacks that can draw a report (they have a ``report`` method), by name."""
    out = {}
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None or "_target_" not in cb_cfg:
            continue
        if wanted is not None and name not in wanted:
            continue
        if name == "sample_metrics" and not cfg.get("metrics", True):
            continue
        if hasattr(get_class(cb_cfg._target_), "report"):
            out[name] = instantiate(cb_cfg)
    return out


def write_markdown(path: Path, summary: dict) -> None:
    from difflab.ops.atomic import write_text

    lines = [
        f"# Report for {summary['checkpoint']}",
        "",
        f"step {summary['step']}, EMA weights, device {summary['device']}",
        "",
    ]
    if summary["scalars"]:
        lines += ["| scalar | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(summary["scalars"].items())]
        lines.append("")
    for name, fig in summary["figures"].items():
        lines += [f"## {name}", "", f"![{name}]({Path(fig).name})", ""]
    for name, err in summary["failed"].items():
        lines += [f"## {name}: FAILED", "", f"    {err}", ""]
    write_text(path, "\n".join(lines))


def run_report(cfg: DictConfig) -> dict[str, Any]:
    """Load the checkpoint (EMA weights), draw every diagnostic into ``cfg.out_dir``; returns the summary dict."""
    from difflab.checkpoints import load_checkpoint, module_from_checkpoint
    from difflab.diagnostics.class_grid import render_grid
    from difflab.diagnostics.timestep_loss import bucket_losses
    from difflab.ops.atomic import write_text
    from difflab.sampling import pick_device
    from difflab.utils.errors import UntrustedFileError

    out_dir = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(cfg.ckpt_path)
    module = module_from_checkpoint(cfg.ckpt_path).to(device).eval()
    out_dir.mkdir(parents=True, exist_ok=True)  # after the checks: a refused checkpoint leaves nothing behind
    step = int(ckpt.get("global_step", 0))
    wanted = None if cfg.get("figures") is None else [str(f) for f in cfg.figures]
    summary: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt_path),
        "step": step,
        "device": str(device),
        "figures": {},
        "scalars": {},
        "failed": {},
    }

    dm, data_error = None, None
    try:
        overrides = OmegaConf.to_container(cfg.datamodule, resolve=True) if cfg.get("datamodule") else {}
        dm = build_datamodule(module.run_config or {}, overrides, str(cfg.ckpt_path))
    except UntrustedFileError:
        raise
    except Exception as err:  # noqa: BLE001 - the figures that need no data still get drawn
        data_error = f"{type(err).__name__}: {err}"
        log.warning("no real data (%s): reconstruction, timestep loss and metrics are skipped", data_error)
    history = (stored_callback_state(ckpt, "TimestepLossCallback") or {}).get("history")
    context: dict[str, Any] = {"datamodule": dm, "step": step, "timestep_loss_history": history}
    if dm is not None and (wanted is None or "timestep_loss" in wanted):
        context["val_loss_per_bucket"] = bucket_losses(module, dm.val_dataloader(), cfg.get("val_batches"))

    for name, cb in diagnostics(cfg, wanted).items():
        if dm is None and name in ("reconstruction", "sample_metrics"):
            summary["failed"][name] = f"needs real data: {data_error or 'the checkpoint has no datamodule config'}"
            continue
        try:
            scalars = cb.report(module, out_dir, context) or {}
        except Exception as err:  # noqa: BLE001 - report the others, then fail at the end
            log.exception("diagnostic %s failed", name)
            summary["failed"][name] = f"{type(err).__name__}: {err}"
            continue
        summary["scalars"].update(scalars)
        png = out_dir / f"{cb.kind}.png"
        if png.is_file():
            summary["figures"][name] = str(png)
        log.info("%s: %s", name, png if png.is_file() else "scalars only")

    grid_cfg = (cfg.get("callbacks") or {}).get("class_grid")
    if cfg.get("class_grid", True) and (wanted is None or "class_grid" in wanted):
        n_cols = int(grid_cfg.get("n_cols", 8)) if grid_cfg else 8
        seed = int(grid_cfg.get("seed", 0)) if grid_cfg else 0
        scale = grid_cfg.get("guidance_scale") if grid_cfg else None
        summary["figures"]["class_grid"] = str(render_grid(module, out_dir / "class_grid.png", n_cols, scale, seed))

    write_text(out_dir / "report.json", json.dumps(summary, indent=2))
    write_markdown(out_dir / "report.md", summary)
    log.info(
        "report of %s (step %d) in %s: %d figures, %d failed",
        cfg.ckpt_path,
        step,
        out_dir,
        len(summary["figures"]),
        len(summary["failed"]),
    )
    return summary


@console_command
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    from difflab.trust import trust_from
    from difflab.utils.cli import run_reporting_errors

    with trust_from(cfg):
        summary = run_reporting_errors(run_report, cfg, extra=(ValueError,))
    if summary["failed"]:
        print(
            f"error: diagnostics failed: {', '.join(summary['failed'])} (see {cfg.out_dir}/report.md)", file=sys.stderr
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
