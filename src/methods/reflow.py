"""Reflow (Liu, Gong & Liu 2022, arXiv 2209.03003): a flow student trained on the teacher's own couplings (noise,
the teacher's ODE sample from it), whose straight paths a few Euler steps follow."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from difflab.diffusion.guidance import Guidance
from difflab.diffusion.processes import FlowProcess, NoiseProcess
from difflab.diffusion.samplers import Sampler, sampler_name
from difflab.methods.base import TrainingMethod
from difflab.methods.couplings import Couplings, identity_key, read_couplings, read_manifest, write_couplings
from difflab.methods.guidance_input import GuidanceScales, adopt_teacher_of
from difflab.metrics.protocol import weights_digest
from difflab.storage.progress import progress_bar
from difflab.utils.errors import ConfigError, CorruptDataError
from difflab.utils.frozen import Frozen

log = logging.getLogger(__name__)


class Reflow(TrainingMethod):
    """Draw ``num_pairs`` couplings from ``teacher_ckpt`` once (its own sampler unless ``teacher_sampler``, guided by
    ``teacher_guidance``; written under ``pairs_dir`` in a directory named by their identity, reused by every run
    that asks for the same), then train the student (started as the teacher) with the flow loss at the process's
    training times on those pairs instead of fresh noise. Each step draws the datamodule's batch size of pairs; the
    datamodule's images are not used. The student samples unguided with its ``sampler`` (Euler at 1 or 2 steps). With
    ``guidance_scales`` each coupling is drawn at its own scale w ~ U[lo, hi] (kept with it) that the student takes as
    input: one student for every scale, sampled with ``guidance=distilled``."""

    name = "reflow"
    needs_teacher = True

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        pairs_dir: str = "reflow_pairs",
        num_pairs: int = 16384,
        pairs_seed: int = 0,
        chunk: int = 256,
        teacher_sampler: Sampler | None = None,
        teacher_guidance: Guidance | None = None,
        guidance_scales: Sequence[float] | None = None,
    ) -> None:
        if not teacher_ckpt:
            raise ConfigError(
                "method=reflow needs method.teacher_ckpt: the checkpoint or export whose ODE couplings the student "
                "learns (e.g. a default digits run's checkpoints/last.ckpt)"
            )
        if num_pairs < 1 or chunk < 1:
            raise ConfigError(f"method.num_pairs={num_pairs} and method.chunk={chunk} must be >= 1")
        self.teacher_ckpt, self.pairs_dir = str(teacher_ckpt), str(pairs_dir)
        self.num_pairs, self.pairs_seed, self.chunk = int(num_pairs), int(pairs_seed), int(chunk)
        self.teacher_sampler, self.teacher_guidance = teacher_sampler, teacher_guidance
        self.guidance_scales = GuidanceScales.parse(guidance_scales)
        self.couplings: Couplings | None = None
        self._teacher: Frozen | None = None

    def check(self, process: NoiseProcess, sampler: Sampler) -> None:
        """Refuse (ValueError) a process other than flow: reflow straightens a flow's paths."""
        if not isinstance(process, FlowProcess):
            raise ValueError(f"method=reflow trains a rectified-flow student: use process=flow, not {process.name}")

    def describe(self) -> str:
        guided = "" if self.guidance_scales is None else f", guided {self.guidance_scales.describe()}"
        return (
            f"reflow: {self.num_pairs} couplings of teacher {self.teacher_ckpt} (seed {self.pairs_seed}) under "
            f"{self.pairs_dir}{guided}"
        )

    # ---------------------------------------------------------------- hooks
    def setup(self, module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.refuse_misfit(module)
        self._teacher = adopt_teacher_of(module, self.teacher_ckpt, self.teacher_guidance, self.guidance_scales)

    def identity(self) -> dict:
        """What decides the couplings: the teacher file, how it samples (with ``guidance_scales``: the range, not the
        guidance's own scale), how many, from which noise."""
        assert self._teacher is not None, "setup() loads the teacher first"
        teacher: Any = self._teacher.module  # a DiffusionModule
        d = teacher.diffusion
        sampler = self.teacher_sampler or d.sampler
        keywords = {k: repr(v) for k, v in sorted(getattr(sampler, "keywords", {}).items())}
        guidance = self.teacher_guidance if self.teacher_guidance is not None else d.guidance
        shown, scales = repr(guidance), {}
        if self.guidance_scales is not None:  # each coupling's own scale replaces the guidance's
            shown = f"{guidance.updated({'scale': 1.0})!r} at each coupling's scale"
            scales = {"guidance_scales": [self.guidance_scales.lo, self.guidance_scales.hi]}
        return {
            **scales,
            "teacher_sha256": weights_digest(self.teacher_ckpt, 64),
            "sampler": f"{sampler_name(sampler)} {keywords}",
            "guidance": shown,
            "count": self.num_pairs,
            "seed": self.pairs_seed,
            "sample_shape": list(d.sample_shape),
        }

    def directory(self, identity: dict | None = None) -> Path:
        """Where this run's couplings live: ``pairs_dir/<hash of their identity>`` (``identity``: already computed)."""
        return Path(self.pairs_dir).expanduser() / identity_key(identity or self.identity())

    @torch.no_grad()
    def draw(self, device: torch.device, progress: bool = True) -> Couplings:
        """``num_pairs`` couplings from the teacher, in chunks: balanced conditions, seeded noise (and scales, with
        ``guidance_scales``), the teacher's guided ODE sample (in the model's space, not decoded)."""
        assert self._teacher is not None, "setup() loads the teacher first"
        self._teacher.to(device)
        teacher: Any = self._teacher.module
        d = teacher.diffusion
        conditions = d.default_conditions(self.num_pairs, torch.device("cpu"))
        g = torch.Generator().manual_seed(self.pairs_seed)
        noise = torch.randn((self.num_pairs, *d.sample_shape), generator=g)
        scales = None if self.guidance_scales is None else self.guidance_scales.draw(self.num_pairs, generator=g)
        samples = torch.empty_like(noise)
        with progress_bar(progress, "reflow couplings") as bar:
            task = bar.add_task("from the teacher", total=self.num_pairs) if bar is not None else None
            for start in range(0, self.num_pairs, self.chunk):
                rows = slice(start, min(start + self.chunk, self.num_pairs))
                cond = conditions[rows] if conditions is not None else None
                if isinstance(cond, torch.Tensor):
                    cond = cond.to(device)
                x = d.sample(
                    teacher, noise[rows].shape[0], cond, sampler=self.teacher_sampler,
                    guidance=self.teacher_guidance, noise=noise[rows], decode=False,
                    guidance_scale=None if scales is None else scales[rows].to(device),
                )  # fmt: skip
                samples[rows] = x.float().cpu()
                if bar is not None:
                    bar.update(task, advance=x.shape[0])
        return Couplings(noise, samples, conditions, scales)

    def prepare(self, module: Any) -> None:
        """Read this run's couplings, drawing and writing them first (global rank 0) when none exist."""
        identity = self.identity()
        directory = self.directory(identity)
        trainer = getattr(module, "_trainer", None)
        if read_manifest(directory) is None and (trainer is None or trainer.is_global_zero):
            started = time.perf_counter()
            log.info("drawing %d reflow couplings from %s into %s", self.num_pairs, self.teacher_ckpt, directory)
            write_couplings(directory, identity, self.draw(module.device, progress=trainer is not None))
            log.info("reflow couplings drawn in %.1f s", time.perf_counter() - started)
        if trainer is not None:
            trainer.strategy.barrier("reflow couplings")
        d = module.diffusion
        self.couplings = read_couplings(directory, identity, tuple(d.sample_shape))
        labels, classes = self.couplings.conditions, getattr(d.conditioner, "num_classes", None)
        if isinstance(labels, torch.Tensor) and isinstance(classes, int) and len(labels):
            if int(labels.min()) < 0 or int(labels.max()) >= classes:
                raise CorruptDataError(
                    f"{directory}/labels.npy holds labels outside 0..{classes - 1}; delete {directory}"
                )
        self._teacher = None  # the couplings are all the student needs of it

    def on_train_batch_start(self, module: Any, step: int) -> None:
        if self.couplings is None:
            self.prepare(module)

    # ---------------------------------------------------------------- the loss
    def loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        if self.couplings is None:
            self.prepare(module)
        assert self.couplings is not None
        d = module.diffusion
        x = batch["x"]
        # the run's generator (restored on exact resume), the same on every rank: each rank takes its own share
        trainer = getattr(module, "_trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        index = torch.randint(len(self.couplings), (world, x.shape[0]))[rank]
        noise, samples, cond, scales = self.couplings.rows(index)
        pairs: dict[str, Any] = {"x": samples.to(x.device, x.dtype)}
        key = d.conditioner.batch_key
        if key is not None:
            pairs[key] = cond.to(x.device) if isinstance(cond, torch.Tensor) else cond
        noise = noise.to(x.device, x.dtype)
        inputs = None if scales is None else {"guidance_scale": scales.to(x.device)}  # each coupling's own scale
        return d.losses(module, pairs, drop_conditions=False, noise=noise, inputs=inputs)["loss"].mean()
