"""The driver of one training run: a Ray Train ``TorchTrainer`` built from the config.

Used by ``flyp-ray train`` directly, and (later) by each Tune trial. Runs are named, never
time-stamped: rebuilding a trainer with the same storage path and name restores the run, which
is how an interrupted driver continues.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

try:  # Ray Train V2's internals; without them the trainer is Ray's own (see Trainer)
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    DATASETS_CALLBACKS: tuple[type, ...] = (DatasetsCallback,)
    CLEANER_CALLBACKS: tuple[type, ...] = (PlacementGroupCleanerCallback,)
except ImportError:  # pragma: no cover - another Ray
    DATASETS_CALLBACKS = CLEANER_CALLBACKS = ()

from flyp_ray.config import Config, last_best, objectives
from flyp_ray.distributed import verbosity
from flyp_ray.distributed.contract import DRAW, MLFLOW_RUN, PERTURBED, RESUME_FROM, clock
from flyp_ray.errors import FlypRayError
from flyp_ray.finetune import wiseft
from flyp_ray.tracking import inputs, runs

if TYPE_CHECKING:
    from flyp_ray.data.digest import DataDigest

log = logging.getLogger(__name__)

CHECKPOINT_PATH = "checkpoint_path"  # Tune's CHECKPOINT_PATH_KEY; Tune is not imported here


@dataclasses.dataclass(frozen=True)
class TrainOutcome:
    """What ``flyp-ray train`` prints: the selected epoch's metrics and where things are."""

    metrics: dict[str, float]
    best_epoch: int
    checkpoint: str
    mlflow_run_id: str | None

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def selection(cfg: Config) -> tuple[str, str]:
    """The metric and mode that select the best epoch (the first objective of the search)."""
    metrics, modes = objectives(cfg.search)
    return metrics[0], modes[0]


def storage_path(cfg: Config) -> str:
    """Ray's storage_path: URIs as given, local paths absolute (Ray needs that)."""
    if "://" in cfg.storage:
        return cfg.storage
    return str(Path(cfg.storage).expanduser().resolve())


def scaling(cfg: Config) -> ScalingConfig:
    """The worker group of one run, from ``resources``."""
    r = cfg.resources
    per_worker: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker > 0:
        per_worker["GPU"] = r.gpus_per_worker
    return ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                         resources_per_worker=per_worker)


class Trainer(TorchTrainer):
    """Ray's ``TorchTrainer``, less two helper actors whose work is done, or not needed.

    Ray Train V2 starts, for every run, a ``DatasetManager`` actor to hand out Ray Data shards
    and a ``PlacementGroupCleaner`` that removes the run's workers if its controller dies
    unannounced. Each is a process to start and ``import ray.train`` in: 3.2 and 2.9 CPU-s a
    trial of a 4-trial search here, out of ~43 (2026-12-04). Our workers read images with a
    torch ``DataLoader`` and ask for no shard, so without datasets the manager goes. A
    controller dies unannounced when a search kills its trial, and the search frees such runs'
    workers itself (:mod:`flyp_ray.distributed.orphans`), with a dashboard or without one, which
    the cleaner needs. Elsewhere the controller's owner is the command's driver, whose job ends
    with it, and Ray frees the job's groups then. So the cleaner goes too.
    """

    def fit(self) -> Any:
        """Ray's ``fit``, with the process's Ctrl-C handler given back when it returns.

        On the main thread Ray installs a SIGINT handler that holds the run's controller actor
        (about 0.8 GB here), and leaves it installed: the controller then outlives its run
        until the next ``fit`` or the process's end (seen: 19 minutes in the test session).
        """
        if threading.current_thread() is not threading.main_thread():
            return super().fit()
        previous = signal.getsignal(signal.SIGINT)
        try:
            return super().fit()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _create_default_callbacks(self) -> list[Any]:
        # mypy reads Ray Train V1's TorchTrainer, which builds no callbacks; V2's does.
        callbacks: list[Any] = super()._create_default_callbacks()  # type: ignore[misc]
        idle = (() if self.datasets else DATASETS_CALLBACKS) + CLEANER_CALLBACKS
        return [c for c in callbacks if not isinstance(c, idle)]


def build_trainer(cfg: Config, name: str, *, mlflow_run_id: str | None = None,
                  resume_from: str | None = None, callbacks: list[Any] | None = None,
                  draw: int = 0, perturbed: list[str] | None = None) -> Trainer:
    """A TorchTrainer for ``cfg``, checkpointing every epoch and keeping the best and latest;
    ``draw`` numbers its few-shot draw (:mod:`flyp_ray.distributed.draws`); ``perturbed``
    names the train fields that ``cfg`` changes from ``resume_from``'s run (PBT)."""
    metric, mode = selection(cfg)
    run_config = RunConfig(
        name=name,
        storage_path=storage_path(cfg),
        failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
        # Ray always keeps the latest checkpoint too, which is what a restart resumes from.
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                           checkpoint_score_order=mode),
        callbacks=callbacks,
        # Ray Train's own console lines (every report's whole metrics dict, the worker group's
        # start) at WARNING unless verbose; its log files in the session folder keep them all.
        # mypy reads Ray Train V1's RunConfig, which has no logging_config; V2's has.
        logging_config=LoggingConfig(  # type: ignore[call-arg]
            log_level=verbosity.train_log_level()),
    )
    loop_config = {"config": cfg, MLFLOW_RUN: mlflow_run_id, RESUME_FROM: resume_from,
                   DRAW: draw, PERTURBED: perturbed or []}
    return Trainer(train_loop_per_worker, train_loop_config=loop_config,
                   scaling_config=scaling(cfg), run_config=run_config)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for ``TorchTrainer``: the whole training of one worker.

    Ray pickles this function by reference, so every process that builds a trainer imports
    this module; the training code (torchvision, open_clip, ...) is imported here, when it runs
    in a Train worker, so that a search's trial processes (one per trial) never pay for it.
    """
    called = clock()
    verbosity.ray_process(ray.train.get_context().get_experiment_name())
    from flyp_ray.distributed import worker

    worker.train_loop_per_worker(loop_config, called=called, imported=clock())


def best_of(result: ray.train.Result, metric: str,
            mode: str) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """The kept checkpoint with the best ``metric`` and its metrics."""
    kept = result.best_checkpoints or []
    scored = [(c, m) for c, m in kept if metric in m]
    if not scored:
        if result.checkpoint is None:
            raise FlypRayError(f"run {result.path} reported no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    return last_best(scored, lambda cm: float(cm[1][metric]), mode)


def new_name(cfg: Config) -> str:
    """A fresh run name: the config's stem and a short random suffix."""
    stem = "run" if cfg.source.startswith("<") else Path(cfg.source).stem
    return f"train-{stem}-{uuid.uuid4().hex[:8]}"


def train(cfg: Config, name: str | None = None, resume_from: str | None = None,
          parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
          log_model: bool = True, data: DataDigest | None = None, draw: int = 0,
          callbacks: list[Any] | None = None) -> TrainOutcome:
    """One finetuning run with the config's fixed values, tracked as one MLflow run.

    ``parent_run_id`` nests that run under another (a ``compare`` or ``search`` run), and
    ``tags`` go on it (``flyp_ray.kind`` among them replaces ``train``); ``log_model`` false
    leaves the selected epoch's model unlogged (a re-check logs only its champion's). A run
    that already finished (a driver restarted after it) is read back from storage: nothing is
    trained or logged again. ``data`` is the data set's digest where the caller (a search)
    has it; else it is computed here, once, and the run records it as its dataset inputs.
    One draw of a few-shot run (:mod:`flyp_ray.distributed.draws`, which ``train.repeats`` > 1
    goes through) passes its number as ``draw`` and its reports' listener as ``callbacks``.
    """
    name = name or new_name(cfg)
    done = finished(cfg, name, parent_run_id, tags)
    if done is not None:
        return done
    data = data if data is not None else inputs.measure(cfg)
    run_id = find_or_start_run(cfg, name, parent_run_id, tags or {})
    inputs.log_data(cfg.tracking.uri, run_id, data)
    log.info("Ray Train run %s under %s; MLflow run %s", name, storage_path(cfg), run_id)
    try:
        # Rebuilding a trainer with the same name restores the run from its last checkpoint.
        result = build_trainer(cfg, name, mlflow_run_id=run_id, resume_from=resume_from,
                               callbacks=callbacks, draw=draw).fit()
    except Exception:
        runs.end_run(cfg.tracking.uri, run_id, "FAILED")
        raise
    latest = result.metrics or {}
    if latest.get("diverged"):
        runs.end_run(cfg.tracking.uri, run_id, "FAILED")
        raise FlypRayError(f"run {name} diverged (loss not finite) at epoch "
                           f"{int(latest['epoch'])}; see MLflow run {run_id}")
    outcome, best = _outcome(cfg, result, run_id)
    if log_model:
        log_selected_model(cfg, run_id, best)
    runs.set_tags(cfg.tracking.uri, run_id, {"flyp_ray.best_epoch": outcome.best_epoch})
    runs.end_run(cfg.tracking.uri, run_id)
    return outcome


def finished(cfg: Config, name: str, parent_run_id: str | None = None,
             tags: Mapping[str, str] | None = None) -> TrainOutcome | None:
    """The outcome of run ``name`` if its MLflow run finished and its Train run is stored;
    None otherwise. Reads storage and MLflow only: no Ray Train run starts."""
    run_id = runs.find_run(cfg.tracking.uri, cfg.tracking.experiment,
                           _run_tags(name, parent_run_id, tags or {}))
    if run_id is None or runs.status(cfg.tracking.uri, run_id) != "FINISHED":
        return None
    result = finished_result(cfg, name)
    if result is None or (result.metrics or {}).get("diverged"):
        return None
    return _outcome(cfg, result, run_id)[0]


def _outcome(cfg: Config, result: ray.train.Result,
             run_id: str) -> tuple[TrainOutcome, ray.train.Checkpoint]:
    """The selected epoch's metrics (with WiSE-FT's final sweep) and its checkpoint."""
    metric, mode = selection(cfg)
    best, metrics = best_of(result, metric, mode)
    metrics = wiseft.with_sweep(metrics, result.metrics or {})
    outcome = TrainOutcome(metrics={k: float(v) for k, v in metrics.items() if _is_number(v)},
                           best_epoch=int(metrics.get("epoch", 0)), checkpoint=best.path,
                           mlflow_run_id=run_id)
    return outcome, best


def finished_result(cfg: Config, name: str) -> ray.train.Result | None:
    """The stored result of Ray Train run ``name`` (None if there is none): a finished run is
    read back from storage rather than restored, which would start its worker group again."""
    return stored_result(f"{storage_path(cfg).rstrip('/')}/{name}")


def stored_result(run_path: str) -> ray.train.Result | None:
    """What the Ray Train run at ``run_path`` has stored (its last report and checkpoint), if
    it has run."""
    try:
        return ray.train.Result.from_path(run_path)
    except RuntimeError:  # Ray's answer when there is no run (or no snapshot of it) yet
        return None


def kept_reports(result: ray.train.Result) -> list[dict[str, Any]]:
    """The epochs a stored Train run still knows: the reports of its kept checkpoints (the
    best and the latest) and its last report, each with its checkpoint's path under Tune's
    ``CHECKPOINT_PATH_KEY``. A driver restarted after a crash has lost the earlier reports."""
    rows = [{**m, CHECKPOINT_PATH: c.path} for c, m in (result.best_checkpoints or [])]
    if result.metrics and result.checkpoint is not None:
        rows.append({**result.metrics, CHECKPOINT_PATH: result.checkpoint.path})
    return [r for r in rows if "epoch" in r]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_tags(name: str, parent_run_id: str | None,
              extra: Mapping[str, str]) -> dict[str, str]:
    """The tags that find the MLflow run of Ray run ``name`` again."""
    tags = {runs.KIND_TAG: "train", **extra, "flyp_ray.run_name": name}
    if parent_run_id is not None:
        tags[runs.PARENT_TAG] = parent_run_id
    return tags


def find_or_start_run(cfg: Config, name: str, parent_run_id: str | None,
                       extra: Mapping[str, str]) -> str:
    """The MLflow run of Ray run ``name``: reused when the driver restarts, else created."""
    tags = _run_tags(name, parent_run_id, extra)
    found = runs.find_run(cfg.tracking.uri, cfg.tracking.experiment, tags)
    return found or runs.start_run(cfg, name, tags)


def log_selected_model(cfg: Config, run_id: str, best: ray.train.Checkpoint) -> None:
    """Log the selected epoch's weights as an MLflow model of the run (never raises)."""
    # Imported here: it brings open_clip and the data loaders, which a search's trial
    # processes (they build trainers, never log models) need not import.
    from flyp_ray.tracking import registry

    with best.as_directory() as folder:
        uri = registry.log_model(cfg, run_id, folder)
    if uri is not None:
        log.info("logged the selected model as %s", uri)
