"""Every command documented in README.md, docs/*.md and the comments of configs/ and docs/examples/, collected for
tests/test_docs_commands.py.

What counts as a command: a line of a fenced code block, an inline code span, or a config comment, that starts with
``python <entry>.py`` or ``difflab-<command>`` (an environment assignment such as ``OMP_NUM_THREADS=2`` may come
first). A line ending in ``\\`` continues on the next one. Text after `` #`` is a comment; a trailing ``(or ...)``
is prose. ``[x=1]`` marks optional overrides: they are kept (and checked too). In a table, a bare command name
(``difflab-sample``), like any bare name of a command that needs arguments, names the command and is not run.

Placeholders (the convention the docs follow): ``<...>`` is a value the user fills in, such as ``<run>`` (a run
directory), ``<dir>``, ``<sweep>`` or ``<How2Sign root>`` (spaces allowed). The test fills each by the key it stands in: checkpoints for ``ckpt_path`` and
friends, a run directory for ``run_dir`` and paths under ``<run>``, fresh directories for outputs, a latent cache for
``cache_dir``, a sweep for ``ablate.py``. ``...`` is not a placeholder: documented commands are complete.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ENTRIES = ("train", "sample", "export", "report", "encode_latents", "reconstruct_ema", "prepare_clips", "ablate")
CONSOLE = {f"difflab-{e.replace('_', '-')}": e for e in ENTRIES}
_ANYWHERE = re.compile(r"(?:[A-Z_]+=\S+\s+)*(?:python\s+(?:" + "|".join(ENTRIES) + r")\.py|difflab-[a-z-]+)(?=\s|$).*")
_START = re.compile(
    r"^(?:[A-Z_]+=\S+\s+)*(python\s+("
    + "|".join(ENTRIES)
    + r")\.py|("
    + "|".join(re.escape(c) for c in CONSOLE)
    + r"))(?=\s|$)"
)


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written and its arguments (after the entry point)."""

    source: str  # file:line
    entry: str  # train, sample, ...
    text: str  # as written (continuations joined, comment dropped)
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def _strip_comment(line: str) -> str:
    """``line`` without a trailing `` # comment`` (outside quotes) and a trailing ``(or ...)`` remark."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            line = line[:i]
            break
    return re.sub(r"\s{2,}\(.*\)\s*$", "", line).rstrip()


def _candidate_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every place a command may be written in one file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[tuple[int, str]] = []
    in_code = False
    i = 0
    while i < len(lines):
        raw = lines[i]
        number = i + 1
        if path.suffix == ".md" and raw.strip().startswith("```"):
            in_code = not in_code
            i += 1
            continue
        text = raw
        if path.suffix in (".yaml", ".yml"):
            if "#" not in raw:
                i += 1
                continue
            text = raw[raw.index("#") + 1 :].strip()
        while text.rstrip().endswith("\\") and i + 1 < len(lines):  # a continued command
            i += 1
            nxt = lines[i]
            nxt = nxt[nxt.index("#") + 1 :] if path.suffix in (".yaml", ".yml") and "#" in nxt else nxt
            text = text.rstrip()[:-1] + " " + nxt.strip()
        if path.suffix == ".md" and in_code:
            out.append((number, text.strip()))
        else:
            spans = re.findall(r"`([^`]+)`", text)
            if text.lstrip().startswith("|"):  # a table names commands: only spans with arguments are commands
                spans = [sp for sp in spans if len(sp.split()) > (1 if sp.startswith("difflab-") else 2)]
            out += [(number, span) for span in spans]
            if path.suffix in (".yaml", ".yml"):
                bare = _ANYWHERE.search(text)  # a comment writes commands without backticks too
                if bare:
                    out.append((number, bare.group(0).split(";")[0].split("`")[0]))
        i += 1
    return out


def commands_in(path: Path, root: Path) -> list[Command]:
    """The documented commands of one file."""
    found: dict[str, Command] = {}
    for number, text in _candidate_lines(path):
        text = _strip_comment(text.strip())
        match = _START.match(text)
        if not match:
            continue
        entry = match.group(2) or CONSOLE[match.group(3)]
        rest = re.sub(r"<[^<>]*>", lambda m: m.group(0).replace(" ", "_"), text[match.end() :])  # <How2Sign root>
        try:
            argv = tuple(shlex.split(rest))
        except ValueError:
            argv = tuple(rest.split())
        if not argv and entry != "train":  # a bare name in prose names the command (it needs arguments)
            continue
        cmd = Command(f"{path.relative_to(root)}:{number}", entry, text, argv)
        found.setdefault(f"{cmd.entry} {' '.join(argv)}", cmd)
    return list(found.values())


def documented_commands(root: Path) -> list[Command]:
    """Every documented command of the repository, once per distinct command line (first place it is written)."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "configs").rglob("*.yaml"))]
    files += sorted((root / "docs" / "examples").rglob("*.yaml"))  # a fork's configs, e.g. docs/examples/extending
    seen: dict[str, Command] = {}
    for path in files:
        for cmd in commands_in(path, root):
            seen.setdefault(f"{cmd.entry} {' '.join(cmd.argv)}", cmd)
    return list(seen.values())
