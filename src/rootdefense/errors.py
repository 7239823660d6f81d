"""Every failure a user can cause has its own error type with a message that names the fix.

The CLI turns any :class:`RootDefenseError` into a one-line message and exit status 2.
"""


class RootDefenseError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class ModelError(RootDefenseError):
    """Unknown model, missing package, missing chat template, prompt too long."""


class ProbeError(RootDefenseError):
    """A probe file is missing, corrupt, or made for another model."""


class InputError(RootDefenseError):
    """Bad user input: empty prompt, malformed JSONL, out-of-range option."""


class DataError(RootDefenseError):
    """A dataset package is missing or its files are not where expected."""


class ExpertError(RootDefenseError):
    """A safety-expert adapter is missing, corrupt, or made for another model."""


class JudgeError(RootDefenseError):
    """A judge's files are missing, corrupt or inconsistent, or its back end failed."""
