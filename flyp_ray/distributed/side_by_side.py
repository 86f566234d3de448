"""Several Ray Train runs side by side, each driven by a Ray task of its own.

Re-checks (a search's seeds) and few-shot draws (``train.repeats``) both train a list of runs
at once: each run's driver is a Ray task that reserves no CPU (its Train workers reserve
theirs), so Ray itself queues the runs whose workers do not fit yet, and the task's process
exits when its run is done. Results come back in the order of the list; a task whose process
died becomes ``{"error": ...}``, as a run's own failure does in its task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray

from flyp_ray.errors import first_line

Result = dict[str, Any]


def run_all(driver: Callable[..., Result], jobs: Sequence[tuple[Any, ...]], limit: int, *,
            done: Mapping[int, Result] | None = None,
            ended: Callable[[int, Result], None] | None = None,
            tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> list[Result]:
    """``driver(*job)`` for every job not in ``done``, at most ``limit`` at a time.

    ``ended(index, result)`` is called as each run ends; ``tick()`` at least every ``tick_s``
    seconds while runs are going (a caller that follows their progress reads it there).
    """
    task = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(driver)
    results: dict[int, Result] = dict(done or {})
    queue = [i for i in range(len(jobs)) if i not in results]
    running: dict[ray.ObjectRef, int] = {}
    while queue or running:
        while queue and len(running) < limit:
            index = queue.pop(0)
            running[task.remote(*jobs[index])] = index
        ready, _ = ray.wait(list(running), num_returns=1,
                            timeout=tick_s if tick is not None else None)
        if tick is not None:
            tick()
        for ref in ready:
            index = running.pop(ref)
            results[index] = _result(ref)
            if ended is not None:
                ended(index, results[index])
    return [results[i] for i in range(len(jobs))]


def _result(ref: ray.ObjectRef) -> Result:
    try:
        result: Result = ray.get(ref)
        return result
    except ray.exceptions.RayError as err:  # the task's process died
        return {"error": first_line(err)}
