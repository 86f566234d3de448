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


def worker_failure(err: BaseException) -> BaseException | None:
    """The lowest rank's own error inside Ray Train's ``WorkerGroupError``, else None.

    A corrupt image (``DataError``) or a checkpoint that cannot be written (``OSError`` naming
    the path) reaches the driver wrapped in Ray's error, whose message is a traceback.
    """
    failures = getattr(err, "worker_failures", None)  # ray.train.WorkerGroupError's field
    if not isinstance(failures, dict) or not failures:
        return None
    return failures[min(failures)]


def input_error(err: BaseException) -> BadInput | None:
    """The user's own bad input that ``err`` stems from, where Ray wrapped one; else None.

    Ray wraps what a trial or a training worker raised: a Tune trial's error is a
    ``RayTaskError`` whose ``cause`` is Ray Train's ``WorkerGroupError``, whose
    ``worker_failures`` hold each worker's own exception.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BadInput):
            return current
        inner = (getattr(current, "cause", None), current.__cause__, worker_failure(current))
        pending.extend(e for e in inner if isinstance(e, BaseException))
    return None


def first_line(err: BaseException, limit: int = 300) -> str:
    """What went wrong in one line: a training worker's own error where Ray wraps one.

    An error raised in a DataLoader process arrives as ``Caught X in DataLoader worker process
    N.`` followed by its traceback: its own message is the traceback's last line.
    """
    cause = worker_failure(err) or err
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    if not lines:
        return type(cause).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:
        last = lines[-1].strip()
        kind = type(cause).__name__
        return last.split(f"{kind}: ", 1)[-1][:limit]
    return lines[0][:limit]
