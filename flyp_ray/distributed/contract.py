"""What a driver and its Ray Train workers agree on: config keys, a reported key, a clock.

Light to import on purpose: the driver side (:mod:`flyp_ray.distributed.trainer`, a search's
trial processes) uses these names without importing the training code.
"""

from __future__ import annotations

import time

RESUME_FROM = "resume_from"  # train_loop_config key: a checkpoint folder to start from
DRAW = "draw"  # train_loop_config key: the few-shot draw the run trains (train.repeats)
# train_loop_config key: the train fields whose values differ from RESUME_FROM's run (PBT)
PERTURBED = "perturbed"
MLFLOW_RUN = "mlflow_run_id"  # train_loop_config key: the run rank 0 logs to


def clock() -> float:
    """Seconds on the CLOCK_BOOTTIME scale, on which a process's start time is also read."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
