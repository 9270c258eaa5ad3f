"""Exceptions with one-line messages that tell the user what went wrong and what to do."""


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
