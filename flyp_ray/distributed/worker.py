"""The per-worker training function that Ray Train runs on each worker of a trial.

It builds the model and data, lets Ray wrap them for data parallelism, resumes from the latest
checkpoint if Ray hands one back (a restarted worker group) or from ``resume_from``, runs the
plain-torch loop, and after every epoch reports metrics and a checkpoint through
``ray.train.report``. Rank 0 also writes the epoch's metrics to the trial's MLflow run.
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch
import ray.util

from flyp_ray.config import Config, objectives
from flyp_ray.data import fewshot
from flyp_ray.errors import ConfigError, TrialDiverged
from flyp_ray.finetune import checkpoint, wiseft
from flyp_ray.finetune.evaluate import unwrap
from flyp_ray.finetune.loop import diverged_metrics, run_epochs
from flyp_ray.finetune.run import Run, build_run
from flyp_ray.tracking import runs

log = logging.getLogger(__name__)

RESUME_FROM = "resume_from"  # train_loop_config key: a checkpoint folder to start from
MLFLOW_RUN = "mlflow_run_id"  # train_loop_config key: the run rank 0 logs to
FINAL_FLUSH_RETRIES = 7  # backoff 1 + 2 + ... + 64 s: about two minutes for MLflow to return
PLACEMENT_GROUP = "placement_group"  # reported key: the worker group's placement group id
WISEFT_BEST = "wiseft_best"  # checkpoint meta key: epoch and score of WiSE-FT's finetuned end


def worker_run(cfg: Config, draw: int = 0) -> Run:
    """This worker's run, its model and training loader wrapped by Ray for DDP."""
    ctx = ray.train.get_context()
    return build_run(cfg, ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                     world_size=ctx.get_world_size(), draw=draw,
                     prepare_model=ray.train.torch.prepare_model,
                     prepare_loader=ray.train.torch.prepare_data_loader)


def start_from(resume_from: str | None) -> ray.train.Checkpoint | None:
    """The checkpoint to resume: Ray's latest after a restart, else ``resume_from``."""
    saved = ray.train.get_checkpoint()
    if saved is None and resume_from is not None:
        return ray.train.Checkpoint(resume_from)
    return saved


def restore(run: Run, source: ray.train.Checkpoint | None) -> int:
    """Load ``source`` into ``run`` (None: start afresh); returns the epoch it finished."""
    if source is None:
        return 0
    with source.as_directory() as folder:
        meta = checkpoint.load_weights(Path(folder), unwrap(run.model))
        epoch = checkpoint.load_training(Path(folder), run.state)
    if run.zero_shot is not None and WISEFT_BEST in meta:
        restore_best(run, source, meta[WISEFT_BEST], epoch)
    return epoch


def restore_best(run: Run, latest: ray.train.Checkpoint, best: dict[str, float],
                 epoch: int) -> None:
    """Give WiSE-FT back its finetuned end, the epoch best on id_val before the restart.

    Without it, a resumed run would mix towards the best epoch *since* the restart. The best
    epoch's weights are those of its checkpoint, a sibling of the latest one: Ray keeps it if
    the search's first objective is ``id_val/acc``, the default. If it is gone, the run says so
    and mixes towards the best epoch from here on.
    """
    best_epoch, score = int(best["epoch"]), float(best["score"])
    if best_epoch < 1:  # no epoch scored on id_val yet
        return
    if best_epoch == epoch:
        run.best = wiseft.Best(wiseft.snapshot(unwrap(run.model)), score, best_epoch)
        return
    path = posixpath.join(posixpath.dirname(latest.path.rstrip("/")), epoch_dir(best_epoch))
    storage = latest.filesystem
    if storage is None or storage.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        log.warning("WiSE-FT: epoch %d (best on id_val) has no checkpoint left at %s; mixing "
                    "towards the best epoch after %d instead", best_epoch, path, epoch)
        return
    with ray.train.Checkpoint(path, filesystem=storage).as_directory() as folder:
        state = checkpoint.read_weights(Path(folder))
    run.best = wiseft.Best(state, score, best_epoch)


def epoch_dir(epoch: int) -> str:
    """The checkpoint folder name of an epoch, in the run's storage."""
    return f"epoch_{epoch:04d}"


def report(run: Run, cfg: Config, run_id: str | None, epoch: int,
           metrics: dict[str, float]) -> None:
    """Checkpoint (rank 0 writes it) and report the epoch; rank 0 logs metrics to MLflow."""
    # MLflow first: once Tune sees the report, a scheduler may stop the trial and kill this
    # worker, and the epoch it stopped on must still reach MLflow.
    if run.rank == 0 and run_id is not None:
        runs.log_metrics(cfg.tracking.uri, run_id, metrics, step=epoch)
    check_objectives(cfg, epoch, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if run.rank == 0:
            checkpoint.save(Path(tmp), unwrap(run.model), run.state, epoch, metrics,
                            checkpoint_extra(run))
            saved = ray.train.Checkpoint.from_directory(tmp)
        # Every worker calls report: it is a barrier, and metrics come from rank 0.
        ray.train.report({**metrics, **placement_group()}, checkpoint=saved,
                         checkpoint_dir_name=epoch_dir(epoch))


def check_objectives(cfg: Config, epoch: int, metrics: dict[str, float]) -> None:
    """Stop with the config's own error when a report lacks a search metric.

    ``validate`` refuses such a metric before anything runs; should one still be missing, this
    fails the trial with a line that names the key, where Tune would stop the whole search with
    its own traceback.
    """
    for metric in objectives(cfg.search)[0]:
        if metric not in metrics:
            have = ", ".join(sorted(k for k in metrics if k.startswith(metric.split("/")[0])))
            raise ConfigError(cfg.source, "search.metric", f"{metric!r} is not in epoch {epoch}'s "
                                                           f"report (it has {have or 'none'})")


def checkpoint_extra(run: Run) -> dict[str, Any]:
    """What a checkpoint's meta.json holds besides epoch and metrics."""
    # The prompts go with the weights: the logged model rebuilds its head from them.
    extra: dict[str, Any] = {"classnames": run.data.classnames, "templates": run.data.templates,
                             "method": run.train.method}
    if run.zero_shot is not None:
        extra[WISEFT_BEST] = run.best.meta()
    return extra


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
    run = worker_run(cfg)
    start = restore(run, start_from(loop_config.get(RESUME_FROM)))
    last = [start]
    # A restarted worker group (from epoch k's checkpoint, or from scratch) may have logged
    # epoch k+1 before it died: log each epoch to MLflow once, so the run has no duplicates.
    logged = (runs.last_step(cfg.tracking.uri, run_id, "epoch")
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
            runs.flush(cfg.tracking.uri, run_id, retries=FINAL_FLUSH_RETRIES)
    except TrialDiverged as err:
        log.warning("run diverged: %s", err)
        metrics = diverged_metrics(last[0] + 1, dict(zip(*objectives(cfg.search), strict=True)))
        report_diverged(run, metrics, str(err))
        if run.rank == 0 and run_id is not None:
            runs.log_metrics(cfg.tracking.uri, run_id, metrics, step=last[0] + 1)
            runs.set_tags(cfg.tracking.uri, run_id, {"flyp_ray.status": "diverged",
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
        run = first if draw == 0 else worker_run(cfg, draw)
        finals.append(train_draw(run, cfg, run_id, draw))
    summary = fewshot.summarise(finals)
    report(run, cfg, run_id, int(summary["epoch"]), summary)
    return run


def train_draw(run: Run, cfg: Config, run_id: str | None, draw: int) -> dict[str, float]:
    """One few-shot draw's whole training, logged under ``repeat/{draw}/``; its last metrics."""
    final: dict[str, float] = {}

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if run.rank == 0 and run_id is not None:
            runs.log_metrics(cfg.tracking.uri, run_id,
                                 {f"repeat/{draw}/{k}": v for k, v in metrics.items()}, step=epoch)
        final.clear()
        final.update(metrics)

    run_epochs(run, 0, log_epoch)
    return final
