"""Reconstruct an EMA of any length from a run's post-hoc EMA snapshots (Karras et al. 2024, EDM2, arXiv 2312.02696):
``difflab-reconstruct-ema run_dir=RUN sigma_rel=0.07 [step=N] [out=FILE]`` (or ``gamma=G`` instead of sigma_rel).

Reads ``RUN/posthoc_ema/snapshot_*.safetensors`` (written by ``callbacks=posthoc``, src/callbacks/posthoc_ema.py),
solves for the combination of the snapshots closest to the wanted power-function profile at ``step`` (default: the
latest snapshot) and writes a checkpoint in the format of the run's ``last.ckpt`` with the reconstructed weights as
its EMA weights (default ``RUN/posthoc_ema/reconstructed/sigma_rel_<value>_step_<step>.ckpt``, never over an existing
file unless ``overwrite=true``), which ``difflab-sample``, ``difflab-export``, ``difflab-report`` and
``init_from=`` read. A sweep writes one file per value: ``-m run_dir=RUN sigma_rel=0.03,0.05,0.08,0.12``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from difflab.configs import CONFIG_PATH
from difflab.utils.cli import console_command
from difflab.utils.resolve import shown

HOW_TO_TRAIN = (
    "train with callbacks=posthoc (or +callbacks.posthoc_ema._target_=difflab.callbacks.posthoc_ema.PostHocEMA)"
)


def target_gamma(sigma_rel: float | None, gamma: float | None) -> tuple[float, str]:
    """The exponent to reconstruct and its label for file names, from exactly one of sigma_rel / gamma."""
    from difflab.diffusion.posthoc_ema import SIGMA_REL_MAX, sigma_rel_to_gamma
    from difflab.utils.errors import ConfigError

    if (sigma_rel is None) == (gamma is None):
        raise ConfigError(
            f"give exactly one of sigma_rel (EMA length relative to training time, e.g. 0.07) or "
            f"gamma (power-function exponent); got sigma_rel={shown(sigma_rel)}, gamma={shown(gamma)}"
        )
    if gamma is not None:
        return float(gamma), f"gamma_{float(gamma):.3f}"
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel={sigma_rel}: must be in (0, {SIGMA_REL_MAX:.3f}]")
    return sigma_rel_to_gamma(sigma_rel), f"sigma_rel_{float(sigma_rel):.4f}"


def select_snapshots(directory: Path, step: int | None) -> tuple[list[dict], int]:
    """Headers of the snapshots to combine (steps <= ``step``, one tracking origin) and the step to reconstruct at (a
    snapshot's step: the weights of other steps were never stored)."""
    from difflab.callbacks.posthoc_ema import list_snapshots, read_snapshot_info
    from difflab.utils.errors import ConfigError

    found = list_snapshots(directory)
    if not found:
        raise ConfigError(f"no post-hoc EMA snapshots in {directory} (snapshot_*.safetensors); {HOW_TO_TRAIN}")
    step = max(found) if step is None else int(step)
    if step not in found:
        steps = [str(s) for s in found]
        shown = ", ".join(steps if len(steps) <= 12 else [*steps[:6], "...", *steps[-5:]])
        raise ConfigError(f"step={step} has no snapshot in {directory}: {len(found)} snapshots at steps {shown}")
    infos = [read_snapshot_info(p) for s, p in found.items() if s <= step]
    origin = infos[-1]["origin"]
    return [i for i in infos if i["origin"] == origin], step


def run_section(infos: list[dict], run_dir: Path) -> dict:
    """The checkpoint's ``difflab`` section (run config, kind): from the snapshot, else from the run's last.ckpt;
    its config, which the loaders build, passes the trust gate, so nothing they would refuse is copied into the new
    checkpoint (an autoencoder's ``run_config`` is only ever compared, never built)."""
    from difflab.checkpoints import load_checkpoint
    from difflab.trust import check_config
    from difflab.utils.errors import ConfigError

    if infos[-1]["difflab"].get("config"):
        check_config(infos[-1]["difflab"]["config"], infos[-1]["path"])
        return infos[-1]["difflab"]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        section = load_checkpoint(last).get("difflab") or {}
        if section.get("config"):
            check_config(section["config"], last)
            return section
    raise ConfigError(f"{infos[-1]['path']} holds no run config and {last} is missing; cannot rebuild the model")


def reconstruct_weights(directory: Path, gamma: float, step: int | None = None, tolerance: float = 0.05) -> dict:
    """The weights of the power-function EMA ``gamma`` at ``step`` (default: the latest snapshot) from the snapshots
    in ``directory``: ``{"state_dict", "infos", "step", "coefficients", "residual", "tracked"}``. The state dict holds
    the reconstructed parameters and the untracked entries of the last snapshot used."""
    from difflab.callbacks.posthoc_ema import read_snapshot_tensors
    from difflab.diffusion.posthoc_ema import check_expressible, combine_state_dicts

    infos, step = select_snapshots(directory, step)
    pairs = [(info, i) for info in infos for i in range(len(info["gammas"]))]
    tracked = sorted({s for info in infos for s in info["sigma_rels"]})
    coeffs, residual = check_expressible(
        [info["gammas"][i] for info, i in pairs],
        [info["t"] for info, _ in pairs],
        gamma,
        step - infos[-1]["origin"],
        tolerance,
        tracked=tracked,
        where=str(directory),
    )

    def weighted():  # one snapshot in memory at a time
        for info in infos:
            yield from read_snapshot_tensors(info["path"])[0]

    weights = combine_state_dicts(weighted(), coeffs)
    rest = read_snapshot_tensors(infos[-1]["path"])[1]
    return {
        "state_dict": {**rest, **weights},
        "infos": infos,
        "step": step,
        "coefficients": coeffs,
        "residual": residual,
        "tracked": tracked,
    }


def reconstruct(cfg: DictConfig) -> Path:
    """Check the request, reconstruct and write the checkpoint; returns its path. User errors: one ConfigError line."""
    import logging

    from difflab.diffusion.posthoc_ema import gamma_to_sigma_rel
    from difflab.ops.atomic import atomic_torch_save
    from difflab.utils.errors import ConfigError

    run_dir = Path(cfg.run_dir).expanduser()
    directory = Path(cfg.snapshot_dir).expanduser() if cfg.get("snapshot_dir") else run_dir / "posthoc_ema"
    gamma, label = target_gamma(cfg.get("sigma_rel"), cfg.get("gamma"))
    infos, step = select_snapshots(directory, cfg.get("step"))
    out = (
        Path(cfg.out).expanduser() if cfg.get("out") else directory / "reconstructed" / f"{label}_step_{step:07d}.ckpt"
    )
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=true or another out=")
    section = run_section(infos, run_dir)
    rec = reconstruct_weights(directory, gamma, step, float(cfg.tolerance))
    sigma_rel, coeffs = gamma_to_sigma_rel(gamma), rec["coefficients"]
    checkpoint = {
        "state_dict": rec["state_dict"],
        "global_step": step,
        "epoch": None,
        "difflab": section,
        "posthoc_ema": {
            "sigma_rel": sigma_rel,
            "gamma": gamma,
            "step": step,
            "tolerance": float(cfg.tolerance),
            "residual": rec["residual"],
            "snapshots": [i["path"].name for i in rec["infos"]],
            "coefficients": [float(c) for c in coeffs],
        },
    }
    atomic_torch_save(checkpoint, out)
    logging.getLogger(__name__).info(
        "post-hoc EMA coefficients %s (sum %.6f)", [round(float(c), 4) for c in coeffs], float(sum(coeffs))
    )
    print(
        f"reconstructed sigma_rel={sigma_rel:.4g} (gamma={gamma:.4g}) at step {step} from {len(rec['infos'])} "
        f"snapshots (tracked sigma_rel {', '.join(f'{s:g}' for s in rec['tracked'])}; profile residual "
        f"{rec['residual']:.2%}) -> {out}"
    )
    return out


@console_command
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="reconstruct_ema")
def main(cfg: DictConfig) -> None:
    from difflab.trust import trust_from
    from difflab.utils.cli import run_reporting_errors

    with trust_from(cfg):
        run_reporting_errors(reconstruct, cfg)


if __name__ == "__main__":
    main()
