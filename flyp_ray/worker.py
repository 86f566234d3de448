"""The per-worker training function that Ray Train runs on each worker of a trial.

It builds the model and data, lets Ray wrap them for data parallelism, resumes from the latest
checkpoint if Ray hands one back (a restarted worker group) or from ``resume_from``, runs the
plain-torch loop, and after every epoch reports metrics and a checkpoint through
``ray.train.report``. Rank 0 also writes the epoch's metrics to the trial's MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import ray.util

from flyp_ray import checkpoint, fewshot, loop, tracking
from flyp_ray.config import Config, objectives
from flyp_ray.errors import TrialDiverged
from flyp_ray.evaluate import unwrap
from flyp_ray.loop import Run, diverged_metrics, run_epochs

log = logging.getLogger(__name__)

RESUME_FROM = "resume_from"  # train_loop_config key: a checkpoint folder to start from
MLFLOW_RUN = "mlflow_run_id"  # train_loop_config key: the run rank 0 logs to
FINAL_FLUSH_RETRIES = 7  # backoff 1 + 2 + ... + 64 s: about two minutes for MLflow to return
PLACEMENT_GROUP = "placement_group"  # reported key: the worker group's placement group id


def build_run(cfg: Config, draw: int = 0) -> Run:
    """This worker's run, its model and training loader wrapped by Ray for DDP."""
    ctx = ray.train.get_context()
    return loop.build_run(cfg, ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                          world_size=ctx.get_world_size(), draw=draw,
                          prepare_model=ray.train.torch.prepare_model,
                          prepare_loader=ray.train.torch.prepare_data_loader)


def restore(run: Run, resume_from: str | None) -> int:
    """Load the latest checkpoint (Ray's after a restart, else ``resume_from``); last epoch."""
    saved = ray.train.get_checkpoint()
    if saved is None and resume_from is None:
        return 0
    source = saved.as_directory() if saved is not None else contextlib.nullcontext(resume_from)
    with source as folder:
        checkpoint.load_weights(Path(str(folder)), unwrap(run.model))
        return checkpoint.load_training(Path(str(folder)), run.state)



def report(run: Run, cfg: Config, run_id: str | None, epoch: int,
           metrics: dict[str, float]) -> None:
    """Checkpoint (rank 0 writes it) and report the epoch; rank 0 logs metrics to MLflow."""
    # MLflow first: once Tune sees the report, a scheduler may stop the trial and kill this
    # worker, and the epoch it stopped on must still reach MLflow.
    if run.rank == 0 and run_id is not None:
        tracking.log_metrics(cfg.tracking.uri, run_id, metrics, step=epoch)
    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if run.rank == 0:
            # The prompts go with the weights: the logged model rebuilds its head from them.
            extra = {"classnames": run.data.classnames, "templates": run.data.templates,
                     "method": run.train.method}
            checkpoint.save(Path(tmp), unwrap(run.model), run.state, epoch, metrics, extra)
            saved = ray.train.Checkpoint.from_directory(tmp)
        # Every worker calls report: it is a barrier, and metrics come from rank 0.
        ray.train.report({**metrics, **placement_group()}, checkpoint=saved,
                         checkpoint_dir_name=f"epoch_{epoch:04d}")


def placement_group() -> dict[str, str]:
    """The worker group's placement group id, reported so that a search can free it.

    A Tune scheduler stops a trial by killing its process; the worker group's reserved CPUs
    then stay held unless Ray Train's cleaner reaches the state API (it needs the dashboard and
    a single Ray instance on the machine). The search frees them itself with this id.
    """
    group = ray.util.get_current_placement_group()
    return {PLACEMENT_GROUP: group.id.hex()} if group is not None else {}


def report_diverged(run: Run, metrics: dict[str, float], error: str) -> None:
    """Report the worst metrics with a marker checkpoint that holds no weights.

    The marker is what the driver sees: Ray's Result carries the latest *checkpointed* metrics
    only, and the weights of a diverged run are not worth keeping.
    """
    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if run.rank == 0:
            checkpoint.save_marker(Path(tmp), int(metrics["epoch"]), metrics, error)
            saved = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=saved,
                         checkpoint_dir_name=f"diverged_{int(metrics['epoch']):04d}")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for ``TorchTrainer``: the whole training of one worker."""
    cfg: Config = loop_config["config"]
    run_id: str | None = loop_config.get(MLFLOW_RUN)
    run = build_run(cfg)
    start = restore(run, loop_config.get(RESUME_FROM))
    last = [start]
    # A restarted worker group (from epoch k's checkpoint, or from scratch) may have logged
    # epoch k+1 before it died: log each epoch to MLflow once, so the run has no duplicates.
    logged = (tracking.last_step(cfg.tracking.uri, run_id, "epoch")
              if run.rank == 0 and run_id is not None else 0)

    def report_epoch(epoch: int, metrics: dict[str, float]) -> None:
        report(run, cfg, run_id if epoch > logged else None, epoch, metrics)
        last[0] = epoch

    try:
        if cfg.train.repeats > 1:
            run = train_repeats(run, cfg, run_id)
        else:
            run_epochs(run, start, report_epoch)
        if run.rank == 0 and run_id is not None:
            # Metrics an MLflow outage held back: a last, longer try before the worker exits.
            tracking.flush(cfg.tracking.uri, run_id, retries=FINAL_FLUSH_RETRIES)
    except TrialDiverged as err:
        log.warning("run diverged: %s", err)
        metrics = diverged_metrics(last[0] + 1, dict(zip(*objectives(cfg.search), strict=True)))
        report_diverged(run, metrics, str(err))
        if run.rank == 0 and run_id is not None:
            tracking.log_metrics(cfg.tracking.uri, run_id, metrics, step=last[0] + 1)
            tracking.set_tags(cfg.tracking.uri, run_id, {"flyp_ray.status": "diverged",
                                                         "flyp_ray.error": str(err)})


def train_repeats(first: Run, cfg: Config, run_id: str | None) -> Run:
    """Train on ``train.repeats`` few-shot draws, one after another; report mean and std once.

    Each draw's epochs go to MLflow as ``repeat/{draw}/...``; Ray sees one report, at the last
    epoch, with the mean of the draws' final metrics and ``{name}_std``, and the last draw's
    weights. A restarted worker group starts the draws again.
    """
    finals = []
    run = first
    for draw in range(cfg.train.repeats):
        run = first if draw == 0 else build_run(cfg, draw)
        finals.append(train_draw(run, cfg, run_id, draw))
    summary = fewshot.summarise(finals)
    report(run, cfg, run_id, int(summary["epoch"]), summary)
    return run


def train_draw(run: Run, cfg: Config, run_id: str | None, draw: int) -> dict[str, float]:
    """One few-shot draw's whole training, logged under ``repeat/{draw}/``; its last metrics."""
    final: dict[str, float] = {}

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if run.rank == 0 and run_id is not None:
            tracking.log_metrics(cfg.tracking.uri, run_id,
                                 {f"repeat/{draw}/{k}": v for k, v in metrics.items()}, step=epoch)
        final.clear()
        final.update(metrics)

    run_epochs(run, 0, log_epoch)
    return final
