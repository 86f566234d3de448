"""One line when a trial starts and one when it ends: what a search prints for a person.

``trial 3239a8b4 started: lr=0.00035, temperature=0.0401, weight_decay=0.215``
``trial 3239a8b4 stopped early by the scheduler at epoch 2: id_val/acc 0.553 (best, epoch 2)``

The end line says how the trial ended: ``completed``, ``stopped early by the scheduler at epoch
N`` (by the scheduler or the budget, where the search has one), ``failed after N epoch(s): <the
cause in one line>``, or ``diverged at epoch N``; with the best value of each search objective
over the trial's epochs and the epoch it came from. They replace Tune's status tables, which
``--verbose`` brings back.

A Tune callback that raises aborts the whole ``Tuner.fit()``: every hook here catches what goes
wrong in it and logs it at DEBUG.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import ray.cloudpickle
import ray.tune

from flyp_ray.config import Config, objectives, planned_epochs
from flyp_ray.errors import FlypRayError, first_line, worker_failure
from flyp_ray.search.tune_row import kept_epochs

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., None])


def never_raises(hook: F) -> F:
    """A callback hook that logs its own failure instead of aborting the search."""

    @functools.wraps(hook)
    def safe(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - see the module's docstring
            log.debug("trial line not written (%s: %s)", type(err).__name__, err)

    return safe  # type: ignore[return-value]


def number(value: Any) -> str:
    """A sampled value as a person reads it: floats with three significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def started(trial_id: str, params: Mapping[str, Any]) -> str:
    """The start line: the trial's id and its sampled config."""
    sampled = ", ".join(f"{k}={number(v)}" for k, v in sorted(params.items()))
    return f"trial {trial_id} started: {sampled or 'the config as it is'}"


def cause(error: BaseException | None) -> str:
    """What stopped a failed trial, in one line: the innermost error that Ray wrapped."""
    if error is None:
        return "no error recorded"
    inner = error
    while isinstance(getattr(inner, "cause", None), BaseException):
        inner = inner.cause  # type: ignore[attr-defined]  # Ray's RayTaskError
    inner = worker_failure(inner) or inner
    # The package's own errors are written as a whole line; others need their kind named.
    return first_line(inner) if isinstance(inner, FlypRayError) else \
        f"{type(inner).__name__}: {first_line(inner)}"


class TrialLines(ray.tune.Callback):
    """Logs the start and the end of every trial of a search (``flyp_ray`` logger, INFO)."""

    def __init__(self, cfg: Config, trials_storage: str | None = None) -> None:
        self.cfg, self.trials_storage = cfg, trials_storage
        metrics, modes = objectives(cfg.search)
        self.objectives = dict(zip(metrics, modes, strict=True))
        self.planned = planned_epochs(cfg.train)
        self.budget = cfg.search.budget is not None
        self.best: dict[str, dict[str, tuple[float, int]]] = {}  # trial -> metric -> (v, epoch)
        self.epochs: dict[str, int] = {}

    @never_raises
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        log.info("%s", started(trial.trial_id, trial.config))
        if self.trials_storage is not None and trial.trial_id not in self.epochs:
            # restarted by a resumed search: Tune reports only the epochs from here on
            for row in kept_epochs(self.cfg, self.trials_storage, trial.trial_id):
                self._note(trial.trial_id, row)

    @never_raises
    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        self._note(trial.trial_id, result)

    @never_raises
    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        last = trial.last_result or {}
        self._note(trial.trial_id, last)
        epochs = self.epochs.get(trial.trial_id, 0)
        if last.get("diverged"):
            how = f"diverged at epoch {epochs}"
        elif epochs >= self.planned:
            how = "completed"
        else:
            by = "the scheduler or the budget" if self.budget else "the scheduler"
            how = f"stopped early by {by} at epoch {epochs}"
        log.info("trial %s %s: %s", trial.trial_id, how, self.values(trial.trial_id))

    @never_raises
    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        self._note(trial.trial_id, trial.last_result or {})
        epochs = self.epochs.get(trial.trial_id, 0)
        done = f"after {epochs} epoch{'s' if epochs != 1 else ''}"
        log.info("trial %s failed %s: %s", trial.trial_id, done, cause(_error(trial)))

    def _note(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """Keep the trial's epochs and the best value of each objective with its epoch."""
        if "epoch" not in result:
            return
        epoch = int(result["epoch"])
        self.epochs[trial_id] = max(epoch, self.epochs.get(trial_id, 0))
        best = self.best.setdefault(trial_id, {})
        for metric, mode in self.objectives.items():
            value = result.get(metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if result.get("diverged"):
                continue  # the worst value a diverged epoch reports is no measurement
            held = best.get(metric)
            # of equal values the later epoch, as everywhere (config.last_best)
            if held is None or (value >= held[0] if mode == "max" else value <= held[0]):
                best[metric] = (float(value), epoch)

    def values(self, trial_id: str) -> str:
        """``id_val/acc 0.553 (best, epoch 2)`` for each objective; what it has of them."""
        best = self.best.get(trial_id, {})
        shown = [f"{m} {best[m][0]:.3f} (best, epoch {best[m][1]})" for m in self.objectives
                 if m in best]
        return ", ".join(shown) or f"no {', '.join(self.objectives)} reported"


def _error(trial: Any) -> BaseException | None:
    """The trial's error as Tune wrote it just before calling back: the pickled exception in
    the trial's local folder (its copy in storage comes with the next sync), else its text."""
    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and Path(pickled).is_file():
        error = ray.cloudpickle.loads(Path(pickled).read_bytes())
        if isinstance(error, BaseException):
            return error
    if text and Path(text).is_file():
        lines = [line for line in Path(text).read_text().splitlines() if line.strip()]
        return RuntimeError(lines[-1]) if lines else None
    return None
