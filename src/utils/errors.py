"""Exceptions with one-line messages that tell the user what went wrong and what to do."""
from typing import Any


class DifflabError(RuntimeError):
    """Base class: a user-facing error whose message is a single actionable line."""


class DataNotFoundError(DifflabError):
    """A dataset is missing: the message names where we looked and how to get it."""


class CorruptDataError(DifflabError):
    """A data file exists but cannot be read: the message names the file."""


class CheckpointError(DifflabError):
    """A checkpoint is missing, corrupt, unsafe or from another architecture."""


class ConfigError(DifflabError):
    """A configuration value is invalid or inconsistent."""


def instantiate_reporting(cfg: Any) -> Any:
    """``instantiate``, except that a user error raised while building (a ``DifflabError``: a patch size that does
    not divide the data's image size) reaches the caller as itself, not wrapped in Hydra's InstantiationException."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, DifflabError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
