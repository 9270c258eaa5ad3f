"""Reflow's couplings on disk: (noise, condition, teacher sample) triples drawn once and shared by every student
trained on them (seeds, sweeps, resumes).

A coupling set is a directory named by the hash of what drew it (the teacher file's SHA-256, its sampler and
guidance, the scale range of a guidance-distilled student, the count, the seed, the sample shape): ``noise.npy`` (unit Gaussian noise, float32), ``samples.npy`` (the
teacher's ODE samples from that noise, in the model's space: latents for latent models), ``labels.npy`` (class
models) or ``prompts.json`` (text models), ``scales.npy`` (each coupling's guidance scale, float32, when the student
takes the scale as input), and ``manifest.json``, written last. Reading uses ``np.load`` without
pickle and ``json``: a shared coupling set runs no code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.ops.atomic import atomic_path, write_text
from difflab.trust import not_a_link
from difflab.utils.errors import CorruptDataError

FORMAT = "difflab-reflow-couplings/1"
MANIFEST = "manifest.json"


@dataclass
class Couplings:
    """Paired noise and teacher samples, with the raw conditions (labels, prompts or None) and the guidance scales
    (or None) they were drawn at."""

    noise: torch.Tensor
    samples: torch.Tensor
    conditions: Any
    scales: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None]:
        """Noise, samples, conditions and guidance scales of the rows ``index`` (a CPU long tensor)."""
        cond = self.conditions
        if isinstance(cond, torch.Tensor):
            cond = cond[index]
        elif cond is not None:
            cond = [cond[i] for i in index.tolist()]
        scales = None if self.scales is None else self.scales[index]
        return self.noise[index], self.samples[index], cond, scales


def identity_key(identity: dict) -> str:
    """The directory name of a coupling set: 16 hex digits of the SHA-256 of its identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def write_couplings(directory: str | Path, identity: dict, couplings: Couplings) -> Path:
    """Write ``couplings`` into ``directory`` (its arrays, then the manifest that marks it complete)."""
    out = not_a_link(Path(directory))
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"noise.npy": couplings.noise, "samples.npy": couplings.samples}
    if isinstance(couplings.conditions, torch.Tensor):
        arrays["labels.npy"] = couplings.conditions.long()
    if couplings.scales is not None:
        arrays["scales.npy"] = couplings.scales.float()
    for name, tensor in arrays.items():
        with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
            np.save(f, tensor.detach().cpu().numpy(), allow_pickle=False)
    if isinstance(couplings.conditions, list):
        write_text(out / "prompts.json", json.dumps([str(p) for p in couplings.conditions]))
    manifest = {"format": FORMAT, "count": len(couplings), "identity": identity}
    write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return out


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a complete coupling set (None: none written, or an interrupted write)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptDataError(f"cannot read {path} ({err}); delete {directory} to draw the couplings again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptDataError(f"{path} is not a {FORMAT} manifest; delete {directory} to draw the couplings again")
    return manifest


def read_couplings(directory: str | Path, identity: dict, sample_shape: tuple[int, ...]) -> Couplings:
    """The coupling set in ``directory``, checked against the ``identity`` and sample shape this run expects."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    redo = f"delete {directory} to draw the couplings again"
    if manifest is None:
        raise CorruptDataError(f"{directory} holds no complete coupling set ({MANIFEST} missing); {redo}")
    if manifest.get("identity") != identity:
        raise CorruptDataError(f"{directory} was drawn by another teacher or sampler than this run's; {redo}")
    count = manifest.get("count")

    def load(name: str) -> np.ndarray:
        try:
            return np.load(directory / name, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise CorruptDataError(f"cannot read {directory / name} ({err}); {redo}") from err

    noise, samples = load("noise.npy"), load("samples.npy")
    for name, array in (("noise.npy", noise), ("samples.npy", samples)):
        if array.shape != (count, *sample_shape) or array.dtype != np.float32:
            raise CorruptDataError(
                f"{directory / name} holds {array.dtype} {array.shape}, not float32 {(count, *sample_shape)}; {redo}"
            )
    conditions: Any = None
    if (directory / "labels.npy").is_file():
        labels = load("labels.npy")
        if labels.shape != (count,) or labels.dtype != np.int64:
            raise CorruptDataError(f"{directory / 'labels.npy'} is not {count} int64 labels; {redo}")
        conditions = torch.from_numpy(labels)
    elif (directory / "prompts.json").is_file():
        try:
            conditions = json.loads((directory / "prompts.json").read_text())
        except (OSError, ValueError) as err:
            raise CorruptDataError(f"cannot read {directory / 'prompts.json'} ({err}); {redo}") from err
        if not (
            isinstance(conditions, list) and len(conditions) == count and all(isinstance(p, str) for p in conditions)
        ):
            raise CorruptDataError(f"{directory / 'prompts.json'} is not a list of {count} prompts; {redo}")
    scales = None
    drawn_at = identity.get("guidance_scales")  # [lo, hi] when the student takes the scale as input
    if drawn_at is not None:
        values = load("scales.npy")
        lo, hi = drawn_at
        slack = 1e-5 * max(1.0, abs(hi))  # float32 rounding of lo + (hi - lo) u
        fits = values.dtype == np.float32 and values.shape == (count,)
        if not fits or not bool(((lo - slack <= values) & (values <= hi + slack)).all()):  # NaN: outside
            raise CorruptDataError(f"{directory / 'scales.npy'} is not {count} float32 scales in [{lo}, {hi}]; {redo}")
        scales = torch.from_numpy(values)
    return Couplings(torch.from_numpy(noise), torch.from_numpy(samples), conditions, scales)
