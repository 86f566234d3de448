"""Few-shot draws side by side: each of ``train.repeats`` draws is a Ray Train run of its own.

The paper's few-shot protocol averages many draws of K images per class, each a small run.
Here every draw is a named Ray Train run (``{name}-draw{r}``, in ``{storage}/{name}-draws``),
driven as re-checks are (:mod:`flyp_ray.distributed.side_by_side`: all at once, Ray queuing
the worker groups that do not fit), and an MLflow run nested under the run that asked for them
(a trial's, or a ``train`` run's), tagged ``flyp_ray.kind=draw`` and ``flyp_ray.draw=<r>``.

Each draw's reports reach the caller through a Ray queue (:class:`EpochReports`, a Ray Train
callback in the draw's controller); once every draw has reported an epoch, the caller gets that
epoch's mean over the draws and ``{metric}_std`` (:func:`summarise`): a trial reports it to
Tune at once, so a scheduler can stop the trial after any epoch. A draw's failure is retried by
its own Train run (``resources.max_failures``, from its checkpoint), not by the others; a draw
that still fails fails the whole. A driver started again with the same name (a resumed trial)
reads finished draws back and continues the others from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray.train
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from flyp_ray.config import Config, best_first, last_best, with_train
from flyp_ray.distributed import side_by_side, trainer
from flyp_ray.errors import FlypRayError, first_line
from flyp_ray.finetune import wiseft
from flyp_ray.tracking import inputs, runs

if TYPE_CHECKING:
    from flyp_ray.data.digest import DataDigest

log = logging.getLogger(__name__)

KIND = "draw"  # flyp_ray.kind of a draw's run
DRAW_TAG = "flyp_ray.draw"
CHECKPOINT = trainer.CHECKPOINT_PATH  # a mean row's checkpoint

Row = dict[str, Any]


def mean_std(finals: Sequence[Mapping[str, float]]) -> tuple[dict[str, float],
                                                           dict[str, float]]:
    """Mean and sample standard deviation (0 for one value) of each metric every row has."""
    if not finals:
        return {}, {}
    keys = [k for k in finals[0] if all(k in f for f in finals)]
    values = {k: [float(f[k]) for f in finals] for k in keys}
    return ({k: statistics.fmean(v) for k, v in values.items()},
            {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()})


def summarise(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the draws, its standard deviation as ``{name}_std``, and
    ``repeats``: what a run with ``train.repeats`` reports for an epoch."""
    mean, std = mean_std(rows)
    out: dict[str, float] = {"repeats": float(len(rows))}
    for key, value in mean.items():
        out[key] = value
        if key != "epoch":
            out[f"{key}_std"] = std[key]
    return out


def draw_name(name: str, draw: int) -> str:
    return f"{name}-draw{draw}"


def draws_storage(cfg: Config, name: str) -> str:
    return f"{cfg.storage.rstrip('/')}/{name}-draws"


def draw_config(cfg: Config, storage: str) -> Config:
    """One draw's config: a single draw, its Train run in the draws' folder."""
    return dataclasses.replace(with_train(cfg, repeats=1), storage=storage)


def draw_tags(draw: int) -> dict[str, str]:
    return {runs.KIND_TAG: KIND, DRAW_TAG: str(draw)}


class EpochReports(UserCallback):  # type: ignore[misc]
    """Ray Train callback of one draw (it runs in the draw's controller): every report of
    rank 0, with its checkpoint's path, into the caller's queue."""

    def __init__(self, queue: Queue, draw: int) -> None:
        self.queue, self.draw = queue, draw

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        row = dict(metrics[0])
        if checkpoint is not None:
            row[CHECKPOINT] = checkpoint.path
        self.queue.put((self.draw, row))


class Means:
    """Each draw's reports by epoch; an epoch's mean once every draw has reported it."""

    def __init__(self, cfg: Config) -> None:
        self.metric, self.mode = trainer.selection(cfg)
        self.rows: list[dict[int, Row]] = [{} for _ in range(cfg.train.repeats)]
        self.done = -1  # the last epoch whose mean was given
        self.diverged: Row | None = None

    def add(self, draw: int, row: Row) -> None:
        if row.get("diverged"):
            self.diverged = self.diverged or {**row, "repeats": float(len(self.rows))}
        else:
            self.rows[draw][int(row["epoch"])] = row  # a restarted draw's repeat replaces

    def ready(self) -> list[Row]:
        """The means of the epochs every draw has now reached, not given before, in order."""
        out = []
        for epoch in sorted(e for e in self.rows[0] if e > self.done):
            if self.diverged is not None or not all(epoch in rows for rows in self.rows):
                break
            out.append(self.mean(epoch))
            self.done = epoch
        return out

    def mean(self, epoch: int) -> Row:
        """Epoch ``epoch`` over the draws; its checkpoint is the draw's best at that epoch."""
        rows = [rows[epoch] for rows in self.rows]
        row: Row = summarise([{k: float(v) for k, v in r.items() if _is_number(v)}
                              for r in rows])
        scored = [r for r in rows if _is_number(r.get(self.metric)) and CHECKPOINT in r]
        if scored:
            row[CHECKPOINT] = best_first(scored, lambda r: float(r[self.metric]),
                                         self.mode)[0][CHECKPOINT]
        return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class Drawn:
    """What the draws did: each epoch's mean (in order) and each draw's end."""

    means: list[Row]
    results: list[dict[str, Any]]
    diverged: Row | None


def train_draw(cfg: Config, draw: int, name: str, parent_run_id: str | None, queue: Queue,
               data: DataDigest | None) -> dict[str, Any]:
    """One draw's Train run (a Ray task): its selected epoch, or the error that ended it."""
    started = time.monotonic()
    try:
        outcome = trainer.train(draw_config(cfg, draws_storage(cfg, name)),
                                name=draw_name(name, draw), parent_run_id=parent_run_id,
                                tags=draw_tags(draw), log_model=False, data=data, draw=draw,
                                callbacks=[EpochReports(queue, draw)])
    except Exception as err:  # noqa: BLE001 - reported to the caller, which decides
        return {"error": first_line(err), "seconds": time.monotonic() - started}
    return {"metrics": outcome.metrics, "mlflow_run_id": outcome.mlflow_run_id,
            "checkpoint": outcome.checkpoint, "seconds": time.monotonic() - started}


def stored_rows(cfg: Config, name: str, draw: int) -> list[Row]:
    """A draw's reports that its stored Train run kept (a resumed driver): those of its kept
    checkpoints and its latest. Earlier epochs were reported before the restart."""
    result = trainer.finished_result(draw_config(cfg, draws_storage(cfg, name)),
                                     draw_name(name, draw))
    return [] if result is None else trainer.kept_reports(result)


def run_draws(cfg: Config, name: str, parent_run_id: str | None,
              on_mean: Callable[[Row], None], data: DataDigest | None = None) -> Drawn:
    """Train the draws of ``cfg`` side by side; ``on_mean(row)`` as each epoch's mean is
    known (and once with the worst values if a draw diverged)."""
    repeats = cfg.train.repeats
    means = Means(cfg)
    for draw in range(repeats):
        for row in stored_rows(cfg, name, draw):
            means.add(draw, row)
    # The queue is a small actor: it must not wait for a CPU the draws' workers hold.
    queue = Queue(actor_options={"num_cpus": 0})

    def tick() -> None:
        if queue.qsize():
            for draw, row in queue.get_nowait_batch(queue.qsize()):
                means.add(draw, row)
        for row in means.ready():
            on_mean(row)

    def ended(draw: int, result: dict[str, Any]) -> None:
        state = f"failed: {result['error']}" if "error" in result else "done"
        log.info("draw %s %s (%.0f s)", draw_name(name, draw), state, result.get("seconds", 0))

    jobs = [(cfg, draw, name, parent_run_id, queue, data) for draw in range(repeats)]
    try:
        results = side_by_side.run_all(train_draw, jobs, repeats, ended=ended, tick=tick)
        tick()  # a draw's last reports are in the queue before its task returns
    finally:
        queue.shutdown()
    if means.diverged is not None:
        on_mean(means.diverged)
    return Drawn(means=[means.mean(e) for e in sorted(means.rows[0]) if e <= means.done],
                 results=results, diverged=means.diverged)


def outcome(cfg: Config, name: str, run_id: str | None, drawn: Drawn) -> trainer.TrainOutcome:
    """A ``train`` run's outcome: the epoch whose mean is best, the last epoch's WiSE-FT sweep,
    and the checkpoint of the draw best at that epoch."""
    failed = [(d, r["error"]) for d, r in enumerate(drawn.results) if "error" in r]
    if drawn.diverged is not None:
        raise FlypRayError(f"run {name}: a draw diverged (loss not finite) at epoch "
                           f"{int(drawn.diverged['epoch'])}; see MLflow run {run_id}")
    if failed or not drawn.means:
        draw, error = failed[0] if failed else (0, "no epoch reported")
        raise FlypRayError(f"run {name}: draw {draw} failed: {error}")
    metric, mode = trainer.selection(cfg)
    best = last_best(drawn.means, lambda r: float(r.get(metric, 0.0)), mode)
    metrics = wiseft.with_sweep(best, drawn.means[-1])
    return trainer.TrainOutcome(
        metrics={k: float(v) for k, v in metrics.items() if _is_number(v)},
        best_epoch=int(best["epoch"]), checkpoint=str(best.get(CHECKPOINT, "")),
        mlflow_run_id=run_id)


def train(cfg: Config, name: str | None = None, resume_from: str | None = None,
          parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
          log_model: bool = True, data: DataDigest | None = None) -> trainer.TrainOutcome:
    """One run (:func:`flyp_ray.distributed.trainer.train`, the same arguments), or with
    ``train.repeats`` > 1 its draws side by side: one MLflow run with each epoch's mean over the
    draws (``step=epoch``), the draws' runs nested under it."""
    if cfg.train.repeats == 1:
        return trainer.train(cfg, name, resume_from, parent_run_id, tags, log_model, data)
    if resume_from is not None:
        raise FlypRayError("--resume-from takes one run's checkpoint; a run of "
                           f"{cfg.train.repeats} draws resumes by its --name")
    name = name or trainer.new_name(cfg)
    data = data if data is not None else inputs.measure(cfg)
    run_id = trainer.find_or_start_run(cfg, name, parent_run_id, tags or {})
    inputs.log_data(cfg.tracking.uri, run_id, data)
    log.info("%d few-shot draws of %s side by side; MLflow run %s", cfg.train.repeats, name,
             run_id)
    try:
        drawn = run_draws(cfg, name, run_id,
                          lambda row: runs.log_metrics(cfg.tracking.uri, run_id, row,
                                                       step=int(row["epoch"])), data)
        result = outcome(cfg, name, run_id, drawn)
    except Exception:
        runs.end_run(cfg.tracking.uri, run_id, "FAILED")
        raise
    if log_model and result.checkpoint:
        trainer.log_selected_model(cfg, run_id, ray.train.Checkpoint(result.checkpoint))
    runs.set_tags(cfg.tracking.uri, run_id, {"flyp_ray.best_epoch": result.best_epoch})
    runs.end_run(cfg.tracking.uri, run_id)
    return result
