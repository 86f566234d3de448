"""The search: Ray Tune + Optuna over TrainConfig fields, one Ray Train run per trial.

Three roles, each a plain function (Ray's Train + Tune pattern): the per-worker training function
(:mod:`flyp_ray.distributed.worker`), the per-trial driver (:mod:`flyp_ray.search.trial`) that
builds a ``TorchTrainer`` named after the trial id, and :func:`run_search`, which builds the
``Tuner``.

Layout of one search under ``storage``::

    search-<config stem>[-N]/      Tune's experiment folder (``--resume`` restores it)
        summary.json               what ``flyp-ray tune`` prints last
        trials/<trial id>/         each trial's Ray Train run and its checkpoints

A fresh search never overwrites an earlier one of the same config: it takes the next free
``-N``. ``--resume`` continues the newest one. MLflow gets one parent run per search and one
child run per trial (named after the trial id, so a restarted trial finds and reuses it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import pickle
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import ray.train
import ray.tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher

from flyp_ray.config import (
    POPULATION,
    Config,
    best_first,
    last_best,
    objectives,
    planned_epochs,
    trial_rate,
    with_train,
)
from flyp_ray.distributed import orphans, trainer, verbosity
from flyp_ray.errors import BadInput, ConfigError, FlypRayError, first_line, input_error
from flyp_ray.finetune import wiseft
from flyp_ray.search import budget, pbt, plots, recheck, space
from flyp_ray.search.trial import run_trial
from flyp_ray.search.trial_lines import TrialLines
from flyp_ray.search.tune_row import kept_epochs
from flyp_ray.tracking import inputs, lineage, promotion, registry, runs

if TYPE_CHECKING:
    from flyp_ray.data.digest import DataDigest

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
TRIALS = "trials"  # the folder of the trials' Ray Train runs inside a search's folder
# The trial function only drives its Train run (whose workers hold the real resources), but a
# Tune trial cannot ask for nothing: a sliver of a CPU keeps it schedulable next to the workers.
DRIVER_CPUS = 0.01


@dataclasses.dataclass(frozen=True)
class Search:
    """Where one search lives: its name (Tune's experiment name) and its folder."""

    name: str
    path: str  # storage_path/name: a local path or a URI

    @property
    def trials_storage(self) -> str:
        return f"{self.path}/{TRIALS}"


# --- names and folders ---------------------------------------------------------------------


def base_name(cfg: Config) -> str:
    """``search-<config stem>``: the name of the first search of a config file."""
    stem = Path(cfg.source).stem if not cfg.source.startswith("<") else "config"
    return "search-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "config")


def _existing(cfg: Config) -> list[tuple[int, str]]:
    """(number, name) of the searches of this config under ``storage``, oldest first."""
    fs, root = pyarrow.fs.FileSystem.from_uri(trainer.storage_path(cfg))
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return []
    base = base_name(cfg)
    pattern = re.compile(rf"^{re.escape(base)}(?:-(\d+))?$")
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        match = pattern.match(info.base_name)
        if match and info.type == pyarrow.fs.FileType.Directory:
            found.append((int(match.group(1) or 1), info.base_name))
    return sorted(found)


def locate(cfg: Config, resume: bool) -> Search:
    """The search to run: the newest one of this config to resume, or a fresh, unused name."""
    existing = _existing(cfg)
    if resume:
        if not existing:
            raise BadInput(f"{cfg.source}: storage: no search named {base_name(cfg)}[-N] to "
                           f"resume under {trainer.storage_path(cfg)!r}")
        name = existing[-1][1]
    else:
        name = base_name(cfg) if not existing else f"{base_name(cfg)}-{existing[-1][0] + 1}"
    return Search(name=name, path=search_path(cfg, name))


def search_path(cfg: Config, name: str) -> str:
    """The path of search ``name`` under the config's storage."""
    return f"{trainer.storage_path(cfg).rstrip('/')}/{name}"


def _write_text(path: str, text: str) -> None:
    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(text.encode())


# --- the Tuner -----------------------------------------------------------------------------


class FreeStoppedWorkers(ray.tune.Callback):
    """Free the reserved CPUs/GPUs of Train runs whose trial was killed, about once a second.

    A scheduler stops a trial (and PBT pauses one) by killing its process; its Train runs'
    worker groups then stay reserved until the job ends (:mod:`flyp_ray.distributed.orphans`),
    and later trials would wait for resources that never come. Only a group whose creator is
    dead is freed: freeing the group of a trial still alive made its Train run start a new
    worker group, which nobody then freed.
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.last = -math.inf

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            orphans.free_orphaned()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Tune has just killed the last trials: their controllers die a moment later.
        orphans.settle()


def scheduler(cfg: Config) -> TrialScheduler | None:
    """Early stopping on the first metric, with the epoch as time: ASHA, HyperBand or none; or
    population-based training (:mod:`flyp_ray.search.pbt`).

    None for methods with a single result (``zeroshot``, ``lp``): there is nothing to stop early.
    """
    sched = cfg.search.scheduler
    metric, mode = trainer.selection(cfg)
    epochs = planned_epochs(cfg.train)
    if sched.type in POPULATION:
        return pbt.scheduler(cfg)
    if sched.type == "none" or cfg.train.method in ("zeroshot", "lp"):
        return None
    if sched.type == "asha":
        if sched.grace_period > epochs:
            raise ConfigError(cfg.source, "search.scheduler.grace_period",
                              f"must be <= train.epochs ({epochs}), got {sched.grace_period}")
        return ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=epochs,
                             grace_period=sched.grace_period,
                             reduction_factor=sched.reduction_factor)
    return HyperBandScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=epochs,
                              reduction_factor=sched.reduction_factor)


def check(cfg: Config, resume: bool = False) -> None:
    """Everything about the search that can be checked before Ray and MLflow start."""
    space.searcher(cfg, study_name=base_name(cfg))
    scheduler(cfg)
    if resume:
        check_saved_state(cfg, locate(cfg, resume=True))


# The files Tune restores a search from, each the newest of its pattern in the search folder.
SAVED_STATE = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
               "basic-variant-state-*.json")


def check_saved_state(cfg: Config, search: Search) -> None:
    """Refuse to resume a search whose saved state Tune could not read back.

    Tune writes its state atomically in a staging folder, then copies it into the search
    folder; a driver killed during the copy leaves a file there empty or cut short. Tune then
    logs "Failed to restore the run state", starts over with half of it restored, and waits
    for trials that never come (seen: an empty ``searcher-state-*.pkl``).
    """
    fs, root = pyarrow.fs.FileSystem.from_uri(search.path)
    names = [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))
             if i.type == pyarrow.fs.FileType.File]
    for pattern in SAVED_STATE:
        matching = sorted(n for n in names if fnmatch.fnmatch(n, pattern))
        if matching:
            path = f"{root}/{matching[-1]}"
            with fs.open_input_file(path) as stream:
                content = stream.read()
            if not _readable(content):
                raise BadInput(
                    f"{cfg.source}: --resume: {search.path}/{matching[-1]} is cut short "
                    f"({len(content)} bytes: the search was likely killed while saving it), "
                    f"so Tune cannot restore the search; start a new one without --resume "
                    f"(the finished trials stay in MLflow and in {search.path})")


def _readable(content: bytes) -> bool:
    """Whether a saved state file reads back: Tune writes JSON, or a pickle under either name."""
    try:
        json.loads(content)
        return True
    except ValueError:
        pass
    try:
        pickle.loads(content)  # the search's own folder, which Tune unpickles anyway
        return True
    except Exception:  # noqa: BLE001 - any failure means Tune's would fail too
        return False


def trainable(cfg: Config, search: Search, parent_run_id: str,
              data: DataDigest | None = None) -> Any:
    """The trial function with its fixed arguments and the resources of the driver alone."""
    with_args = ray.tune.with_parameters(run_trial, base=cfg, parent_run_id=parent_run_id,
                                         trials_storage=search.trials_storage, data=data)
    return ray.tune.with_resources(with_args, {"CPU": DRIVER_CPUS})


def build_tuner(cfg: Config, search: Search, parent_run_id: str,
                points: Sequence[space.Point] = (),
                data: DataDigest | None = None) -> ray.tune.Tuner:
    """A fresh Tuner for ``search``: OptunaSearch, the scheduler, and Tune's run settings."""
    if cfg.search.scheduler.type in POPULATION:
        return population_tuner(cfg, search, parent_run_id, points, data)
    searcher: Searcher = space.searcher(cfg, study_name=search.name, points=points)
    stopper = None
    if cfg.search.budget is not None:
        ledger = budget.Ledger(cfg.search.budget.worker_hours, trial_rate(cfg))
        searcher = budget.BudgetSearcher(searcher, ledger)
        stopper = budget.StopAtRung(ledger, budget.rungs(cfg))
    tune_config = ray.tune.TuneConfig(
        num_samples=cfg.search.num_samples,
        max_concurrent_trials=cfg.search.max_concurrent_trials,
        search_alg=searcher,
        scheduler=scheduler(cfg),
    )
    return ray.tune.Tuner(trainable(cfg, search, parent_run_id, data), tune_config=tune_config,
                          run_config=run_config(cfg, search, stopper))


def population_tuner(cfg: Config, search: Search, parent_run_id: str,
                     points: Sequence[space.Point] = (),
                     data: DataDigest | None = None) -> ray.tune.Tuner:
    """A Tuner for PBT/PB2: Tune refuses a searcher beside them, so the first population is
    drawn by Tune's own generator (seeded; warm-start points first) from the space as domains."""
    generator = BasicVariantGenerator(points_to_evaluate=list(points) or None,
                                      random_state=cfg.search.seed)
    # No max_concurrent_trials: validate has made it hold the whole population, and Tune
    # applies it to a Searcher only (it says so, in a line, for a generator).
    tune_config = ray.tune.TuneConfig(num_samples=cfg.search.num_samples,
                                      search_alg=generator, scheduler=scheduler(cfg))
    return ray.tune.Tuner(trainable(cfg, search, parent_run_id, data),
                          param_space=pbt.param_space(cfg), tune_config=tune_config,
                          run_config=run_config(cfg, search))


def run_config(cfg: Config, search: Search, stopper: Any = None) -> ray.tune.RunConfig:
    """Where the search lives, how it treats failed trials, and its callbacks."""
    return ray.tune.RunConfig(
        name=search.name,
        storage_path=trainer.storage_path(cfg),
        # A failed trial is recorded and the search goes on. Tune does not retry it: Ray Train
        # already restarts a trial's workers (resources.max_failures), and a trial that still
        # fails (a diverged loss, a bad value) would fail the same way again.
        failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),
        # Every epoch's result in each trial folder (result.json), whatever the Tune defaults;
        # a line per trial start and end where Tune's status tables are off (verbose=0).
        callbacks=[JsonLoggerCallback(), FreeStoppedWorkers(),
                   TrialLines(cfg, search.trials_storage)],
        stop=stopper,
        verbose=verbosity.tune_verbose(),
    )


def restore_tuner(cfg: Config, search: Search, parent_run_id: str,
                  data: DataDigest | None = None) -> ray.tune.Tuner:
    """The Tuner of an interrupted search; finished trials stay finished, the rest continue."""
    if not ray.tune.Tuner.can_restore(search.path):
        raise BadInput(f"{cfg.source}: {search.path} holds no Tune state to resume (it stopped "
                       f"before its first snapshot); start a fresh search without --resume")
    check_saved_state(cfg, search)
    # Restoring unpickles the searcher state from the search folder: it must be trusted.
    return ray.tune.Tuner.restore(search.path, trainable(cfg, search, parent_run_id, data),
                                  resume_unfinished=True, resume_errored=True)


# --- results -------------------------------------------------------------------------------


def _is_metric(key: str, value: Any) -> bool:
    named = key == "epoch" or ("/" in key and not key.startswith("config/"))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return named and number and math.isfinite(float(value))


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def trial_records(cfg: Config, search: Search) -> list[dict[str, Any]]:
    """One record per trial: id, sampled params, its best epoch's metrics, status, checkpoint."""
    metric, mode = trainer.selection(cfg)
    analysis = ray.tune.ExperimentAnalysis(search.path)
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows = frame.to_dict("records") if frame is not None and len(frame) else []
        rows = rows or ([trial.last_result] if trial.last_result else [])
        rows = with_kept_epochs(rows, kept_epochs(cfg, search.trials_storage, trial.trial_id))
        # Ray Train keeps only the best and the latest checkpoint (of equal ones the later, as
        # _best_row chooses): epochs whose checkpoint is gone lose.
        best = _best_row(_kept(rows) or rows, metric, mode)
        epochs = max((_epoch(r) for r in rows), default=0)
        last: dict[str, Any] = max(rows, key=_epoch, default={})
        selected = wiseft.with_sweep(best or {}, last) if best else {}
        records.append({
            "trial_id": trial.trial_id,
            "params": dict(trial.config),
            "metrics": {k: float(v) for k, v in selected.items() if _is_metric(k, v)},
            "status": _status(trial.status, epochs, planned_epochs(cfg.train)),
            "epochs": epochs,
            "checkpoint": (best or {}).get(CHECKPOINT_PATH_KEY),
            # what the trial spent: Tune's running time of its driver (budgets count it)
            "seconds": max((float(r.get("time_total_s", 0) or 0) for r in rows), default=0.0),
        })
    return records


def with_kept_epochs(rows: list[dict[str, Any]],
                     kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tune's rows of a trial and the ``kept`` epochs (:func:`tune_row.kept_epochs`) they
    lack, in order: a resumed search's trial may have its best epoch among those."""
    seen = {_epoch(r) for r in rows}
    lost = [r for r in kept if _epoch(r) not in seen]
    return sorted(rows + lost, key=_epoch) if lost else rows


def _epoch(row: Mapping[str, Any]) -> int:
    return int(row.get("epoch", 0) or 0)


def _kept(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose checkpoint folder still exists."""
    kept = []
    for row in rows:
        path = row.get(CHECKPOINT_PATH_KEY)
        if isinstance(path, str) and path:
            fs, inner = pyarrow.fs.FileSystem.from_uri(path if "://" in path else
                                                       Path(path).resolve().as_uri())
            if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
                kept.append(row)
    return kept


def _best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if _is_metric(metric, r.get(metric))]
    return last_best(scored, lambda r: float(r[metric]), mode) if scored else None


def _status(tune_status: str, epochs: int, planned: int) -> str:
    """completed | stopped (early, by the scheduler) | failed | Tune's status in lower case."""
    if tune_status == "TERMINATED":
        return "completed" if epochs >= planned else "stopped"
    if tune_status == "ERROR":
        return "failed"
    return tune_status.lower()


def best_record(cfg: Config, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial whose best epoch is best on the first metric (the one FLYP selects on)."""
    metric, mode = trainer.selection(cfg)
    best = None
    for record in records:
        value = record["metrics"].get(metric)
        if value is not None and (best is None or _better(value, best["metrics"][metric], mode)):
            best = record
    return best


def close_trial_runs(cfg: Config, parent_run_id: str, records: Sequence[dict[str, Any]]) -> None:
    """Give each child run its final status and note how its trial ended.

    A trial that the scheduler stopped had its driver killed mid-run: its run was left RUNNING,
    or FAILED by the driver's own error handling while Tune was stopping it. So were its
    few-shot draws' runs, nested under it: Tune stops a trial as soon as it reports its last
    epoch too, while its draws may still be closing their runs. They end as their trial does.
    """
    uri = cfg.tracking.uri
    trial_runs = runs.trial_runs(uri, cfg.tracking.experiment, parent_run_id)
    for record in records:
        run = trial_runs.get(record["trial_id"])
        if run is None:
            continue
        record["mlflow_run_id"] = run.info.run_id
        runs.set_tags(uri, run.info.run_id, {"flyp_ray.status": record["status"],
                                                 "flyp_ray.epochs_done": record["epochs"]})
        if record["status"] in ("completed", "stopped", "failed"):
            status = "FAILED" if record["status"] == "failed" else "FINISHED"
            if run.info.status != status:
                runs.end_run(uri, run.info.run_id, status)
            if cfg.train.repeats > 1:
                for draw in runs.open_children(uri, cfg.tracking.experiment, run.info.run_id):
                    runs.end_run(uri, draw.info.run_id, status)


# --- the search ----------------------------------------------------------------------------


def run_search(cfg: Config, *, resume: bool = False,
               warm_points: Sequence[Mapping[str, Any]] = (),
               parent_run_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Run (or resume) the search of ``cfg``; returns the summary, also written as summary.json.

    ``warm_points`` (best configs of earlier searches) are tried first when
    ``search.warm_start`` is on, together with the best configs of the finished searches in the
    same MLflow experiment. ``parent_run_id`` nests the search's run under another (``compare``)
    and ``name``, unique to the caller, replaces the config's next free search name.
    """
    search = locate(cfg, resume) if name is None else Search(name, search_path(cfg, name))
    uri = cfg.tracking.uri
    data = inputs.measure(cfg)  # once, here: trials and re-checks are handed it
    if resume:
        tags = {runs.KIND_TAG: "search", runs.SEARCH_PATH_TAG: search.path}
        parent = runs.find_run(uri, cfg.tracking.experiment, tags)
        if parent is None:
            raise BadInput(f"{cfg.source}: tracking: no MLflow parent run of {search.path} in "
                           f"experiment {cfg.tracking.experiment!r} to resume")
        runs.reopen_run(uri, parent)
        log.info("resuming search %s (MLflow run %s)", search.path, parent)
        inputs.log_data(uri, parent, data)  # changed data since the start shows as more inputs
        tuner = restore_tuner(cfg, search, parent, data)
    else:
        check(cfg)  # a bad space or scheduler fails before the MLflow run exists
        points = starting_points(cfg, warm_points)
        parent = runs.start_search_run(cfg, search.name, search.path, parent_run_id)
        log.info("search %s under %s (MLflow run %s), %d warm-start point(s)", search.name,
                 search.path, parent, len(points))
        inputs.log_data(uri, parent, data)
        tuner = build_tuner(cfg, search, parent, points, data)
    try:
        grid = tuner.fit()
    except BaseException:
        runs.end_run(uri, parent, "KILLED")
        raise
    summary = finish(cfg, search, parent, data)
    if summary["best_trial_id"] is None:
        refuse_if_bad_input(search, list(grid.errors))
    return summary


def refuse_if_bad_input(search: Search, errors: Sequence[BaseException]) -> None:
    """No trial gave a result: if they stopped on the user's input, say so in one line.

    A trial stopped by a missing image or a metric no report has is not the search's fault:
    the command exits 2 with that line (summary.json is written all the same), where it would
    otherwise end on Ray's traceback of the last trial.
    """
    for error in errors:
        cause = input_error(error)
        if cause is not None:
            raise BadInput(f"{search.name}: every trial stopped on bad input, the first with: "
                           f"{first_line(cause)} (summary: {search.path}/{SUMMARY})") from error


def finish(cfg: Config, search: Search, parent_run_id: str,
           data: DataDigest | None = None) -> dict[str, Any]:
    """Collect the trials, tag the runs, log plots and the best model; write summary.json."""
    records = trial_records(cfg, search)
    close_trial_runs(cfg, parent_run_id, records)
    best = best_record(cfg, records)
    best_config = _best_config(cfg, best)
    summary: dict[str, Any] = {
        "search_name": search.name,
        "search_path": search.path,
        "best_trial_id": best["trial_id"] if best else None,
        "best_config": best_config,
        "best_metrics": best["metrics"] if best else {},
        "best_checkpoint": best["checkpoint"] if best else None,
        "num_trials": len(records),
        "num_completed": sum(r["status"] in ("completed", "stopped") for r in records),
        "num_failed": sum(r["status"] == "failed" for r in records),
        "mlflow_parent_run_id": parent_run_id,
        "registered_model": None,
        "data_digest": data.digest if data is not None else None,
    }
    metrics, _ = objectives(cfg.search)
    if len(metrics) > 1:
        summary["pareto_front"] = pareto_front(cfg, records)
    _log_plots(cfg, parent_run_id, records)
    seconds = [r["seconds"] for r in records]
    if best is not None and best["checkpoint"]:
        if cfg.search.recheck is not None and not _budget_spent(cfg, seconds):
            summary.update(_recheck(cfg, search, parent_run_id, records, data))
            seconds += [run.get("seconds", 0.0) for r in summary["recheck"] for run in r["runs"]]
        else:
            summary["registered_model"] = _register(cfg, best, parent_run_id, data)
    if summary["registered_model"] is not None:
        summary["promotion"] = promotion.decide(cfg, summary["registered_model"]["version"],
                                                _champion_mean(summary))
    if cfg.search.budget is not None:
        summary["budget"] = {"worker_hours": cfg.search.budget.worker_hours,
                             "spent_worker_hours": budget.spent(cfg, seconds)}
    _close_parent(cfg, parent_run_id, summary)
    _write_text(f"{search.path}/{SUMMARY}", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def pareto_front(cfg: Config, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials no other completed trial beats on every objective (Optuna's
    ``best_trials``), with their params and objective values; best on the first metric first."""
    metrics, modes = objectives(cfg.search)
    front = plots.highlighted(plots.study_from_records(cfg, records))
    chosen = best_first((r for r in records if r["trial_id"] in front),
                        lambda r: r["metrics"][metrics[0]], modes[0])
    return [{"trial_id": r["trial_id"], "params": r["params"],
             "metrics": {m: r["metrics"][m] for m in metrics}} for r in chosen]


def _best_config(cfg: Config, best: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The best trial's whole TrainConfig (the sampled values over the fixed ones)."""
    if best is None:
        return None
    return dataclasses.asdict(with_train(cfg, **best["params"]).train)


def _close_parent(cfg: Config, parent_run_id: str, summary: Mapping[str, Any]) -> None:
    uri = cfg.tracking.uri
    metric, mode = trainer.selection(cfg)
    tags: dict[str, Any] = {"flyp_ray.metric": metric, "flyp_ray.mode": mode,
                            "flyp_ray.num_trials": summary["num_trials"],
                            "flyp_ray.num_completed": summary["num_completed"],
                            "flyp_ray.num_failed": summary["num_failed"]}
    if "budget" in summary:
        tags["flyp_ray.budget.worker_hours"] = summary["budget"]["worker_hours"]
        runs.log_metrics(uri, parent_run_id, {
            "budget/spent_worker_hours": summary["budget"]["spent_worker_hours"]}, step=0)
    if summary["best_trial_id"] is not None:
        tags.update({"flyp_ray.best_trial_id": summary["best_trial_id"],
                     "flyp_ray.best_config": json.dumps(summary["best_config"], sort_keys=True),
                     "flyp_ray.best_checkpoint": summary["best_checkpoint"]})
        epoch = int(summary["best_metrics"].get("epoch", 0))
        runs.log_metrics(uri, parent_run_id, summary["best_metrics"], step=epoch)
    runs.set_tags(uri, parent_run_id, tags)
    runs.end_run(uri, parent_run_id, "FINISHED" if summary["best_trial_id"] else "FAILED")


def _log_plots(cfg: Config, parent_run_id: str, records: list[dict[str, Any]]) -> None:
    """Search plots on the parent run."""
    try:
        plots.log_search_plots(cfg, parent_run_id, records)
    except Exception as err:  # noqa: BLE001 - a plot must not cost the search its summary
        log.error("search plots failed (%s: %s); the summary is written without them",
                  type(err).__name__, err)


def _budget_spent(cfg: Config, seconds: Sequence[float]) -> bool:
    """Whether the search spent its budget (then re-checks do not start)."""
    if cfg.search.budget is None or budget.spent(cfg, seconds) < cfg.search.budget.worker_hours:
        return False
    log.warning("re-check skipped: the search has spent its budget of %g worker-hours",
                cfg.search.budget.worker_hours)
    return True


def _recheck(cfg: Config, search: Search, parent_run_id: str, records: Sequence[dict[str, Any]],
             data: DataDigest | None) -> dict[str, Any]:
    """Re-check the best configs with new seeds; crown and register the champion."""
    rechecked = recheck.recheck(cfg, records, parent_run_id, search.path, data)
    champion = recheck.champion(cfg, rechecked)
    out: dict[str, Any] = {"recheck": rechecked, "registered_model": None,
                           "champion_trial_id": champion["trial_id"] if champion else None}
    if champion is None:
        log.error("re-check: no seed of any re-checked config finished; no champion")
        return out
    metrics = objectives(cfg.search)[0]
    uri = cfg.tracking.uri
    runs.set_tags(uri, parent_run_id, {"flyp_ray.champion_trial_id": champion["trial_id"]})
    runs.log_metrics(uri, parent_run_id, {
        **{f"champion/mean/{m}": champion["mean"][m] for m in metrics if m in champion["mean"]},
        **{f"champion/std/{m}": champion["std"][m] for m in metrics if m in champion["std"]}},
        step=0)
    seed = recheck.best_seed(cfg, champion)
    tags = {f"recheck.{kind}.{m}": str(champion[kind][m]) for kind in ("mean", "std")
            for m in metrics if m in champion[kind]}
    seed_cfg = with_train(cfg, **{**champion["config"], "seed": seed["seed"]})
    registered = registry.log_and_register(
        seed_cfg, seed["mlflow_run_id"], seed["checkpoint"], seed["metrics"],
        {**tags, **lineage.tags(cfg, _digest(data)), "recheck.seeds": str(len(champion["seeds"])),
         "recheck.trial_id": champion["trial_id"], "recheck.seed": str(seed["seed"])})
    out["registered_model"] = ({"name": registered[0], "version": registered[1]}
                               if registered else None)
    return out


def _champion_mean(summary: Mapping[str, Any]) -> dict[str, float] | None:
    """The re-check's mean over seeds of the config it crowned (None without a re-check)."""
    return next((r["mean"] for r in summary.get("recheck") or []
                 if r["trial_id"] == summary.get("champion_trial_id")), None)


def _digest(data: DataDigest | None) -> str | None:
    """The data digest taken at the search's start (None where the data could not be read)."""
    return data.digest if data is not None and data.digest else None


def _register(cfg: Config, best: Mapping[str, Any], parent_run_id: str,
              data: DataDigest | None) -> dict[str, str] | None:
    """Log the best trial's model on the search's run and register it."""
    best_cfg = with_train(cfg, **best["params"])
    try:
        registered = registry.log_and_register(best_cfg, parent_run_id, best["checkpoint"],
                                               best["metrics"],
                                               lineage.tags(cfg, _digest(data)))
    except Exception as err:  # noqa: BLE001 - the search is done: keep its summary regardless
        log.error("registering the best model failed (%s: %s)", type(err).__name__, err)
        return None
    if registered is None:
        return None
    name, version = registered
    return {"name": name, "version": version}


# --- warm start and tune-all ---------------------------------------------------------------


def starting_points(cfg: Config, earlier: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The first points of a search with ``search.warm_start``: earlier bests, best first.

    ``earlier`` (this invocation's searches, newest first) come before the best configs of the
    finished searches in the MLflow experiment, which are ranked by the search metric. At most
    half the trials (and at least one) start from a known point; the rest explore.
    """
    if not cfg.search.warm_start:
        return []
    distributions = space.distributions(cfg)
    candidates = list(earlier) + _mlflow_bests(cfg)
    points = space.fitting_points(distributions, candidates, dataclasses.asdict(cfg.train))
    return points[: max(1, cfg.search.num_samples // 2)]


def _mlflow_bests(cfg: Config) -> list[dict[str, Any]]:
    """The best configs of the finished searches on the same metric, best first."""
    metric, mode = trainer.selection(cfg)
    scored = []
    for run in runs.search_runs(cfg.tracking.uri, cfg.tracking.experiment):
        tags = run.data.tags
        value = run.data.metrics.get(metric)
        if tags.get("flyp_ray.metric") != metric or value is None:
            continue
        if "flyp_ray.best_config" in tags:
            scored.append((value, json.loads(tags["flyp_ray.best_config"])))
    return [config for _, config in best_first(scored, lambda vc: vc[0], mode)]


def run_all(configs: Sequence[Config]) -> list[dict[str, Any]]:
    """One search per config, in order; each warm-starts from the bests before it (if asked)."""
    summaries: list[dict[str, Any]] = []
    for cfg in configs:
        earlier = [s["best_config"] for s in reversed(summaries) if s.get("best_config")]
        try:
            summary = run_search(cfg, warm_points=earlier)
        except FlypRayError as err:
            # One data set's failure must not cost the others their searches.
            log.error("%s: search failed: %s", cfg.source, err)
            summary = {"error": str(err)}
        summaries.append({"config": cfg.source, "dataset": cfg.dataset.name, **summary})
    return summaries


def print_table(cfgs: Sequence[Config], summaries: Sequence[Mapping[str, Any]]) -> None:
    """The best result of each data set, one row per config, on stderr."""
    header = ("config", "dataset", "metric", "best", "trial", "done/failed", "model",
              "promotion", "budget (spent)")
    rows = [header]
    for cfg, s in zip(cfgs, summaries, strict=True):
        metric, _ = trainer.selection(cfg)
        value = s.get("best_metrics", {}).get(metric)
        model = s.get("registered_model") or {}
        spent = s.get("budget") or {}
        rows.append((Path(cfg.source).name, cfg.dataset.name, metric,
                     "-" if value is None else f"{value:.4f}",
                     s.get("best_trial_id") or ("unchanged" if s.get("unchanged") else
                                                s.get("error", "-")[:40]),
                     f"{s.get('num_completed', 0)}/{s.get('num_failed', 0)}",
                     f"{model['name']} v{model['version']}" if model else "-",
                     (s.get("promotion") or {}).get("decision", "-"),
                     f"{spent['worker_hours']:.3g} ({spent['spent_worker_hours']:.3g})"
                     if spent else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
              file=sys.stderr)
