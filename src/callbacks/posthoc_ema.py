"""Post-hoc EMA snapshots (Karras et al. 2024, EDM2, arXiv 2312.02696, Sec. 3): track a few power-function EMAs of
the trainable weights during training and store them every N steps, so that an EMA of any length can be
reconstructed after training (``difflab-reconstruct-ema``, ``src/reconstruct_ema.py``; math in
``difflab.diffusion.posthoc_ema``).

Opt-in: ``python train.py callbacks=posthoc`` (configs/callbacks/posthoc.yaml), or add it to any other callback set
with ``+callbacks.posthoc_ema._target_=difflab.callbacks.posthoc_ema.PostHocEMA`` (every argument has a default).

Snapshot files: ``<run>/posthoc_ema/snapshot_<step>.safetensors`` (written atomically through ``difflab.ops.atomic``)
holding, per tracked sigma_rel, the float32 average of every trainable parameter (keys ``ema<i>:<name>``), the other
state-dict entries once (``rest:<name>``: buffers, frozen weights) and, as header metadata, the step, the tracked
sigma_rels / gammas and the run config, so a snapshot directory alone rebuilds the model. Disk use per snapshot is
about ``len(sigma_rels) x 4 bytes x trainable parameters``; ``max_snapshots`` bounds the count by thinning old
snapshots evenly (the first and the newest are always kept).

Resume: the averages, the tracked lengths and the step origin are in the callback's ``state_dict`` and so in every
Lightning checkpoint; a resumed run continues the same averages. DDP: every rank updates its (identical) copy; only
global rank 0 writes files. Sharded strategies (FSDP, DeepSpeed) are not supported: the averages need whole tensors.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from difflab.diffusion.posthoc_ema import power_ema_beta, sigma_rel_to_gamma
from difflab.ops.atomic import atomic_write
from difflab.ops.fsdp import is_sharding
from difflab.utils.errors import ConfigError

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "difflab-posthoc-ema-v1"
SNAPSHOT_RE = re.compile(r"snapshot_(\d+)\.safetensors")


def snapshot_path(directory: str | Path, step: int) -> Path:
    """Where the snapshot of ``step`` lives."""
    return Path(directory) / f"snapshot_{step:07d}.safetensors"


def list_snapshots(directory: str | Path) -> dict[int, Path]:
    """``{step: path}`` of the snapshots in ``directory`` (none when it does not exist), sorted by step."""
    directory = Path(directory)
    found = {}
    if directory.is_dir():
        for p in directory.iterdir():
            m = SNAPSHOT_RE.fullmatch(p.name)
            if m:
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def thin_evenly(steps: Sequence[int], keep: int) -> list[int]:
    """The steps to delete so that ``keep`` remain, spread as evenly as possible: repeatedly drop the interior step
    whose neighbours are closest together (the first and the last are always kept)."""
    left = sorted(steps)
    dropped = []
    while len(left) > max(keep, 2):
        i = min(range(1, len(left) - 1), key=lambda j: (left[j + 1] - left[j - 1], left[j]))
        dropped.append(left.pop(i))
    if keep == 1 and len(left) == 2:
        dropped.append(left.pop(0))
    return dropped


class PostHocEMA(L.Callback):
    """One power-function EMA per ``sigma_rels`` entry of the module's trainable weights, updated every optimizer
    step with beta_t = (1 - 1/t)^(gamma + 1), snapshots of all of them every ``snapshot_every`` steps (and at the end
    of training with ``at_end``) in ``dir`` (default ``<trainer.default_root_dir>/posthoc_ema``), at most
    ``max_snapshots`` kept (None: all)."""

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 150,
        max_snapshots: int | None = 64,
        dir: str | None = None,
        at_end: bool = True,
    ):
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError(
                f"callbacks.posthoc_ema.sigma_rels={list(sigma_rels)}: give distinct lengths, e.g. [0.05, 0.10]"
            )
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]  # ValueError outside (0, ~0.30]
        if snapshot_every < 1:
            raise ConfigError(f"callbacks.posthoc_ema.snapshot_every={snapshot_every}: must be >= 1")
        if max_snapshots is not None and max_snapshots < 1:
            raise ConfigError(f"callbacks.posthoc_ema.max_snapshots={max_snapshots}: must be >= 1 or null")
        self.snapshot_every, self.max_snapshots, self.dir, self.at_end = snapshot_every, max_snapshots, dir, at_end
        self.names: list[str] = []
        self.emas: list[list[torch.Tensor]] | None = None  # [profile][parameter], float32 on the module's device
        self.origin = 0  # global step before the first tracked one: profile time t = global_step - origin
        self.last_step = 0  # global step of the latest update
        self._params: list[torch.Tensor] = []
        self._pending: dict | None = None
        self._logged_size = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint keeps: the averages, their lengths and the step counters (resume continues them)."""
        if self.emas is None:
            return {}
        return {
            "version": 1,
            "sigma_rels": list(self.sigma_rels),
            "origin": self.origin,
            "last_step": self.last_step,
            "names": list(self.names),
            "emas": [[t.detach() for t in e] for e in self.emas],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the checkpoint's averages until training starts (the module is on its device only then)."""
        if not state_dict:
            return
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise ConfigError(
                f"the checkpoint tracked post-hoc EMA sigma_rels={state_dict['sigma_rels']}; resume "
                f"with callbacks.posthoc_ema.sigma_rels={state_dict['sigma_rels']} (now "
                f"{self.sigma_rels})"
            )
        self._pending = state_dict

    # ------------------------------------------------------------------ tracking
    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every trainable parameter, names as in the module's state dict."""
        return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if is_sharding(trainer):
            raise ConfigError(
                "trainer=fsdp does not support callbacks=posthoc yet: PostHocEMA keeps whole-model "
                "averages and writes them from rank 0, but under FSDP each rank holds only its shards"
            )
        if self.dir is None:
            self.dir = str(Path(trainer.default_root_dir) / "posthoc_ema")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the averages: from the checkpoint's state when resuming, else fresh from the current step."""
        params = self._trainable(pl_module)
        self.names = [n for n, _ in params]
        self._params = [p for _, p in params]  # fixed from here on: the strategy has placed the module
        if self._pending is not None:
            state, self._pending = self._pending, None
            if list(state["names"]) != self.names:
                raise ConfigError(
                    "the checkpoint's post-hoc EMA tracks other parameters than this model; resume "
                    "with the same model config"
                )
            self.emas = [
                [t.to(device=p.device, dtype=torch.float32) for t, (_, p) in zip(e, params)] for e in state["emas"]
            ]
            self.origin, self.last_step = int(state["origin"]), int(state["last_step"])
            if self.last_step != trainer.global_step:
                log.warning(
                    "post-hoc EMA state is from step %d, the trainer resumes at step %d",
                    self.last_step,
                    trainer.global_step,
                )
            return
        self.emas = [[p.detach().to(torch.float32).clone() for _, p in params] for _ in self.gammas]
        self.origin = self.last_step = trainer.global_step
        if trainer.global_step > 0:
            log.warning(
                "post-hoc EMA starts at step %d (the checkpoint holds no post-hoc EMA state): its profiles "
                "count from there",
                trainer.global_step,
            )

    @torch.no_grad()
    def _update(self, t: int) -> None:
        """One step of every average: ema <- ema + (1 - beta_t) (theta - ema), fused over the parameters (the list
        built once in on_train_start: walking the module tree every step costs more than the lerp)."""
        current = [p.detach().to(torch.float32) for p in self._params]
        for gamma, ema in zip(self.gammas, self.emas):
            torch._foreach_lerp_(ema, current, 1.0 - power_ema_beta(t, gamma))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.emas is None or step <= self.last_step:  # gradient accumulation: not an optimizer step
            return
        self._update(step - self.origin)
        self.last_step = step
        if step % self.snapshot_every == 0:
            self.write_snapshot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The final step's snapshot, unless the schedule just wrote it."""
        if (
            self.at_end
            and self.emas is not None
            and self.last_step > self.origin
            and self.last_step % self.snapshot_every
        ):
            self.write_snapshot(trainer, pl_module)

    # ------------------------------------------------------------------ snapshots
    def _tensors(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The snapshot's tensors: every average (``ema<i>:<name>``) and the untracked state entries (``rest:``)."""
        out = {
            f"ema{i}:{n}": t.detach().cpu().contiguous().clone()
            for i, ema in enumerate(self.emas)
            for n, t in zip(self.names, ema)
        }
        tracked = set(self.names)
        for k, v in pl_module.state_dict().items():
            if k not in tracked and torch.is_tensor(v) and "_orig_mod." not in k:
                out[f"rest:{k}"] = v.detach().cpu().contiguous().clone()
        return out

    @staticmethod
    def _run_info(pl_module: L.LightningModule) -> str:
        """The ``difflab`` section the module writes into checkpoints (run config, kind), as JSON; "" if none."""
        section: dict = {}
        try:
            pl_module.on_save_checkpoint(section)
            return json.dumps(section.get("difflab") or {})
        except (TypeError, ValueError, AttributeError):
            return ""

    def write_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Write the snapshot of the current step (global rank 0 only), then thin old ones to ``max_snapshots``."""
        if not trainer.is_global_zero:
            return None
        from safetensors.torch import save_file

        step = self.last_step
        tensors = self._tensors(pl_module)
        metadata = {
            "format": SNAPSHOT_FORMAT,
            "step": str(step),
            "t": str(step - self.origin),
            "origin": str(self.origin),
            "sigma_rels": json.dumps(self.sigma_rels),
            "gammas": json.dumps(self.gammas),
            "names": json.dumps(self.names),
            "difflab": self._run_info(pl_module),
        }
        path = atomic_write(snapshot_path(self.dir, step), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        if not self._logged_size:
            self._log_size(path)
        self._thin()
        return path

    def _log_size(self, path: Path) -> None:
        mb = path.stat().st_size / 1e6
        n = sum(t.numel() for t in self.emas[0])
        bound = (
            f"at most {self.max_snapshots} kept (~{mb * self.max_snapshots:.0f} MB)"
            if self.max_snapshots
            else "all kept (set callbacks.posthoc_ema.max_snapshots to bound them)"
        )
        log.info(
            "post-hoc EMA: %.2f MB per snapshot (%d profiles sigma_rel=%s x %s trainable parameters, float32), "
            "every %d steps in %s; %s",
            mb,
            len(self.emas),
            self.sigma_rels,
            f"{n:,}",
            self.snapshot_every,
            self.dir,
            bound,
        )
        self._logged_size = True

    def _thin(self) -> None:
        if not self.max_snapshots:
            return
        found = list_snapshots(self.dir)
        for step in thin_evenly(list(found), self.max_snapshots):
            found[step].unlink(missing_ok=True)
            log.debug("post-hoc EMA: removed snapshot of step %d (max_snapshots=%d)", step, self.max_snapshots)


def _open_snapshot(path: Path, read):
    """``read(safe_open handle)`` on a snapshot; an unreadable or foreign file raises a one-line ConfigError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != SNAPSHOT_FORMAT:
                raise ConfigError(f"{path} is not a post-hoc EMA snapshot (no {SNAPSHOT_FORMAT} header)")
            return read(f)
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ConfigError(f"cannot read post-hoc EMA snapshot {path}: {first}") from None


def read_snapshot_info(path: str | Path) -> dict:
    """A snapshot's header without its tensors: ``{"path", "step", "t", "origin", "sigma_rels", "gammas",
    "difflab"}`` (``difflab``: the run config section checkpoints carry)."""
    path = Path(path)
    meta = _open_snapshot(path, lambda f: dict(f.metadata()))
    return {
        "path": path,
        "step": int(meta["step"]),
        "t": int(meta["t"]),
        "origin": int(meta["origin"]),
        "sigma_rels": json.loads(meta["sigma_rels"]),
        "gammas": json.loads(meta["gammas"]),
        "difflab": json.loads(meta["difflab"]) if meta.get("difflab") else {},
    }


def read_snapshot_tensors(path: str | Path) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A snapshot's tensors: (one state dict of averaged parameters per tracked profile, the untracked entries)."""
    tensors = _open_snapshot(Path(path), lambda f: {k: f.get_tensor(k) for k in f.keys()})
    n = 1 + max((int(k[3 : k.index(":")]) for k in tensors if k.startswith("ema")), default=-1)
    emas = [{k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith(f"ema{i}:")} for i in range(n)]
    rest = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("rest:")}
    return emas, rest


__all__ = [
    "PostHocEMA",
    "list_snapshots",
    "read_snapshot_info",
    "read_snapshot_tensors",
    "snapshot_path",
    "thin_evenly",
]
