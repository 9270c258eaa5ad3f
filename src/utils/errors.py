"""Exceptions with one-line messages that tell the user what went wrong and what to do."""

import errno
import os
from pathlib import Path
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


class UntrustedFileError(DifflabError):
    """A file difflab did not write in this run asks for something a data file may not: code to run (a
    ``_target_`` outside the allowlist, a pickle) or a path outside its own directory."""


class DiskFullError(DifflabError, OSError):
    """The disk (or quota) filled while a file was written: the message names the file; its previous version is
    intact and no temporary file is left. Also an ``OSError`` (errno ENOSPC), so writers of optional caches that
    fall back on an ``OSError`` still do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# how writers that keep only the text of the OS error say it (safetensors' Rust writer: "No space left on device
# (os error 28)"); Python's own OSErrors carry the errno
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in sorted(NO_SPACE_ERRNOS))


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it wraps) says the disk or the quota is full: by its errno, or by the OS error's
    text for writers that keep only that."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(err) for text in _NO_SPACE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(path: str | Path, err: BaseException | None = None) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space (``err``: the error, or one wrapping it)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    why = f" ({err.strerror})" if isinstance(err, OSError) and err.strerror else ""
    return DiskFullError(
        f"no space left on the device while writing {path}{why}: its previous version (if any) is "
        f"intact and nothing partial was kept; free space or write elsewhere, then rerun"
    )


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


USER_ERROR_EXIT = 2  # exit status of a user error (bad input, missing file)


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2 (a user error: bad input, missing file)."""
    import sys

    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
