"""Budgets: a search stops starting trials once it has spent ``search.budget.worker_hours``.

What a trial spends is its running time (Tune's ``time_total_s``) times its rate: the GPUs of its
worker group when workers have GPUs (GPU-hours), else its number of workers (worker-hours), times
its few-shot draws (``train.repeats``: each trains side by side with a worker group of its own).
Once the spent total reaches the budget, the searcher says it is finished, so no trial starts;
running trials finish their rung: with ASHA they stop at the next rung they reach (a result
there is one the search can use), without a scheduler they run to the end. Re-checks start only
while budget is left, and what they spend is counted too.

``tune-all --budget H`` splits one budget over its data sets in proportion to the work of one
trial of each: training images x epochs x rate at the config's fixed settings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ray.tune
from ray.tune.search import Searcher

from flyp_ray.config import Config, planned_epochs, trial_rate

log = logging.getLogger(__name__)


def spent(cfg: Config, seconds: Iterable[float]) -> float:
    """Worker-hours (GPU-hours) of trials that ran ``seconds`` each at ``cfg``'s rate."""
    return hours(trial_rate(cfg), seconds)


def hours(hourly_rate: float, seconds: Iterable[float]) -> float:
    """Worker-hours of runs that took ``seconds`` each, at ``hourly_rate`` workers (or GPUs)."""
    return hourly_rate * sum(seconds) / 3600


class Ledger:
    """Each trial's running time so far, against the budget."""

    def __init__(self, worker_hours: float, hourly_rate: float) -> None:
        self.worker_hours = worker_hours
        self.rate = hourly_rate
        self.seconds: dict[str, float] = {}

    def record(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        if result and isinstance(result.get("time_total_s"), (int, float)):
            self.seconds[trial_id] = max(self.seconds.get(trial_id, 0.0),
                                         float(result["time_total_s"]))

    @property
    def spent(self) -> float:
        return hours(self.rate, self.seconds.values())

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.worker_hours


class BudgetSearcher(Searcher):
    """The search's searcher, finished once the ledger has spent the budget.

    Its state (the ledger) is saved with the search, so a resumed search knows what it has
    spent.
    """

    def __init__(self, searcher: Searcher, ledger: Ledger) -> None:
        self.searcher = searcher
        self.ledger = ledger
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None,
                              config: dict[str, Any], **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.ledger.exhausted:
            log.info("budget spent (%.3f of %g worker-hours): no new trial",
                     self.ledger.spent, self.ledger.worker_hours)
            return Searcher.FINISHED  # type: ignore[return-value] # Tune's own end marker
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.ledger.record(trial_id, result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        self.ledger.record(trial_id, result)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    # Tune saves a wrapper's state with get_state (the searcher it wraps saves its own): the
    # ledger is restored in place, where the stopper that shares it sees it too.
    def get_state(self) -> dict[str, Any]:
        return {"seconds": dict(self.ledger.seconds)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.ledger.seconds.clear()
        self.ledger.seconds.update(state["seconds"])


class StopAtRung(ray.tune.Stopper):
    """Once the budget is spent, stop each running trial at the next rung it reaches."""

    def __init__(self, ledger: Ledger, rungs: Sequence[int]) -> None:
        self.ledger = ledger
        self.rungs = set(rungs)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.ledger.record(trial_id, result)
        return self.ledger.exhausted and int(result.get("epoch", 0) or 0) in self.rungs

    def stop_all(self) -> bool:
        return False


def rungs(cfg: Config) -> list[int]:
    """ASHA's rungs (the epochs where it compares trials); none for other schedulers."""
    sched = cfg.search.scheduler
    if sched.type != "asha":
        return []
    out, rung = [], sched.grace_period
    while rung < planned_epochs(cfg.train):
        out.append(rung)
        rung *= sched.reduction_factor
    return out


def split(worker_hours: float, work: Sequence[float]) -> list[float]:
    """One budget over several searches, in proportion to ``work`` (images x epochs x rate);
    equal shares where no search has work to weigh (every data set still to be downloaded)."""
    total = sum(work)
    if total <= 0 or not math.isfinite(total):
        return [worker_hours / len(work)] * len(work)
    return [worker_hours * w / total for w in work]
