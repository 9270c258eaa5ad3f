"""What a model is conditioned on, asked the same way by callbacks and evaluators."""

from __future__ import annotations


def condition_key(module) -> str | None:
    """The batch key the module's conditioner reads (``label``, ``text`` or None)."""
    return getattr(module.conditioner, "batch_key", None)
