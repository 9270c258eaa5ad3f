"""Sample from a trained checkpoint: balanced labels or given prompts, written as samples.npz + grid.png."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.checkpoints import module_from_checkpoint
from difflab.ops.atomic import atomic_write
from difflab.trust import check_config
from difflab.utils.errors import instantiate_reporting
from difflab.utils.images import auto_upscale, make_grid, save_png, to_uint8
from difflab.utils.run_record import write_final_metrics

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_sampler(trained: dict, requested: DictConfig | dict | None, source: str = "the checkpoint"):
    """The sampler to use: ``requested`` if it names a ``_target_``, else the trained one (read from ``source``, so
    through the trust gate) with the requested non-null keys."""
    requested = (
        OmegaConf.to_container(requested, resolve=True) if isinstance(requested, DictConfig) else (requested or {})
    )
    if "_target_" in requested:
        return instantiate(requested)
    stored = check_config(trained, source, where="model.diffusion.sampler")
    stored.update({k: v for k, v in requested.items() if v is not None})
    return instantiate_reporting(OmegaConf.create(stored))


def guidance_overrides(requested: DictConfig | dict | None) -> dict:
    """sample.yaml's ``guidance`` block as a plain dict of the keys that are set (null = the checkpoint's value)."""
    if isinstance(requested, DictConfig):
        requested = OmegaConf.to_container(requested, resolve=True)
    return {k: v for k, v in (requested or {}).items() if v is not None}


def sample_conditions(module, n: int, labels=None, prompts=None):
    """Raw conditions for n samples: given labels / prompts (cycled to n), else balanced over classes / prompts."""
    if prompts:
        if module.conditioner.batch_key != "text":
            raise ValueError(
                "prompts=[...] needs a text-conditioned checkpoint; this one is conditioned on "
                f"{module.conditioner.batch_key or 'nothing'}"
            )
        return [list(prompts)[i % len(prompts)] for i in range(n)]
    if labels:
        if module.conditioner.batch_key != "label":
            raise ValueError("labels=[...] needs a class-conditional checkpoint")
        k = module.conditioner.num_classes
        bad = [lab for lab in labels if not 0 <= int(lab) < k]
        if bad:
            raise ValueError(f"labels {bad} are outside 0..{k - 1}")
        return torch.tensor([int(labels[i % len(labels)]) for i in range(n)])
    return module.diffusion.default_conditions(n)


def _slice(raw, i: int, j: int):
    return None if raw is None else raw[i:j]


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` into exactly ``path`` (given a file name, numpy would append ``.npz`` to the temporary name)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_outputs(out_dir: Path, samples: torch.Tensor, raw) -> dict[str, Path]:
    """samples.npz (images or videos uint8, labels / prompts) and grid.png (rows grouped by condition)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(samples).cpu()
    arrays: dict[str, np.ndarray] = {}
    if u8.ndim == 5:  # B x C x T x H x W -> N x T x C x H x W
        arrays["videos"] = u8.permute(0, 2, 1, 3, 4).numpy()
    else:
        arrays["images"] = u8.numpy()
    if isinstance(raw, torch.Tensor):
        arrays["labels"] = raw.cpu().long().numpy().astype(np.int64)
    elif raw is not None:
        arrays["prompts"] = np.array(list(raw), dtype=str)
    npz = atomic_write(out_dir / "samples.npz", lambda tmp: _savez(tmp, arrays))
    still = u8 if u8.ndim == 4 else u8[:, :, u8.shape[2] // 2]
    if isinstance(raw, torch.Tensor):  # one row per class, up to 10 samples each
        order = torch.cat([torch.nonzero(raw.cpu() == c).flatten()[:10] for c in raw.unique().cpu()])
        still, nrow = still[order], 10
    else:
        nrow = min(10, max(1, int(math.sqrt(len(still)))))
        still = still[:100]
    grid = save_png(make_grid(still, nrow=nrow), out_dir / "grid.png", upscale=auto_upscale(still.shape[-1], 48))
    return {"npz": npz, "grid": grid}


def judge_samples(cfg: DictConfig, samples: torch.Tensor, raw, seconds: float) -> Path:
    """``judge=digits``: every digits judge on the samples (``difflab.eval.digits_eval``), written with the sampling
    time to ``<out_dir>/final_metrics.json`` so ``ablate.py`` summarises a ``sample.py -m`` sweep."""
    from difflab.checkpoints import load_weights
    from difflab.eval.digits_eval import DIGIT_JUDGES, DIGITS_N, evaluate_samples, real_floor_metrics
    from difflab.metrics.protocol import write_protocol

    if cfg.judge != "digits":
        raise ValueError(f"judge={cfg.judge!r} is unknown: digits (or null)")
    if not isinstance(raw, torch.Tensor) or samples.ndim != 4:
        raise ValueError("judge=digits needs a class-conditional image model (labels to check the digits against)")
    scores = evaluate_samples(samples, raw.cpu())
    floor = real_floor_metrics(len(samples))
    metrics = {f"eval/{k}": float(v) for k, v in scores.items() if k != "n"}
    protocol = {
        f"eval/{k}": {
            "n_samples": len(samples),
            "eval_seed": int(cfg.seed),
            "feature": DIGIT_JUDGES[k],
            "reference": {"dataset": "digits", "split": "all", "n": DIGITS_N},
            "floor": floor[k],
        }
        for k in scores
        if k != "n"
    }
    write_protocol(cfg.out_dir, protocol)
    metrics["eval/sampling_seconds"] = seconds
    log.info("judged: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return write_final_metrics(cfg.out_dir, metrics, load_weights(cfg.ckpt_path)["step"])


def run_sampling(cfg: DictConfig) -> dict[str, Path]:
    """Load the checkpoint, sample ``cfg.n`` items in batches and write the outputs to ``cfg.out_dir``."""
    device = pick_device(cfg.device)
    module = module_from_checkpoint(cfg.ckpt_path).to(device)
    diffusion = module.diffusion
    trained_sampler = module.run_config["model"]["diffusion"]["sampler"]
    sampler = resolve_sampler(trained_sampler, cfg.get("sampler"), str(cfg.ckpt_path))
    guidance = diffusion.guidance_for(guidance_overrides(cfg.get("guidance")))  # the checkpoint's, null keys kept
    raw = sample_conditions(module, cfg.n, cfg.get("labels"), cfg.get("prompts"))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    start = time.perf_counter()
    chunks = []
    for i in range(0, cfg.n, cfg.batch_size):
        j = min(cfg.n, i + cfg.batch_size)
        noise = torch.randn((j - i, *diffusion.sample_shape), generator=gen)
        chunks.append(
            diffusion.sample(
                module,
                j - i,
                _slice(raw, i, j),
                sampler=sampler,
                guidance=guidance,
                noise=noise,
                generator=gen,
                progress=True,
            ).cpu()
        )
    samples = torch.cat(chunks)
    seconds = time.perf_counter() - start
    out = write_outputs(Path(cfg.out_dir), samples, raw)
    if cfg.get("judge"):
        out["final_metrics"] = judge_samples(cfg, samples, raw, seconds)
    if samples.ndim == 5:  # videos: also an MP4 + GIF grid, one row per prompt
        from difflab.diagnostics.video_grid import video_fps, write_sample_videos

        out.update(write_sample_videos(cfg.out_dir, samples, raw, fps=video_fps(module.run_config)))
    log.info(
        "wrote %d samples with %s, guidance %s to %s", cfg.n, diffusion.describe_sampler(sampler), guidance, cfg.out_dir
    )
    return out
