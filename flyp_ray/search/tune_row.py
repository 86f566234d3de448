"""The row a trial sends Tune for a Train run that had finished before the trial (re)started,
and what a stored Train run holds of a trial's epochs.

Its own module because both kinds of trial need it (:mod:`flyp_ray.search.trial` and a PBT
member, :mod:`flyp_ray.search.pbt`), and the trial module imports the PBT one; the search's
summary and its trial lines read a resumed trial's kept epochs through it too.
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from flyp_ray.config import POPULATION, Config
from flyp_ray.distributed import trainer

log = logging.getLogger(__name__)


def final_report(result: ray.train.Result) -> dict[str, Any]:
    """A finished Train run's last epoch as the row Ray Train's ``TuneReportCallback`` sends."""
    path = result.checkpoint.path if result.checkpoint is not None else None
    return {**(result.metrics or {}), CHECKPOINT_PATH_KEY: path}


def kept_epochs(cfg: Config, trials_storage: str, trial_id: str) -> list[dict[str, Any]]:
    """The epochs that trial ``trial_id``'s stored Train run kept (its best and its latest).

    Tune starts a trial's rows again when a crashed search resumes: these are what is still
    known of the epochs before, the best among them. None for a trial of draws or a population
    member, whose Train runs have names of their own.
    """
    if cfg.train.repeats > 1 or cfg.search.scheduler.type in POPULATION:
        return []
    try:
        stored = trainer.stored_result(f"{trials_storage}/{trial_id}")
    except Exception as err:  # noqa: BLE001 - a snapshot cut short by the crash itself
        # what Tune's rows hold is still a summary; a trial's lost epochs must not cost it
        log.warning("trial %s: its Train run's kept epochs unreadable (%s: %s)", trial_id,
                    type(err).__name__, err)
        return []
    return trainer.kept_reports(stored) if stored is not None else []
