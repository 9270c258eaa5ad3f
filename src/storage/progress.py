"""A progress bar for long writes, or nothing."""

from __future__ import annotations

from contextlib import nullcontext


def progress_bar(enabled: bool, verb: str = "encoding"):
    """A rich progress context (one task per split, labelled ``<verb> <split>``) or a null context when disabled."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(verb + " {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
