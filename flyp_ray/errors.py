"""One exception family for the whole package.

The CLI turns a :class:`BadInput` into exit code 2 and a single line on stderr; every other
:class:`FlypRayError` becomes exit code 1. Nothing user-facing is checked with ``assert``.
"""

from __future__ import annotations


class FlypRayError(Exception):
    """Base class of every error the package raises on purpose."""

    exit_code = 1


class BadInput(FlypRayError):
    """A config file, path, model spec or argument the user gave is wrong (exit code 2)."""

    exit_code = 2


class ConfigError(BadInput):
    """A config value is missing, unknown, of the wrong type or out of range.

    The message always names the file, the dotted key and the offending value, so that one line
    on stderr is enough to fix it.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        location = f"{source}: {key}" if key else source
        super().__init__(f"{location}: {problem}")


class DataError(BadInput):
    """A data set is missing, incomplete or not in the layout its loader needs."""


class ModelError(BadInput):
    """An architecture or checkpoint cannot be found or does not fit."""


class TrialDiverged(FlypRayError):
    """The training loss became NaN or infinite."""
