"""What a command's processes print: a person's lines by default, every library's with --verbose.

By default a command prints what its user acts on: the package's own ``flyp_ray`` loggers at
INFO (trial start and end, progress, re-checks, the registry, the final table). The libraries'
own lines are switched off where they come from, by each library's own switch, in every process
of the command:

- Ray: the driver's ``ray`` logger at ERROR (its token-auth notice and start-up lines), Ray
  Train's ``ray.train`` console lines at WARNING (``RunConfig.logging_config``: the per-epoch
  ``Reporting training result ... TrainingReport(...)`` dumps, the worker-group lines), and no
  log deduplication (it merged the progress lines of concurrent trials, which differ only in
  their numbers, into one "[repeated 2x across cluster]" line after a delay);
- Tune: its legacy output engine at ``verbose=0``, which prints nothing (the new engine prints
  a heading, a TensorBoard hint and a status table every 30 s whatever its verbosity), and no
  traceback of a failed trial (its trial line names the cause; its error.txt keeps the rest);
- MLflow: no artifact progress bars, its logger at WARNING, and in the command's own process
  its event stream off (``Successfully registered model ...``: the registry line says it);
- open_clip (and every other library that logs on the root logger): the root logger at ERROR,
  in the driver and in Ray Train workers (open_clip logs each model build there at INFO).

``--verbose``, or ``FLYP_RAY_VERBOSE=1`` in the environment, leaves all of them as the libraries
set them. The variable reaches every Ray process of the command (the runtime_env of its Ray job)
and jobs sent with ``flyp-ray submit``. Ray's session logs (``/tmp/ray/session_*/logs``) keep
every process's output and Ray Train's own log files every level either way.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENV = "FLYP_RAY_VERBOSE"

# The libraries' switches that are environment variables. Set in the command's process before
# Ray or MLflow is imported (a user's own setting wins) and passed to every Ray process of its
# job; the worker processes of a local cluster inherit them as well.
QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "RAY_DEDUP_LOGS": "0",  # read when ray is imported
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's legacy output engine: silent at verbose=0
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # a failed trial's traceback (its line says the cause)
}

PLAIN_FORMAT = "%(asctime)s %(message)s"
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def enabled() -> bool:
    """Whether this command (or the command whose Ray process this is) runs verbose."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def env() -> dict[str, str]:
    """The variables that carry the choice to a Ray job's processes (its runtime_env)."""
    if enabled():
        return {ENV: "1"}
    return {**QUIET_ENV, **{k: os.environ[k] for k in QUIET_ENV if k in os.environ}}


class PlainFormatter(logging.Formatter):
    """``12:03:41 message`` (or ``fmt``), with ``warning:``/``error:`` before what is not plain
    progress."""

    def __init__(self, fmt: str = PLAIN_FORMAT) -> None:
        super().__init__(fmt, datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        if record.levelno >= logging.WARNING:
            record.message = f"{record.levelname.lower()}: {record.message}"
        return super().formatMessage(record)


def configure(verbose: bool = False) -> None:
    """Set up the command's own process: logging on stderr and the libraries' switches.

    ``verbose`` (``--verbose``) also sets ``FLYP_RAY_VERBOSE=1``, so that Ray processes started
    from here see it.
    """
    if verbose:
        os.environ[ENV] = "1"
    loud = enabled()
    if not loud:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
    if not sys.stderr.isatty():
        # Ray colours the prefix of the lines it forwards from its processes; in a file or a
        # CI log the colour codes are noise.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(VERBOSE_FORMAT) if loud else PlainFormatter())
    # basicConfig leaves a root logger that already has handlers (an application embedding the
    # command, pytest's capture) as it is.
    logging.basicConfig(level=logging.INFO if loud else logging.ERROR, handlers=[handler])
    logging.getLogger("flyp_ray").setLevel(logging.DEBUG if loud else logging.INFO)
    if not loud:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # if MLflow is already imported


def quiet_libraries() -> None:
    """The switches that need their library imported; called once Ray is, before ray.init.

    Ray's ``ray`` logger has a handler of its own (set up when ray is imported): at ERROR, its
    notices at start (token authentication, dashboard) stay in the session logs. Tune's
    warnings stay (a search that waits for resources says so). MLflow's event stream (its
    logger's handler and ``eprint``) goes off in this process.
    """
    if enabled():
        return
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    quiet_repeated_steps()
    quiet_population()
    from mlflow.utils.logging_utils import disable_logging

    disable_logging()


def quiet_repeated_steps() -> None:
    """Silence Optuna's warning that a trial reported a step it has already.

    A resumed trial reports its epochs from the start again, and Tune's Optuna searcher hands
    each to Optuna, which warns, two lines per trial and epoch; it keeps the first value, which
    is the same epoch's.
    """
    warnings.filterwarnings("ignore", category=UserWarning,
                            message="The reported value is ignored because this `step=")


def quiet_population() -> None:
    """Silence Tune's advice, at every PBT search, to reuse trial actors: a member's trial
    drives a Train run of its own, and a continued member starts a new one whatever the actor."""
    warnings.filterwarnings("ignore", category=UserWarning,
                            message="Consider boosting PBT performance by enabling `reuse_actors`")


# Where Ray Train logs a training function's traceback (ray/train/v2/_internal/util.py).
TRAIN_FN_ERRORS = "ray.train.v2._internal.util"
OWNER_DIED = "The actor is dead because its owner has died"


def quiet_ray_notices() -> None:
    """In a Ray process of the job: Ray Train's and Tune's notices (in a trial's process: a
    Train run's snapshot found, a Tune checkpoint made or restored, each at every PBT decision
    and resumed trial) stay out unless verbose; their warnings stay."""
    if not enabled():
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        train_errors = logging.getLogger(TRAIN_FN_ERRORS)
        if not any(isinstance(f, StoppedRunTraceback) for f in train_errors.filters):
            train_errors.addFilter(StoppedRunTraceback())


class StoppedRunTraceback(logging.Filter):
    """Drops the traceback of a Train worker whose run was torn down under it.

    When Tune stops a trial (a scheduler's stop, a PBT decision), the trial's process dies, and
    with it the Train run's controller and the actors it owns. A worker still training then
    fails at its next report, which waits on the run's synchronisation actor, and Ray Train
    logs some thirty lines of traceback for a run that nobody runs any more. Any other error's
    traceback stays.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return OWNER_DIED not in record.getMessage()


def train_log_level() -> str:
    """The level of Ray Train's ``ray.train`` console lines (``ray.train.LoggingConfig``)."""
    return "INFO" if enabled() else "WARNING"


def tune_verbose() -> int | None:
    """Tune's ``RunConfig(verbose=...)``: 0 prints nothing; None keeps Tune's default."""
    return None if enabled() else 0


def ray_process(run_name: str) -> None:
    """Logging in a Ray process that trains (a Ray Train worker) or drives runs (a Ray task).

    Ray Train sets the root logger of its workers to INFO, where open_clip logs every model
    build: back to ERROR unless verbose. The package's lines go to stderr (which Ray forwards to
    the driver, and keeps in the session logs) with ``run_name`` first, so that a person can
    tell whose progress a line is.
    """
    loud = enabled()
    if not loud:
        logging.getLogger().setLevel(logging.ERROR)
    ours = logging.getLogger("flyp_ray")
    ours.setLevel(logging.DEBUG if loud else logging.INFO)
    for old in [h for h in ours.handlers if getattr(h, "flyp_ray", False)]:
        ours.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PlainFormatter(f"{run_name}: %(message)s" if run_name
                                        else "%(message)s"))
    handler.flyp_ray = True  # type: ignore[attr-defined]
    ours.addHandler(handler)
    ours.propagate = False
