"""The per-trial driver: one Tune trial trains its sampled config as one Ray Train run.

Tune pickles :func:`run_trial` by reference, so each trial's process (one per trial) imports
this module and what it imports before the trial can start: kept to Ray, MLflow's client and
the driver side of a Train run (:mod:`flyp_ray.distributed.trainer`). The search's own modules
(plots, the re-check, the model registry) bring open_clip, torchvision and matplotlib, several
seconds of imports a trial has no use for; ``tests/search/test_trial.py`` keeps them out.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from flyp_ray.config import POPULATION, Config, with_train
from flyp_ray.distributed import trainer
from flyp_ray.errors import FlypRayError
from flyp_ray.search.tune_row import final_report
from flyp_ray.tracking import inputs, runs

if TYPE_CHECKING:
    from flyp_ray.data.digest import DataDigest


def run_trial(config: dict[str, Any], *, base: Config, parent_run_id: str,
              trials_storage: str, data: DataDigest | None = None) -> None:
    """One Tune trial: train ``base`` with the sampled ``config`` as a Ray Train run.

    The Train run and the MLflow child run are both named after the trial id, so a trial that
    Tune restarts (``--resume``) continues its Train run from its last checkpoint and logs into
    the same MLflow run. ``data``, the search's data digest, becomes the run's dataset inputs.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = dataclasses.replace(with_train(base, **config), storage=trials_storage)
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    run_id = (runs.find_run(uri, experiment, {runs.PARENT_TAG: parent_run_id,
                                                 runs.TRIAL_TAG: trial_id})
              or runs.start_trial_run(cfg, parent_run_id, trial_id))
    inputs.log_data(uri, run_id, data)
    if cfg.train.repeats > 1:
        run_draws(cfg, trial_id, run_id, data)
        return
    if cfg.search.scheduler.type in POPULATION:
        run_member(cfg, trial_id, run_id)
        return
    before = latest_checkpoint(f"{trials_storage}/{trial_id}")
    fit = trainer.build_trainer(cfg, trial_id, mlflow_run_id=run_id,
                                callbacks=[TuneReportCallback()])
    try:
        result = fit.fit()
    except Exception:
        runs.end_run(uri, run_id, "FAILED")
        raise
    if result.checkpoint is not None and result.checkpoint.path == before:
        # The Train run had already finished when Tune (re)started this trial, so its workers
        # reported nothing, and Tune would keep the result of its last snapshot (an earlier
        # epoch, or none). Report the final epoch again, as TuneReportCallback would have.
        ray.tune.report(final_report(result))
    runs.end_run(uri, run_id)


def latest_checkpoint(run_path: str) -> str | None:
    """The path of the latest checkpoint of the Ray Train run at ``run_path``, if it has one."""
    result = trainer.stored_result(run_path)
    return result.checkpoint.path if result is not None and result.checkpoint else None


@contextlib.contextmanager
def ended(uri: str, run_id: str) -> Iterator[None]:
    """The trial's MLflow run ends FAILED if the body raises (the error goes on), else FINISHED."""
    try:
        yield
    except Exception:
        runs.end_run(uri, run_id, "FAILED")
        raise
    runs.end_run(uri, run_id)


def run_member(cfg: Config, trial_id: str, run_id: str) -> None:
    """A member of a PBT/PB2 population (:mod:`flyp_ray.search.pbt`)."""
    from flyp_ray.search import pbt

    with ended(cfg.tracking.uri, run_id):
        pbt.run_trial(cfg, trial_id, run_id)


def run_draws(cfg: Config, trial_id: str, run_id: str, data: DataDigest | None) -> None:
    """A trial of few-shot draws: each a Train run nested under the trial's MLflow run, side by
    side; each epoch's mean over the draws goes to Tune as soon as every draw has reached it,
    so that the scheduler can stop the trial (its process, and with it the draws) early."""
    from flyp_ray.distributed import draws  # Ray's queue: only a trial of draws needs it

    uri = cfg.tracking.uri

    def on_mean(row: dict[str, Any]) -> None:
        runs.log_metrics(uri, run_id, row, step=int(row["epoch"]))
        ray.tune.report(row)  # draws.CHECKPOINT is Tune's CHECKPOINT_PATH_KEY

    with ended(uri, run_id):
        drawn = draws.run_draws(cfg, trial_id, run_id, on_mean, data)
        failed = [r["error"] for r in drawn.results if "error" in r and drawn.diverged is None]
        if failed:
            raise FlypRayError(f"trial {trial_id}: a few-shot draw failed: {failed[0]}")
