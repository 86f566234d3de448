"""The per-worker training function that Ray Train runs on each worker of a trial.

It builds the model and data, lets Ray wrap them for data parallelism, resumes from the latest
checkpoint if Ray hands one back (a restarted worker group) or from ``resume_from``, runs the
plain-torch loop, and after every epoch reports metrics and a checkpoint through
``ray.train.report``. Rank 0 writes the checkpoint in the background (:class:`Checkpoints`) and
then the epoch's metrics to the trial's MLflow run; every ``train.log_every_steps`` steps it logs
the throughput there too (``perf/...``, :class:`ProgressLog`).
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch

from flyp_ray.config import POPULATION, Config, objectives
from flyp_ray.distributed.contract import (
    DRAW,
    MLFLOW_RUN,
    PERTURBED,
    RESUME_FROM,
    clock,
)
from flyp_ray.errors import ConfigError, TrialDiverged
from flyp_ray.finetune import checkpoint, optim, wiseft
from flyp_ray.finetune.evaluate import unwrap
from flyp_ray.finetune.loop import diverged_metrics, run_epochs
from flyp_ray.finetune.model import apply_temperature
from flyp_ray.finetune.run import Run, build_run
from flyp_ray.tracking import runs

log = logging.getLogger(__name__)
ASYNC = ray.train.CheckpointUploadMode.ASYNC

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


def adopt_perturbed(run: Run, cfg: Config, perturbed: list[str]) -> None:
    """A run continued from another trial's checkpoint with new values (population-based
    training): the optimizer and schedule take this config's rate and decay, and a searched
    temperature resets the logit scale (learned on from there if ``learn_temperature``)."""
    optim.adopt_values(run.state, unwrap(run.model), cfg.train)
    if "temperature" in perturbed:
        apply_temperature(unwrap(run.model), cfg.train)
    if run.rank == 0:
        log.info("continuing with %s", ", ".join(f"{name}={getattr(cfg.train, name):.4g}"
                                                for name in perturbed))


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


class Checkpoints:
    """Rank 0's checkpoints, written by Ray's upload thread straight into the run's storage.

    ``ray.train.report(..., checkpoint_upload_mode=ASYNC)`` returns at once and uploads in a
    background thread; Ray tells its controller (and so Tune) about the checkpoint only when the
    upload is done. Here the upload *is* the write (``checkpoint_upload_fn``): from a host copy
    of the state into the storage folder, so training goes on meanwhile and no file is written
    to a local folder first to be copied again. The epoch's metrics go to MLflow at the end of
    the upload: after its checkpoint is complete, before Tune can act on the report (a scheduler
    that stops a trial kills this worker). A worker killed mid-upload resumes from the previous
    checkpoint, and the epoch reaches MLflow once, when it is trained again.
    """

    def __init__(self, uri: str, run_id: str | None) -> None:
        # run_id None: epochs are not logged here (rank > 0, or a population's member, whose
        # trial logs the epochs Tune lets it keep: flyp_ray.search.pbt).
        self.uri, self.run_id = uri, run_id
        self.last: threading.Event | None = None  # set when the latest upload has ended
        self.host: checkpoint.Contents | None = None  # host buffers, reused once written
        # The last epoch in MLflow, asked for at the first upload (off the start-up's path):
        # a restarted worker group (from epoch k's checkpoint, or from scratch) may have logged
        # epoch k+1 before it died, and each epoch is logged once, so the run has no duplicates.
        self.logged: int | None = None

    def wait(self) -> None:
        """Until the latest checkpoint is written and its epoch logged (or its write failed)."""
        if self.last is not None:
            self.last.wait()

    def report(self, run: Run, epoch: int, metrics: dict[str, Any]) -> None:
        """Rank 0's report of ``epoch``, with its checkpoint."""
        # One host copy at a time: a write slower than an epoch must not pile copies up.
        self.wait()
        self.host = checkpoint.on_host(checkpoint.contents(unwrap(run.model), run.state, epoch,
                                                           metrics, checkpoint_extra(run)),
                                       reuse=self.host)
        done = threading.Event()
        upload = self._upload(self.host, epoch, metrics, done)
        # Ray hands the reported checkpoint to the upload and would delete it afterwards; here
        # it names the upload's own destination, and is kept. (A temporary local folder for
        # it stayed behind in /tmp whenever the worker was killed before its upload ended.)
        storage = ray.train.get_context().get_storage()
        folder = storage.build_checkpoint_path_from_name(epoch_dir(epoch))
        destination = ray.train.Checkpoint(folder, filesystem=storage.storage_filesystem)
        ray.train.report(metrics, checkpoint=destination,
                         checkpoint_dir_name=epoch_dir(epoch), checkpoint_upload_mode=ASYNC,
                         checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=False)
        self.last = done

    def _upload(self, saved: checkpoint.Contents, epoch: int, metrics: dict[str, Any],
                done: threading.Event
                ) -> Callable[[ray.train.Checkpoint, str], ray.train.Checkpoint]:
        storage = ray.train.get_context().get_storage()

        def upload(_local: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            try:
                # Ray's own check (made by its default upload) that this node sees the run's
                # storage: a head node's local folder would otherwise fill this node's disk.
                getattr(storage, "_check_validation_file", lambda: None)()
                folder = storage.build_checkpoint_path_from_name(name)
                checkpoint.write(saved, folder, storage.storage_filesystem)
                self.log_epoch(epoch, metrics)
                return ray.train.Checkpoint(folder, filesystem=storage.storage_filesystem)
            finally:
                done.set()

        return upload

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The epoch's metrics to MLflow (``step=epoch``), unless an earlier attempt did."""
        if self.run_id is None:
            return
        if self.logged is None:
            self.logged = runs.last_step(self.uri, self.run_id, "epoch")
        if epoch > self.logged:
            runs.log_metrics(self.uri, self.run_id, metrics, step=epoch)


def report(run: Run, cfg: Config, checkpoints: Checkpoints, epoch: int,
           metrics: dict[str, float]) -> None:
    """Report the epoch with its checkpoint (rank 0 writes it, then logs the epoch to MLflow)."""
    check_objectives(cfg, epoch, metrics)
    if run.rank == 0:
        checkpoints.report(run, epoch, metrics)
        return
    # Every worker calls report: it is a barrier, and metrics come from rank 0.
    ray.train.report(metrics, checkpoint=None,
                     checkpoint_dir_name=epoch_dir(epoch), checkpoint_upload_mode=ASYNC)


class ProgressLog:
    """Throughput readings to MLflow as ``perf/...`` metrics, sent from a thread, best effort.

    Their step is the run's optimizer-step count: ``perf/`` curves have an axis of their own,
    several points per epoch, where the per-epoch metrics use ``step=epoch`` (``perf/epoch``
    maps one onto the other). A reading that finds the previous one still on its way is
    dropped: the next one is a few seconds away, and training never waits for MLflow.
    """

    def __init__(self, uri: str, run_id: str, prefix: str = "perf/") -> None:
        self.uri, self.run_id, self.prefix = uri, run_id, prefix
        self.sending = threading.Lock()
        self.thread: threading.Thread | None = None

    def __call__(self, step: int, figures: dict[str, float]) -> None:
        if not self.sending.acquire(blocking=False):
            return
        metrics = {f"{self.prefix}{k}": v for k, v in figures.items()}
        self.thread = threading.Thread(target=self._send, args=(metrics, step), daemon=True,
                                       name="flyp-ray-progress")
        self.thread.start()

    def _send(self, metrics: dict[str, float], step: int) -> None:
        try:
            runs.log_progress(self.uri, self.run_id, metrics, step)
        finally:
            self.sending.release()

    def close(self, timeout_s: float = 10.0) -> None:
        """Let the last reading arrive before the worker process ends."""
        if self.thread is not None:
            self.thread.join(timeout_s)


def progress_log(run: Run, cfg: Config, run_id: str | None,
                 prefix: str = "perf/") -> ProgressLog | None:
    """Rank 0's :class:`ProgressLog`, if the run is tracked."""
    return ProgressLog(cfg.tracking.uri, run_id, prefix) if run.rank == 0 and run_id else None


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


def train_loop_per_worker(loop_config: dict[str, Any], *, called: float | None = None,
                          imported: float | None = None) -> None:
    """The whole training of one worker (:func:`flyp_ray.distributed.trainer.train_loop_per_worker`
    calls it, with when it was called and when this module's imports were done)."""
    called = called if called is not None else clock()
    imported = imported if imported is not None else called
    cfg: Config = loop_config["config"]
    run_id: str | None = loop_config.get(MLFLOW_RUN)
    # A few-shot draw (train.repeats) is a run of its own: its number seeds the images kept.
    run = worker_run(cfg, int(loop_config.get(DRAW, 0)))
    restoring = time.perf_counter()
    start = restore(run, start_from(loop_config.get(RESUME_FROM)))
    if start and loop_config.get(PERTURBED):
        adopt_perturbed(run, cfg, loop_config[PERTURBED])
    run.timings["restore"] = time.perf_counter() - restoring
    last = [start]
    if run.rank == 0:
        resumed = f"; resuming after epoch {start}" if start else ""
        log.info("%s%s", startup_line(called, imported, run.timings), resumed)
    # A population's member keeps training while Tune decides whether its line goes on; its
    # trial logs an epoch only once Tune has let it (flyp_ray.search.pbt._Reporter).
    population = cfg.search.scheduler.type in POPULATION
    checkpoints = Checkpoints(cfg.tracking.uri,
                              run_id if run.rank == 0 and not population else None)
    readings = progress_log(run, cfg, run_id)

    def report_epoch(epoch: int, metrics: dict[str, float]) -> None:
        report(run, cfg, checkpoints, epoch, metrics)
        last[0] = epoch

    try:
        run_epochs(run, start, report_epoch, readings)
        checkpoints.wait()
        if readings is not None:
            readings.close()
        if run.rank == 0 and run_id is not None:
            # Metrics an MLflow outage held back: a last, longer try before the worker exits.
            runs.flush(cfg.tracking.uri, run_id, retries=runs.FINAL_FLUSH_RETRIES)
    except TrialDiverged as err:
        log.warning("run diverged: %s", err)
        metrics = diverged_metrics(last[0] + 1, dict(zip(*objectives(cfg.search), strict=True)))
        report_diverged(run, metrics, str(err))
        checkpoints.wait()
        if run.rank == 0 and run_id is not None:
            runs.log_metrics(cfg.tracking.uri, run_id, metrics, step=last[0] + 1)
            runs.set_tags(cfg.tracking.uri, run_id, {"flyp_ray.status": "diverged",
                                                         "flyp_ray.error": str(err)})


def process_started() -> float | None:
    """When this process started, on the CLOCK_BOOTTIME scale (Linux; None elsewhere)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
    except (OSError, ValueError, IndexError):
        return None


def startup_line(called: float, imported: float, timings: dict[str, float]) -> str:
    """Where the worker's time went before its first step, as one log line.

    ``process``: from the process's start to the training function's call (the interpreter,
    Ray's worker and its set-up, the process group); ``imports``: the training code's (torch's
    model libraries, MLflow, ...); the rest are :func:`build_run`'s parts and the restore.
    """
    started = process_started()
    parts = {"process": called - started if started is not None else None,
             "imports": imported - called, **timings}
    total = clock() - (started if started is not None else called)
    shown = ", ".join(f"{name} {s:.1f} s" for name, s in parts.items() if s is not None)
    return f"start-up: {total:.1f} s before the first step ({shown})"
