"""Validate a composed config before a job starts: every user-settable value against the rules of its config group.

A bad value gets one line, ``error: <key>=<value> is invalid: <what is allowed>``, exit status 2, no traceback, and
(for a single run) nothing written: the check runs as a Hydra callback (``ValidateConfig``, registered in
configs/hydra/default.yaml) before Hydra creates the output directory.

The rules live next to the configs they check, in ``configs/<group>/schema.py`` (Hydra lists only ``*.yaml`` as
options, so these never show up as choices), and ``configs/schema.py`` holds the top-level keys of each primary config
(train, sample, export, report, encode_latents). A schema defines

- ``RULES``: ``{key path relative to the group: rule}``, ``*`` matching any key (``"*.every_n_steps"`` for the
  dict-of-configs groups); an exact path wins over a wildcard one. A rule applies only when its key is present in the
  composed config (the options of a group have different keys); null passes only ``optional(...)`` rules;
  ``???`` (a required value nobody gave) fails unless the rule is ``filled_later(...)``;
- ``CHECKS`` (optional): functions of the group's resolved values (a plain dict) for what spans several keys; each
  returns ``(key, what is allowed)`` for a bad key, or None;
- ``PACKAGE`` (optional): the top-level key the group lands in when it is not the group's name (``ops`` -> callbacks).

Where the code already reported a bad value in one line of its own (a missing checkpoint), the rule keeps that line
(``Rule.reported_as``); it now comes before anything is written.

Interpolations are resolved first (``${hydra:...}`` as the job will see them); a value that cannot be resolved yet
(e.g. ``${model.diffusion.sample_shape[0]}``, filled from the datamodule later) is skipped. This module imports no torch or
Lightning, so the callback keeps ``--help`` and ``--cfg`` fast.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from difflab.configs import CONFIG_DIR
from difflab.utils.errors import fail
from difflab.utils.resolve import MISSING, UNRESOLVED, at, echoes, hydra_runtime, plain, shown

Check = Callable[[dict], "tuple[str, str] | None"]


# --------------------------------------------------------------------------------------------------- rules
class Rule:
    """What one key may hold: ``ok(value)`` says whether a (non-null) value passes, ``allowed`` says what passes."""

    def __init__(
        self,
        ok: Callable[[Any], bool],
        allowed: str,
        nullable: bool = False,
        missing_ok: bool = False,
        message: Callable[[str, Any], str] | None = None,
    ):
        self.ok, self.allowed, self.nullable, self.missing_ok = ok, allowed, nullable, missing_ok
        self.message = message

    def problem(self, value: Any) -> str | None:
        """What is allowed, when ``value`` is not; None when it is."""
        if value is MISSING:
            return None if self.missing_ok else f"{self.allowed} (a value is required)"
        if value is None:
            return None if self.nullable else self.allowed
        try:
            return None if self.ok(value) else self.allowed
        except (TypeError, ValueError, OverflowError):
            return self.allowed

    def described_as(self, allowed: str) -> "Rule":
        """The same check with another description (e.g. the meaning of special values)."""
        return Rule(self.ok, allowed, self.nullable, self.missing_ok, self.message)

    def reported_as(self, message: Callable[[str, Any], str]) -> "Rule":
        """The same check, a bad (non-null) value reported by ``message(key, value)`` instead of the usual
        ``<key>=<value> is invalid: <allowed>``: to keep a one-line error the code already gives for it."""
        return Rule(self.ok, self.allowed, self.nullable, self.missing_ok, message)

    def line(self, key: str, value: Any) -> str | None:
        """The error line for ``value`` at ``key``, or None when it passes."""
        allowed = self.problem(value)
        if allowed is None:
            return None
        if self.message is not None and value is not MISSING and value is not None:
            return self.message(key, value)
        return f"{key}={shown(value)} is invalid: {allowed}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _in_range(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))


def number(
    min: float | None = None, max: float | None = None, *, min_open: bool = False, max_open: bool = False
) -> Rule:
    """A finite int or float, optionally bounded (``min_open`` / ``max_open`` exclude the bound)."""
    text = " ".join(filter(None, ["a number", _range_text(min, max, min_open, max_open)]))
    return Rule(lambda v: _is_number(v) and _in_range(v, min, max, min_open, max_open), text)


def positive() -> Rule:
    """A number > 0 (learning rates, scales, frame rates)."""
    return number(min=0, min_open=True)


def non_negative() -> Rule:
    """A number >= 0 (weights, strengths, clip values)."""
    return number(min=0)


def probability(*, max_open: bool = False) -> Rule:
    """A number in [0, 1], or [0, 1) with ``max_open``."""
    return number(min=0, max=1, max_open=max_open)


def integer(min: int | None = None, max: int | None = None) -> Rule:
    """An int (not a bool, not 2.0), optionally bounded (inclusive)."""
    text = " ".join(filter(None, ["an integer", _range_text(min, max, False, False)]))
    return Rule(lambda v: _is_int(v) and _in_range(v, min, max, False, False), text)


def one_of(choices: list | tuple) -> Rule:
    """One of a fixed set of values (compared by equality; bools never match numbers)."""
    choices = list(choices)
    text = "one of " + ", ".join(shown(c) for c in choices)
    return Rule(lambda v: any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in choices), text)


def boolean() -> Rule:
    """true or false."""
    return Rule(lambda v: isinstance(v, bool), "true or false")


def string(nonempty: bool = False) -> Rule:
    """A string (optionally non-empty)."""
    return Rule(
        lambda v: isinstance(v, str) and (bool(v) or not nonempty), "a non-empty string" if nonempty else "a string"
    )


def matches(pattern: str, allowed: str) -> Rule:
    """A string matching ``pattern`` entirely."""
    regex = re.compile(pattern)
    return Rule(lambda v: isinstance(v, str) and regex.fullmatch(v) is not None, allowed)


def mapping(values: Rule | None = None) -> Rule:
    """A mapping (e.g. a ``_target_`` config), each value passing ``values`` if given."""
    text = "a mapping" + (f" of values each {values.allowed}" if values else "")
    return Rule(
        lambda v: isinstance(v, dict) and (values is None or all(values.problem(x) is None for x in v.values())), text
    )


def optional(rule: Rule) -> Rule:
    """``rule`` or null."""
    return Rule(rule.ok, f"{rule.allowed} or null", nullable=True, missing_ok=rule.missing_ok, message=rule.message)


def filled_later(rule: Rule) -> Rule:
    """``rule``, but ``???`` passes: the pipeline fills the value in (e.g. from the datamodule)."""
    return Rule(rule.ok, rule.allowed, nullable=rule.nullable, missing_ok=True, message=rule.message)


def any_of(*rules: Rule) -> Rule:
    """A value passing at least one of ``rules``."""
    text = (
        rules[0].allowed if len(rules) == 1 else ", ".join(r.allowed for r in rules[:-1]) + f" or {rules[-1].allowed}"
    )
    return Rule(lambda v: any(r.problem(v) is None for r in rules), text)


def list_of(item: Rule, min_len: int = 0, length: int | None = None) -> Rule:
    """A list whose items each pass ``item`` (with a minimum or exact length)."""
    size = f"{length} " if length is not None else ("non-empty " if min_len == 1 else "")
    text = f"a {size}list of items each {item.allowed}"
    if min_len > 1:
        text += f" (at least {min_len})"
    return Rule(
        lambda v: (
            isinstance(v, list)
            and len(v) >= min_len
            and (length is None or len(v) == length)
            and all(item.problem(x) is None for x in v)
        ),
        text,
    )


# ---- paths: an output location must not be a file (mkdir would fail after Hydra has started writing)
def _blocked_by_file(path: Path) -> bool:
    """True when ``path`` or one of its ancestors is an existing non-directory."""
    for p in (path, *path.parents):
        if p.exists():
            return not p.is_dir()
    return False


def directory_path() -> Rule:
    """An output directory: a path that is not an existing file (nor inside one); it may not exist yet."""
    return Rule(
        lambda v: isinstance(v, str) and bool(v) and not _blocked_by_file(Path(v).expanduser()),
        "a directory path, not an existing file",
    )


not_existing_file = directory_path


def existing_file() -> Rule:
    """An input file that exists."""
    return Rule(lambda v: isinstance(v, str) and Path(v).expanduser().is_file(), "an existing file")


def existing_path() -> Rule:
    """An input file or directory that exists."""
    return Rule(lambda v: isinstance(v, str) and Path(v).expanduser().exists(), "an existing file or directory")


# ---- shared domain rules
def device() -> Rule:
    """A torch device for sampling / encoding: auto (cuda if available), cpu, cuda, cuda:N or mps."""
    return matches(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")


def duration() -> Rule:
    """A wall-clock duration ``DD:HH:MM:SS`` (Lightning's max_time / time-based val_check_interval)."""
    return matches(r"\d+:\d+:\d+:\d+", "a duration DD:HH:MM:SS")


def adam_betas() -> Rule:
    """Adam's (beta1, beta2): two numbers in [0, 1) (torch.optim.Adam / AdamW refuse others)."""
    return Rule(
        lambda v: (
            isinstance(v, list)
            and len(v) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)
        ),
        "a list of two numbers in [0, 1), e.g. [0.9, 0.999]",
    )


def sigma_interval() -> Rule:
    """A guidance interval [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (null entries: 0 / infinity)."""

    def ok(v) -> bool:
        if not isinstance(v, list) or len(v) != 2 or not all(x is None or _is_number(x) for x in v):
            return False
        lo = 0.0 if v[0] is None else v[0]
        hi = math.inf if v[1] is None else v[1]
        return 0 <= lo < hi

    return Rule(ok, "a list [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (null entries: 0 / infinity)")


_POSIX_SIGNALS = {
    "HUP",
    "INT",
    "QUIT",
    "ILL",
    "TRAP",
    "ABRT",
    "BUS",
    "FPE",
    "KILL",
    "USR1",
    "SEGV",
    "USR2",
    "PIPE",
    "ALRM",
    "TERM",
    "CHLD",
    "CONT",
    "STOP",
    "TSTP",
    "TTIN",
    "TTOU",
    "URG",
    "XCPU",
    "XFSZ",
    "VTALRM",
    "PROF",
    "WINCH",
    "IO",
    "PWR",
    "SYS",
}


def signal_name() -> Rule:
    """A signal by name (SIGTERM or TERM) or number; POSIX names pass on every platform (unknown ones are skipped
    there at run time)."""

    def ok(v) -> bool:
        if _is_int(v):
            return v > 0
        name = str(v).upper() if isinstance(v, str) else ""
        name = name[3:] if name.startswith("SIG") else name
        return name in _POSIX_SIGNALS or hasattr(signal, f"SIG{name}")

    return Rule(ok, "a signal name such as SIGTERM or SIGUSR2")


# --------------------------------------------------------------------------------------------------- schemas
def _load(path: Path):
    name = "difflab_schema_" + "_".join(path.relative_to(CONFIG_DIR).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def group_schemas() -> dict[str, tuple[list[tuple[str, Rule]], list[Check]]]:
    """``{top-level key: (rules, checks)}`` from every ``configs/<group>/schema.py``, loaded by path."""
    out: dict[str, tuple[list, list]] = {}
    for path in sorted(CONFIG_DIR.glob("*/schema.py")):
        module = _load(path)
        rules, checks = out.setdefault(getattr(module, "PACKAGE", path.parent.name), ([], []))
        rules += list(getattr(module, "RULES", {}).items())
        checks += list(getattr(module, "CHECKS", []))
    return out


@functools.lru_cache(maxsize=None)
def primary_schemas() -> tuple[dict[str, dict[str, Rule]], dict[str, list[Check]]]:
    """The top-level rules and checks of each primary config, from ``configs/schema.py``."""
    module = _load(CONFIG_DIR / "schema.py")
    return getattr(module, "RULES", {}), getattr(module, "CHECKS", {})


# --------------------------------------------------------------------------------------------------- checking
def _known(tree: Any) -> Any:
    """``tree`` without MISSING / UNRESOLVED entries (for CHECKS, which then just use ``.get``)."""
    if isinstance(tree, dict):
        out = {k: _known(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not MISSING and v is not UNRESOLVED}
    if isinstance(tree, list) and any(v is MISSING or v is UNRESOLVED for v in tree):
        return UNRESOLVED
    return tree


def _expand(tree: Any, parts: list[str], prefix: tuple = ()) -> Iterator[tuple]:
    """Concrete key paths of ``tree`` matching ``parts`` (``*`` matches any key)."""
    if not isinstance(tree, dict):
        return
    keys = list(tree) if parts[0] == "*" else [parts[0]] if parts[0] in tree else []
    for key in keys:
        if len(parts) == 1:
            yield (*prefix, key)
        else:
            yield from _expand(tree[key], parts[1:], (*prefix, key))


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _check_tree(tree: Any, rules: list[tuple[str, Rule]], checks: list[Check], prefix: str) -> list[tuple[str, str]]:
    """``(key, error line)`` for each problem of one group (or of the top level, ``prefix`` empty)."""
    chosen: dict[tuple, tuple[int, Rule]] = {}
    for pattern, rule in rules:
        stars = pattern.split(".").count("*")
        for path in _expand(tree, pattern.split(".")):
            if path not in chosen or stars <= chosen[path][0]:
                chosen[path] = (stars, rule)
    problems = []
    for path, (_, rule) in chosen.items():
        value = _get(tree, path)
        key = prefix + ".".join(map(str, path))
        line = None if value is UNRESOLVED else rule.line(key, value)
        if line is not None:
            problems.append((key, line))
    known = _known(tree)
    for check in checks:
        found = check(known) if isinstance(known, dict) else None
        if found is not None:
            key, allowed = found
            try:
                value = _get(known, tuple(key.split(".")))
            except (KeyError, TypeError):
                value = None
            problems.append((prefix + key, f"{prefix}{key}={shown(value)} is invalid: {allowed}"))
    return problems


def find_problems(cfg: DictConfig, primary: str | None) -> list[tuple[str, str]]:
    """``(key, error line)`` for every problem of a composed config, values set directly before those derived from
    them by interpolation (paths.log_dir=<a file> before the checkpoint and logger directories under it), so that the
    first line names what the user typed."""
    with hydra_runtime(cfg) as resolved:
        tree = plain(resolved)
    tree.pop("hydra", None)
    rules, checks = primary_schemas()
    problems = _check_tree(tree, list(rules.get(primary, {}).items()), list(checks.get(primary, [])), "")
    schemas = group_schemas()
    own = {name.split(".")[0] for name in rules.get(primary, {})}  # keys the primary config defines itself
    for key, value in tree.items():
        if key in schemas and key not in own:
            problems += _check_tree(value, *schemas[key], prefix=f"{key}.")
    if not problems:  # each value is allowed on its own: now the rules the pieces' constructors state
        problems += constructor_problems(tree)
    derived = interpolated_keys(cfg)
    return sorted(_without_echoes(cfg, problems, derived), key=lambda problem: problem[0] in derived)


def _without_echoes(cfg: DictConfig, problems: list[tuple[str, str]], derived: set[str]) -> list[tuple[str, str]]:
    """Drop the problems of keys that are nothing but another bad key (``${key}``, ``${oc.select:key,...}`` or a
    resolver whose first argument it is, ``${round_gcd:${key}}``, ``${round_total:${key},${other}}``):
    method.steps_per_round=0 also makes lr_schedule.period and trainer.val_check_interval 0, one mistake, one line.
    Values built from a bad key (``${paths.log_dir}/checkpoints``) keep their own line, after it."""
    bad = {key for key, _ in problems}
    raw = OmegaConf.to_container(cfg, resolve=False)
    return [
        (key, line) for key, line in problems if key not in derived or not any(echoes(at(raw, key), b) for b in bad)
    ]


BUILT_PARTS = ("process", "objective", "sampler", "guidance")  # model.diffusion pieces that build in microseconds


def _complete(node: Any) -> bool:
    """No value of ``node`` is missing or unresolvable yet (those are reported, or filled in later)."""
    if isinstance(node, dict):
        return all(_complete(v) for v in node.values())
    if isinstance(node, list):
        return all(_complete(v) for v in node)
    return node is not MISSING and node is not UNRESOLVED


def _first_line(err: BaseException) -> str:
    """The user's message of an error raised while Hydra built an object (Hydra wraps it in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def constructor_problems(tree: dict) -> list[tuple[str, str]]:
    """The rules the diffusion pieces' constructors own (a process's, an objective's, a sampler's or a guidance's
    settings, and their pairing in ``Diffusion``: ddpm needs vp, churn needs a continuous process, CFG++'s lambda,
    autoguidance's guide), checked by building those pieces, which needs no network, encoder or file. Each rule is
    stated once, in the code, and still refused before anything is written."""
    diffusion = (tree.get("model") or {}).get("diffusion") if isinstance(tree.get("model"), dict) else None
    if not isinstance(diffusion, dict):
        return []
    from hydra.utils import instantiate

    from difflab.diffusion.system import Diffusion

    built = {}
    for name in BUILT_PARTS:
        node = diffusion.get(name)
        if isinstance(node, dict) and "_target_" in node and _complete(node):
            try:
                built[name] = instantiate(node)
            except Exception as err:  # noqa: BLE001 - any refusal of the constructor is the user's line
                return [(name, _first_line(err))]
    if {"process", "objective", "sampler"} <= set(built):
        try:
            Diffusion.check_pairing(built["process"], built["objective"], built["sampler"])
        except Exception as err:  # noqa: BLE001
            return [("sampler", _first_line(err))]
    return _method_problems(tree["model"].get("method"), built)


def _method_problems(node: Any, built: dict) -> list[tuple[str, str]]:
    """A training method's own rules (its constructor, and ``check(process, sampler)`` where it has one)."""
    if not (isinstance(node, dict) and "_target_" in node and _complete(node)):
        return []
    from hydra.utils import instantiate

    try:
        method = instantiate(node)
        if hasattr(method, "check") and {"process", "sampler"} <= set(built):
            method.check(built["process"], built["sampler"])
    except Exception as err:  # noqa: BLE001 - the constructor's or check's refusal is the user's line
        return [("method", _first_line(err))]
    return []


def check_config(cfg: DictConfig, primary: str | None) -> list[str]:
    """Every problem of a composed config, one line each: ``<key>=<value> is invalid: <what is allowed>``.

    ``primary`` names the primary config (train, sample, ...) whose top-level table applies; the group schemas apply to
    each top-level key that has one. Works on configs with a ``hydra`` node (the callback, tests composing with
    ``return_hydra_config=True``) and without one (``difflab.pipeline`` after ``compose_train``)."""
    return [line for _, line in find_problems(cfg, primary)]


def interpolated_keys(node: Any, prefix: str = "") -> set[str]:
    """Dotted keys of ``node`` whose values are interpolations (``${...}``)."""
    out: set[str] = set()
    if isinstance(node, DictConfig) and not node._is_none():
        for key in node.keys():
            full = f"{prefix}{key}"
            if OmegaConf.is_interpolation(node, key):
                out.add(full)
            elif not OmegaConf.is_missing(node, key):
                child = node._get_node(key)
                if isinstance(child, DictConfig):
                    out |= interpolated_keys(child, f"{full}.")
    return out


def ensure_valid(cfg: DictConfig, primary: str | None) -> None:
    """Raise ``ConfigError`` with the first problem of ``cfg`` (for in-process callers such as the pipeline)."""
    from difflab.utils.errors import ConfigError

    problems = check_config(cfg, primary)
    if problems:
        raise ConfigError(problems[0])


def validate_or_exit(cfg: DictConfig, primary: str | None, ignore: tuple[str, ...] = ()) -> None:
    """Print the first problem as ``error: ...`` on stderr and exit with status 2; return when there is none.

    ``ignore``: keys (and everything below them) left unchecked, e.g. the swept keys of a multirun's base config."""

    for key, line in find_problems(cfg, primary):
        if not any(key == k or key.startswith(f"{k}.") for k in ignore):
            fail(line)


__all__ = [
    "Rule",
    "interpolated_keys",
    "number",
    "positive",
    "non_negative",
    "probability",
    "integer",
    "one_of",
    "boolean",
    "string",
    "matches",
    "mapping",
    "optional",
    "filled_later",
    "any_of",
    "list_of",
    "directory_path",
    "not_existing_file",
    "existing_file",
    "existing_path",
    "device",
    "duration",
    "sigma_interval",
    "signal_name",
    "find_problems",
    "check_config",
    "ensure_valid",
    "validate_or_exit",
    "adam_betas",
    "constructor_problems",
]
