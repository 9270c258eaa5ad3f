"""The trust gate: what difflab accepts from a file it did not compose in this run (a checkpoint, an export, a
latent cache or shard manifest, a sweep directory) before anything is built or written. docs/SECURITY.md states the
trust model; this module is its only implementation.

- ``check_config``: every ``_target_`` of a stored config (recursively: nested args, lists, ``_partial_``) must
  resolve to an object on the allowlist (``ALLOWLIST``), judged on the resolved object, not on the string; a string
  holding ``${`` is refused (difflab stores resolved configs; OmegaConf would resolve it, reading the environment).
  ``build_stored`` is the one way to instantiate a stored config.
- ``data_strings``, ``split_name``, ``bare_name``, ``child_path``: values that must be data (class names, prompts,
  split names, shard, chunk and shard-directory names) are type-checked and confined to their own directory.
- ``restricted_load``: unpickling limited to an allowlist of globals (torch.distributed.checkpoint metadata).

A user who trusts a file's author opts in with ``trust_stored_code=true`` (every console command), ``trusting()``
(a context) or ``trusted=True`` (the loaders' argument): then any importable ``_target_`` and any pickle are
accepted. Paths stay confined and stored interpolations are refused either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from difflab.utils.errors import UntrustedFileError, instantiate_reporting

TRUST_KEY = "trust_stored_code"
TRUST_HINT = f"if you trust the file's author, rerun with {TRUST_KEY}=true"
SPLITS = ("train", "val", "test")
CONFIG_TARGET = "__difflab_config_target__"

# What a stored _target_ may build. Judged on the resolved object: its own __module__, its kind and its bases.
FUNCTION_PACKAGES = ("difflab.diffusion.",)  # plain math on tensors: samplers, schedules, objectives
EXTERNAL_BASES = {  # outside difflab: classes deriving from these (import path of the base)
    "lightning.pytorch.": (
        "lightning.pytorch.callbacks.Callback",
        "lightning.pytorch.loggers.Logger",
        "lightning.pytorch.Trainer",
    ),
    "torch.optim.": ("torch.optim.Optimizer", "torch.optim.lr_scheduler.LRScheduler"),
}
ROOTS = ("difflab", "lightning", "torch")  # nothing else is imported to resolve a stored target
ALLOWLIST = (
    "difflab classes; functions in difflab.diffusion and difflab functions marked @config_target; "
    "Lightning callbacks, loggers and Trainer; torch optimizers and LR schedulers"
)

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("difflab_trusted", default=False)


# ---------------------------------------------------------------------------------------------- the user's choice
def is_trusted(trusted: bool | None = None) -> bool:
    """``trusted`` if given, else the current context's choice (``trusting``); False by default."""
    return _TRUSTED.get() if trusted is None else bool(trusted)


@contextlib.contextmanager
def trusting(trusted: bool = True) -> Iterator[None]:
    """Within the block, stored configs may name any importable target and pickles load (``trust_stored_code``)."""
    token = _TRUSTED.set(bool(trusted))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


@contextlib.contextmanager
def trust_from(cfg: Any) -> Iterator[None]:
    """A console command's choice: ``trust_stored_code`` of its composed config (logged when on)."""
    trusted = bool(cfg.get(TRUST_KEY, False)) if cfg is not None else False
    if trusted:
        logging.getLogger(__name__).warning(
            "%s=true: the checkpoints, exports and caches this command reads may "
            "name any importable class and unpickle anything",
            TRUST_KEY,
        )
    with trusting(trusted):
        yield


def config_target(fn: Callable) -> Callable:
    """Mark a difflab function outside difflab.diffusion as a builder a stored config may name (a factory that
    only reads, such as ``load_cache_autoencoder``)."""
    setattr(fn, CONFIG_TARGET, True)
    return fn


# ---------------------------------------------------------------------------------------------- targets
def _refuse(source: Any, where: str, what: str, hint: bool = True) -> UntrustedFileError:
    tail = f"; {TRUST_HINT}" if hint else ""
    return UntrustedFileError(f"refusing {source}: {where} {what}{tail}")


def _import_longest(parts: list[str]) -> tuple[Any, list[str]]:
    """The longest importable module prefix of ``parts`` and the attribute names after it."""
    for i in range(len(parts), 0, -1):
        try:
            return importlib.import_module(".".join(parts[:i])), parts[i:]
        except ModuleNotFoundError as err:
            if err.name is None or not ".".join(parts[:i]).startswith(err.name):
                raise  # the module exists but imports something missing: say so
    raise ModuleNotFoundError(parts[0])


def resolve_target(target: str) -> Any:
    """The object a dotted ``_target_`` names (modules imported, then attributes), like Hydra's locate."""
    obj, rest = _import_longest(target.split("."))
    for name in rest:
        obj = getattr(obj, name)
    return obj


def _base(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def why_not_allowed(obj: Any) -> str | None:
    """None when ``obj`` is on the allowlist, else why it is not."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return f"is a {type(obj).__name__}, not a class or a function"
    module, qualname = getattr(obj, "__module__", "") or "", getattr(obj, "__qualname__", "")
    if any(part.startswith("_") or part == "<locals>" for part in qualname.split(".")):
        return f"is the private {module}.{qualname}"
    if module == "difflab" or module.startswith("difflab."):
        if inspect.isclass(obj) or module.startswith(FUNCTION_PACKAGES) or getattr(obj, CONFIG_TARGET, False):
            return None
        return f"is the difflab function {module}.{qualname}, which is not a config target"
    for prefix, bases in EXTERNAL_BASES.items():
        if module.startswith(prefix) and inspect.isclass(obj) and issubclass(obj, tuple(_base(b) for b in bases)):
            return None
    return f"resolves to {module}.{qualname}"


def check_target(target: Any, source: Any, where: str, trusted: bool | None = None) -> None:
    """Refuse a stored ``_target_`` that does not name an allowlisted object (any importable one when trusted)."""
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise _refuse(source, where, f"is {target!r}, not a dotted import path", hint=False)
    if is_trusted(trusted):
        return
    if target.split(".", 1)[0] not in ROOTS:
        raise _refuse(source, where, f"= {target} is outside difflab's allowlist ({ALLOWLIST})")
    if any(part.startswith("_") for part in target.split(".")):
        raise _refuse(source, where, f"= {target} names a private object")
    try:
        obj = resolve_target(target)
    except (ImportError, AttributeError) as err:
        raise _refuse(
            source, where, f"= {target} cannot be imported ({type(err).__name__}: {err})", hint=False
        ) from None
    reason = why_not_allowed(obj)
    if reason is not None:
        raise _refuse(source, where, f"= {target} {reason}, outside difflab's allowlist ({ALLOWLIST})")


# ---------------------------------------------------------------------------------------------- configs
_INTERPOLATION = re.compile(r"(\\*)\$\{")


def literal_string(text: str) -> str:
    """``text`` escaped so that OmegaConf reads it back unchanged and resolves nothing (``${`` -> ``\\${``, with
    the backslashes before it doubled, as OmegaConf's grammar reads them)."""
    return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", text)


def no_interpolation(text: str, source: Any, where: str) -> str:
    """``text`` read from a file, refused when it holds ``${``: OmegaConf (and Hydra's instantiate, which resolves
    twice) would resolve it, reading environment variables or calling resolvers. difflab writes resolved configs."""
    if "${" in text:
        raise _refuse(
            source,
            where,
            f"holds the interpolation {text!r}; difflab writes resolved configs and never "
            f"resolves one read from a file (it could read environment variables): remove "
            f"it from the file",
            hint=False,
        )
    return text


_RESOLVER_CALL = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")


def without_resolvers(data: Any) -> Any:
    """Plain data in which every string that calls a resolver (``${oc.env:...}``, ``${hydra:...}``) is escaped
    (``literal_string``) and node references (``${process}``) are kept: an OmegaConf tree made of it resolves
    references within the file and nothing else. For configs difflab only reads (a sweep's job configs)."""
    if isinstance(data, Mapping):
        return {k: without_resolvers(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [without_resolvers(v) for v in data]
    if isinstance(data, str) and _RESOLVER_CALL.search(data):
        return literal_string(data)
    return data


def check_config(config: Any, source: Any, *, trusted: bool | None = None, where: str = "") -> Any:
    """The gate for a config read from a file: every ``_target_`` is checked (``check_target``) and no string may
    hold an interpolation (``no_interpolation``); returns a plain copy, safe to give to OmegaConf, Hydra or a
    writer."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    trusted = is_trusted(trusted)

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise _refuse(source, path or "the config", f"has a key of type {type(key).__name__}", hint=False)
                child = f"{path}.{key}" if path else str(key)
                if key == "_target_":
                    check_target(value, source, child, trusted)
                out[key] = walk(value, child)
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            return no_interpolation(node, source, path or "the config")
        if node is None or isinstance(node, (bool, int, float)):
            return node
        raise _refuse(source, path or "the config", f"holds a {type(node).__name__}, not config data", hint=False)

    return walk(config, where)


def build_stored(config: Any, source: Any, *, trusted: bool | None = None, where: str = "") -> Any:
    """Instantiate a config read from a file, through the gate (``check_config``)."""
    from omegaconf import OmegaConf

    return instantiate_reporting(OmegaConf.create(check_config(config, source, trusted=trusted, where=where)))


# ---------------------------------------------------------------------------------------------- data and paths
def data_strings(value: Any, source: Any, key: str) -> list[str] | None:
    """``value`` as a list of strings (class names, prompts) or None; anything else (a mapping, a number) refused."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        shown = (
            type(value).__name__
            if not isinstance(value, (list, tuple))
            else next(type(v).__name__ for v in value if not isinstance(v, str))
        )
        raise _refuse(source, key, f"must be a list of strings, found a {shown}", hint=False)
    return [no_interpolation(v, source, f"{key}[{i}]") for i, v in enumerate(value)]


def split_name(name: Any, source: Any, key: str = "splits") -> str:
    """A split name read from a file: one of ``SPLITS`` (it becomes a directory that may be removed)."""
    if name not in SPLITS:
        raise _refuse(
            source, key, f"names the split {name!r}; difflab reads and writes only {', '.join(SPLITS)}", hint=False
        )
    return name


def bare_name(name: Any, source: Any, key: str, pattern: str | None = None) -> str:
    """A file or directory name read from a file: one path component (no separator, not ``.``/``..``), matching
    ``pattern`` (a regex) when given."""
    ok = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if ok and pattern is not None:
        ok = re.fullmatch(pattern, name) is not None
    if not ok:
        want = f"a bare name matching {pattern}" if pattern else "a bare file name inside its own directory"
        raise _refuse(source, key, f"is {name!r}, not {want}", hint=False)
    return name


def child_path(directory: str | Path, name: Any, source: Any, key: str, pattern: str | None = None) -> Path:
    """``directory / name`` for a name read from a file: a bare name (``bare_name``) that is not a symbolic link."""
    path = Path(directory) / bare_name(name, source, key, pattern)
    if path.is_symlink():
        raise _refuse(
            source,
            key,
            f"names {path}, a symbolic link; difflab follows none inside a directory it reads from others",
            hint=False,
        )
    return path


def not_a_link(path: str | Path, hint: str = "remove it or choose another output") -> Path:
    """``path`` for a writer that appends to it or writes inside it, refused when it is a symbolic link (one planted
    in a directory from someone else would send the write elsewhere). Whole-file writes go through
    ``difflab.ops.atomic``, whose rename replaces a link instead of following it."""
    path = Path(path)
    if path.is_symlink():
        raise UntrustedFileError(f"refusing to write {path}: it is a symbolic link (to {path.readlink()}); {hint}")
    return path


# ---------------------------------------------------------------------------------------------- pickles
class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: Callable[[str, str], bool], source: Any):
        super().__init__(file)
        self._allowed, self._source = allowed, source

    def find_class(self, module: str, name: str) -> Any:
        if self._allowed(module, name):
            return super().find_class(module, name)
        raise _refuse(self._source, "its pickle", f"asks for {module}.{name}, which it may not load")


def restricted_load(
    file: IO[bytes], allowed: Callable[[str, str], bool], source: Any, trusted: bool | None = None
) -> Any:
    """``pickle.load`` that imports only the globals ``allowed(module, name)`` accepts (any, when trusted)."""
    if is_trusted(trusted):
        return pickle.load(file)  # noqa: S301 - the user said they trust this file
    return _RestrictedUnpickler(file, allowed, source).load()
