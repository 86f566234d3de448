"""The row a trial sends Tune for a Train run that had finished before the trial (re)started.

Its own module because both kinds of trial need it (:mod:`flyp_ray.search.trial` and a PBT
member, :mod:`flyp_ray.search.pbt`), and the trial module imports the PBT one.
"""

from __future__ import annotations

from typing import Any

import ray.train
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY


def final_report(result: ray.train.Result) -> dict[str, Any]:
    """A finished Train run's last epoch as the row Ray Train's ``TuneReportCallback`` sends."""
    path = result.checkpoint.path if result.checkpoint is not None else None
    return {**(result.metrics or {}), CHECKPOINT_PATH_KEY: path}
