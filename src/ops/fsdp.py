"""Fully sharded data parallel training (``trainer=fsdp``): FSDP2 ``fully_shard`` through Lightning's
``ModelParallelStrategy``, sharded checkpoints that commit atomically, and reading them back without a process group.

Sharding (``DiffusionModule.configure_model`` -> ``configure_sharding``): every block of the denoiser (DiT / VideoDiT /
ViViT ``blocks``, the UNets' ``down`` / ``mid`` / ``up`` / ``transformer`` entries) is its own FSDP2 unit, the rest of
the denoiser (embeddings, patch embedding, final layer) is the denoiser's root unit, and the conditioner's trainable
part (class embedding, attention pool) one more unit. Frozen text encoders and autoencoders are held in
``difflab.utils.frozen.Frozen``, outside the module tree: they stay whole on every rank and out of the optimizer.
Parameters stay float32 shards; ``trainer.precision=bf16-mixed`` gathers them as bf16 for compute and reduces the
gradients in float32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).

Checkpoints (``FSDPStrategy.save_checkpoint``): each rank writes its shards with ``torch.distributed.checkpoint``
(DCP) into ``<name>.shards-<step>-<token>/`` (a standard Lightning sharded checkpoint directory: DCP files +
``meta.pt``), then rank 0 writes ``<name>`` itself (``last.ckpt``, ``step_0000100.ckpt``) atomically: the same
metadata as ``meta.pt`` plus ``checkpoint[SHARDED_KEY] = {"dir": <shard dir name>, ...}``. That small file is the
commit point (a kill during a save leaves the previous ``last.ckpt`` and its shards intact) and keeps every tool that
looks for ``*.ckpt`` files working. DCP entries: ``state_dict`` (the raw weights, what resume loads into the model),
``optimizer_<i>`` and ``ema_state_dict`` (the EMA shards, ``difflab.ops.fsdp_ema``).

``read_sharded_checkpoint`` consolidates such a checkpoint on one process (no process group; CPU) into the single-file
layout (``state_dict`` = EMA weights when EMA was on, ``current_model_state`` = raw), so ``difflab.checkpoints``
(``sample.py``, ``export.py``, ``init_from=``) reads sharded checkpoints like any other.
"""

from __future__ import annotations

import glob
import importlib
import io
import logging
import re
import shutil
import uuid
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from difflab.ops.atomic import atomic_torch_save
from difflab.ops.ema_weights import check_sampling_has_ema
from difflab.trust import bare_name, child_path, is_trusted, restricted_load
from difflab.utils.errors import CheckpointError, ConfigError, UntrustedFileError, disk_full, is_disk_full

log = logging.getLogger(__name__)

SHARDED_KEY = "difflab_sharded"  # in a committed checkpoint file: where its shards are
SHARDS_DIR_KEY = "difflab_shards_dir"  # in a loaded checkpoint dict: the shard directory (for callbacks' own shards)
SHARDED_ENTRIES = ("ema_state_dict",)  # checkpoint entries of sharded tensors written by DCP next to the model's
META_FILE = "meta.pt"  # Lightning's metadata file in a sharded checkpoint directory
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a shard directory (a pickle)
SHARD_FILE = r"__[0-9]+_[0-9]+\.distcp"  # the files DCP's FileSystemWriter names in its index
STRATEGY_TARGET = "difflab.ops.fsdp.FSDPStrategy"
PRECISIONS = ("32-true", "bf16-mixed")  # what trainer=fsdp trains in (ModelParallelStrategy refuses 16-mixed)
BLOCK_CONTAINERS = ("blocks", "transformer", "down", "mid", "up")  # denoiser ModuleLists whose entries are blocks


# --------------------------------------------------------------------------------------------------- configuration
def is_fsdp_strategy_config(strategy: Any) -> bool:
    """True for the trainer config's ``strategy`` of ``trainer=fsdp`` (a ``_target_`` mapping of ``FSDPStrategy``)."""
    return isinstance(strategy, dict) and str(strategy.get("_target_", "")) == STRATEGY_TARGET


def fit_precision(tcfg: dict[str, Any]) -> dict[str, Any]:
    """``tcfg`` (the plain trainer config, after ``precision: auto`` was resolved) with a precision FSDP trains in:
    fp16 autocast (what ``auto`` picks on GPUs without bf16: V100, T4) needs a sharded gradient scaler that
    Lightning's ModelParallelStrategy lacks, so it becomes 32-true, with a warning. Other strategies: unchanged."""
    if not is_fsdp_strategy_config(tcfg.get("strategy")):
        return tcfg
    precision = str(tcfg.get("precision"))
    if precision in ("16-mixed", "16"):
        log.warning(
            "trainer=fsdp: precision %s (fp16 autocast) needs a sharded gradient scaler that Lightning's "
            "ModelParallelStrategy does not have: training in 32-true instead (bf16-mixed needs a GPU with "
            "bf16: Ampere or newer)",
            precision,
        )
        return {**tcfg, "precision": "32-true"}
    return tcfg


def mixed_precision_policy(precision: str | None):
    """FSDP2 ``MixedPrecisionPolicy`` for a Lightning precision: bf16-mixed -> bf16 gathered parameters, float32
    gradient reduction; 32-true -> None (float32 throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = str(precision)
    if precision in ("bf16-mixed", "bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision in ("32-true", "32"):
        return None
    raise ValueError(f"trainer=fsdp trains in {' or '.join(PRECISIONS)}, not precision={precision}")


# --------------------------------------------------------------------------------------------------- sharding
def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def block_units(net: nn.Module) -> list[nn.Module]:
    """The denoiser's blocks, each one FSDP2 unit: ``net.fsdp_units()`` when the network defines it, else the entries
    of its ``blocks`` / ``transformer`` / ``down`` / ``mid`` / ``up`` ModuleLists (an entry that is itself a
    ModuleList, a UNet level's (resblock, attention) pair, gives each of its modules), skipping parameter-free ones.
    Each unit must be called as a module (its forward), which is what triggers FSDP2's gather."""
    if hasattr(net, "fsdp_units"):
        return [m for m in net.fsdp_units() if _trainable(m)]
    units: list[nn.Module] = []
    for name in BLOCK_CONTAINERS:
        container = getattr(net, name, None)
        if not isinstance(container, nn.ModuleList):
            continue
        for entry in container:
            parts = list(entry) if isinstance(entry, nn.ModuleList) else [entry]
            units += [m for m in parts if m is not None and _trainable(m)]
    return units


def is_sharding(trainer: Any) -> bool:
    """True under a strategy that shards parameters as DTensors (``trainer=fsdp``: Lightning's ModelParallelStrategy);
    callbacks that need whole weights ask this in their ``setup``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def is_sharded(module: nn.Module) -> bool:
    """True when some parameter of ``module`` is a DTensor (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(module: nn.Module) -> None:
    """Free every gathered (unsharded) parameter of ``module``'s FSDP2 units, so that ``parameters()`` are the
    shards again (a root unit keeps its gathered weights after a no-grad forward)."""
    for m in fsdp_modules(module):
        m.reshard()


def shard_module(pl_module: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> list[str]:
    """Apply ``fully_shard`` to the blocks of ``pl_module.denoiser`` (one unit each), the denoiser itself (the rest:
    its root unit) and the conditioner's trainable part; returns the unit names. Refuses a module whose trainable
    parameters would be left outside every unit (they would neither be sharded nor have their gradients averaged)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    net = pl_module.denoiser
    names = {id(m): n for n, m in pl_module.named_modules()}
    units = block_units(net)
    for block in units:
        fully_shard(block, **kwargs)
    fully_shard(net, **kwargs)
    units.append(net)
    cond = getattr(pl_module, "conditioner", None)
    if isinstance(cond, nn.Module) and _trainable(cond):
        fully_shard(cond, **kwargs)
        units.append(cond)
    covered = {id(p) for u in units for p in u.parameters()}
    left = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in covered]
    if left:
        raise ConfigError(
            f"trainer=fsdp shards the denoiser and the conditioner; these trainable parameters are "
            f"outside both: {', '.join(left[:6])}{' ...' if len(left) > 6 else ''}"
        )
    return [names.get(id(u), type(u).__name__) for u in units]


def configure_sharding(pl_module) -> list[str]:
    """``LightningModule.configure_model`` under a ModelParallelStrategy (``trainer=fsdp``): shard the module once
    over the data-parallel mesh with the trainer's precision; a no-op under every other strategy (and when already
    sharded: Lightning may call the hook more than once)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = getattr(pl_module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, ModelParallelStrategy) or fsdp_modules(pl_module):
        return []
    mesh = strategy.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError("difflab shards with FSDP only: use tensor_parallel_size=1 (trainer=fsdp does)")
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    units = shard_module(
        pl_module, dp_mesh, mixed_precision_policy(trainer.precision), getattr(strategy, "reshard_after_forward", True)
    )
    log.info(
        "FSDP2: %d units over %d ranks (%d denoiser blocks + denoiser root%s); precision %s",
        len(units),
        dp_mesh.size(),
        len(units) - 1 - (units[-1] == "conditioner"),
        " + conditioner" if units[-1] == "conditioner" else "",
        trainer.precision,
    )
    return units


# --------------------------------------------------------------------------------------------------- sharded tensors
def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage: writing into it writes the shard), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank of its mesh must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``whole`` (held whole by every rank) in the layout of DTensor ``like``; ``whole`` itself
    when ``like`` is a plain tensor. No communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole
    part = distribute_tensor(
        whole.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements, src_data_rank=None
    )
    return part.to_local()


# --------------------------------------------------------------------------------------------------- strategy
def _strategy_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDPStrategy(_strategy_base()):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 over all ranks (data parallel = world size, tensor
    parallel = 1) with difflab's checkpoint layout (see the module docstring).

    ``reshard_after_forward``: free each block's gathered weights after its forward and gather them again for the
    backward (ZeRO-3, least memory); False keeps them until the backward (fewer all-gathers, more memory).
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
    ):
        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size="auto",
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout or default_pg_timeout,
        )
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        check_sampling_has_ema(trainer, "trainer=fsdp")  # sampling callbacks need whole weights, gathered by the EMA
        super().setup(trainer)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        write_sharded_checkpoint(checkpoint, filepath, self.global_rank, self.world_size, self.broadcast, self.barrier)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        shards = sharded_checkpoint_dir(path)
        if shards is None and _referenced_shards(path) is not None:
            raise CheckpointError(
                f"cannot resume from {path}: its shard directory {_referenced_shards(path)} is missing or incomplete"
            )
        if shards is None:
            raise CheckpointError(
                f"trainer=fsdp resumes from the sharded checkpoints it writes; {path} is a "
                f"single-file checkpoint: start a new run from its weights with init_from={path}"
            )
        verify_shards(shards)  # Lightning's DCP reader unpickles the index and non-tensor entries without a check
        metadata = super().load_checkpoint(shards, weights_only=weights_only)
        metadata.pop(SHARDED_KEY, None)
        metadata[SHARDS_DIR_KEY] = str(shards)
        return metadata

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            shards = _referenced_shards(path)
            if shards is not None:
                shutil.rmtree(shards, ignore_errors=True)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- writing
def write_sharded_checkpoint(
    checkpoint: dict[str, Any],
    filepath,
    global_rank: int = 0,
    world_size: int = 1,
    broadcast=lambda obj: obj,
    barrier=lambda: None,
) -> Path:
    """Write a checkpoint whose ``state_dict``, ``optimizer_states`` and ``SHARDED_ENTRIES`` hold sharded tensors
    (DTensors): every rank's shards into a new ``<name>.shards-<step>-<token>/`` (DCP + ``meta.pt``: a Lightning
    sharded checkpoint directory), then, on rank 0, ``<name>`` atomically (metadata + the pointer ``SHARDED_KEY``),
    then the shard directories the file no longer points to are removed. Collective: every rank calls it.
    ``checkpoint`` loses its tensor entries (as Lightning's strategies do)."""
    import torch.distributed.checkpoint as dcp

    path = Path(broadcast(str(filepath)))
    if path.is_dir():
        raise IsADirectoryError(f"cannot write checkpoint {path}: a directory of that name exists")
    token = broadcast(f"{int(checkpoint.get('global_step', 0)):07d}-{uuid.uuid4().hex[:8]}")
    shards = path.parent / f"{path.name}.shards-{token}"
    state = {"state_dict": checkpoint.pop("state_dict")}
    for i, opt_state in enumerate(checkpoint.pop("optimizer_states", [])):
        state[f"optimizer_{i}"] = opt_state
    for key in SHARDED_ENTRIES:
        if key in checkpoint:
            state[key] = checkpoint.pop(key)
    if global_rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
    barrier()
    try:
        dcp.save(state, checkpoint_id=shards)  # collective; returns when every rank's shards are written
    except Exception as err:  # the previous checkpoint and its shards stay; this save leaves nothing behind
        if global_rank == 0:
            shutil.rmtree(shards, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full(shards, err) from None
        raise
    if global_rank == 0:
        previous = _referenced_shards(path)
        torch.save(checkpoint, shards / META_FILE)
        record = {"dir": shards.name, "world_size": world_size, "entries": sorted(state)}
        atomic_torch_save({**checkpoint, SHARDED_KEY: record}, path)  # the commit point
        for old in _stale_shard_dirs(path, keep=shards, previous=previous):
            shutil.rmtree(old, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------------- reading
def _read_record(path: Path) -> dict | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours to judge here: the callers report unreadable files
        return None
    return obj.get(SHARDED_KEY) if isinstance(obj, dict) else None


def _referenced_shards(path: Path) -> Path | None:
    """The shard directory a committed checkpoint file points to (None for anything else): only a bare
    ``<name>.shards-<token>`` beside the file; any other pointer (absolute, ``..``, a symlink) is refused, since
    difflab reads that directory and removes it when the checkpoint is replaced."""
    if not path.is_file():
        return None
    record = _read_record(path)
    if not record:
        return None
    name = record.get("dir") if isinstance(record, dict) else None
    return child_path(path.parent, name, path, f"{SHARDED_KEY}.dir", pattern=re.escape(path.name) + r"\.shards-[\w-]+")


def _stale_shard_dirs(path: Path, keep: Path, previous: Path | None) -> Iterable[Path]:
    """Shard directories of ``path`` other than ``keep``: the one the replaced file pointed to and leftovers of
    saves killed before their commit."""
    for d in path.parent.glob(f"{glob.escape(path.name)}.shards-*"):
        if d != keep and d.is_dir():
            yield d
    if previous is not None and previous != keep and previous.exists():
        yield previous


def is_sharded_dir(path: str | Path) -> bool:
    """A Lightning sharded checkpoint directory (DCP files + meta.pt)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def sharded_checkpoint_dir(path: str | Path) -> Path | None:
    """The shard directory of a sharded checkpoint given as its committed file or as the directory; None otherwise."""
    path = Path(path)
    if is_sharded_dir(path):
        return path
    if path.is_file():
        shards = _referenced_shards(path)
        if shards is not None and is_sharded_dir(shards):
            return shards
    return None


def read_sharded_checkpoint(
    path: str | Path, entries: tuple[str, ...] = ("state_dict", "ema_state_dict"), metadata: dict | None = None
) -> dict[str, Any]:
    """Consolidate a sharded checkpoint (its committed file or its directory) on this process, on the CPU, without
    a process group: the single-file layout (``state_dict`` = the EMA weights when the run had EMA, else the raw
    ones; ``current_model_state`` = raw when there is EMA; every metadata entry). Optimizer states are not read."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    shards = sharded_checkpoint_dir(path)
    if shards is None:
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no shard directory with {META_FILE})")
    if metadata is None:
        metadata = torch.load(path if path.is_file() else shards / META_FILE, map_location="cpu", weights_only=True)
    reader = shard_reader(shards)
    wanted: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, md in reader.read_metadata().state_dict_metadata.items():
        entry, _, key = fqn.partition(".")
        if entry in entries and key and isinstance(md, TensorStorageMetadata):
            wanted.setdefault(entry, {})[key] = torch.empty(md.size, dtype=md.properties.dtype)
    if "state_dict" not in wanted:
        raise FileNotFoundError(f"{shards} holds no model weights (no 'state_dict' entry)")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        load(wanted, storage_reader=reader, no_dist=True)
    ckpt = {k: v for k, v in metadata.items() if k not in (SHARDED_KEY, SHARDS_DIR_KEY)}
    if "ema_state_dict" in wanted:
        ckpt["state_dict"], ckpt["current_model_state"] = wanted["ema_state_dict"], wanted["state_dict"]
    else:
        ckpt["state_dict"] = wanted["state_dict"]
    return ckpt


# --------------------------------------------------------------------------------------------------- trust
def _dcp_global_allowed(module: str, name: str) -> bool:
    """The globals a DCP index may name: its own metadata classes, torch sizes, dtypes and layouts, paths."""
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    if module == "torch":
        return name == "Size" or isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        )
    return (module, name) in {
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }


def verify_shards(shards: Path, trusted: bool | None = None):
    """The DCP index of a shard directory, read without running code: only metadata classes unpickled, every data
    file a bare ``__<rank>_<n>.distcp`` inside ``shards``, every non-tensor entry loadable with ``weights_only``
    (DCP's own loader unpickles those without a check). Unless trusted; refusals name the flag."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    index = Path(shards) / DCP_METADATA
    with open(index, "rb") as f:
        metadata = restricted_load(f, _dcp_global_allowed, index, trusted=trusted)
    if not isinstance(metadata, Metadata):
        raise UntrustedFileError(f"refusing {index}: not a torch.distributed.checkpoint index")
    if is_trusted(trusted):
        return metadata
    infos = metadata.storage_data or {}
    for info in infos.values():
        bare_name(getattr(info, "relative_path", None), index, "storage_data.relative_path", pattern=SHARD_FILE)
        if getattr(info, "transform_descriptors", None):
            raise UntrustedFileError(f"refusing {index}: it stores transformed entries, which difflab never writes")
    for key, info in infos.items():
        if isinstance(metadata.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            with open(Path(shards) / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            try:
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any refusal by the safe loader
                first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                raise UntrustedFileError(
                    f"refusing {shards}: entry {key.fqn} is a pickle that weights_only loading "
                    f"refuses ({first}); if you trust the file's author, rerun with "
                    f"trust_stored_code=true"
                ) from None
    return metadata


def shard_reader(shards: Path, trusted: bool | None = None):
    """A DCP ``FileSystemReader`` of ``shards`` that serves the index ``verify_shards`` read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = verify_shards(shards, trusted)

    class VerifiedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return VerifiedReader(str(shards))
