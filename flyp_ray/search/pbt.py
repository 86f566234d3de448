"""Population-based training: ``search.scheduler.type: pbt`` or ``pb2``, Tune's own schedulers.

The ``search.num_samples`` trials of a search train side by side as one population. Every
``perturbation_interval`` epochs Tune's scheduler ranks them on the search metric; a trial in the
bottom ``quantile_fraction`` stops, takes the checkpoint of a trial in the top share and trains
on from it with new values: PBT multiplies each by 0.8 or 1.2 or draws it afresh from the space
(kept inside the space here), PB2 picks them with a Gaussian-process bandit. So a learning rate
or temperature *schedule* is found inside one population instead of across restarts.

How it maps onto a trial (:func:`run_trial`):

- Tune copies trials through *Tune* checkpoints. A trial reports every epoch as usual and, at the
  perturbation epochs, a Tune checkpoint too: its Train run's checkpoint of that epoch (hard
  links where the storage is local) and :data:`ORIGIN`, which trial and Train run wrote it.
- A trial restarted on another trial's checkpoint trains a new Train run, ``<trial>-e<epoch>``,
  resumed from that checkpoint; its optimizer and schedule take the new rate and decay
  (:func:`flyp_ray.finetune.optim.adopt_values`) and a changed temperature resets the logit
  scale. A trial restarted on its own checkpoint (``--resume``) continues its own Train run.
- MLflow: the trial's run keeps its epochs in one history; every continuation adds an entry
  to the tag ``flyp_ray.pbt.lineage`` (from which trial, at which epoch, with which values) and
  sets ``flyp_ray.pbt.from_trial`` / ``from_epoch``; ``pbt/<field>`` metrics chart the values
  in force, at the epoch they took over. Tune's own record of every exploit is in the search
  folder (``pbt_global.txt``, ``pbt_policy_<trial>.txt``).

What PBT needs is checked before anything starts (:func:`check`): one objective, a space of
fields a running trial can change (:data:`PERTURBABLE`), an interval shorter than the run, the
whole population running at once, and one Train run per trial.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs
import ray.tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.util.queue import Empty, Queue

from flyp_ray.config import Config, ParamSpec, objectives, planned_epochs
from flyp_ray.distributed import trainer
from flyp_ray.errors import ConfigError
from flyp_ray.search.tune_row import final_report
from flyp_ray.tracking import runs

log = logging.getLogger(__name__)

# Train fields a running trial can take new values of: the optimizer's rate and decay, the
# schedule's floor, the logit scale. The rest (batch size, epochs, warm-up, method, ...) shape
# the run itself, and a checkpoint of one run cannot continue as another.
PERTURBABLE = ("lr", "weight_decay", "temperature", "min_lr")
ORIGIN = "pbt_origin.json"  # in a trial's Tune checkpoint: {trial, run, epoch, config}
LINEAGE_TAG = "flyp_ray.pbt.lineage"
P = TypeVar("P", bound=PopulationBasedTraining)


# --- the scheduler -------------------------------------------------------------------------


def scheduler(cfg: Config) -> PopulationBasedTraining:
    """Tune's PBT (or PB2) over the searched train fields, on the first objective per epoch."""
    check(cfg)
    sched, space = cfg.search.scheduler, cfg.search.space
    metric, mode = trainer.selection(cfg)
    common: dict[str, Any] = {"time_attr": "epoch", "metric": metric, "mode": mode,
                              "perturbation_interval": sched.perturbation_interval,
                              "quantile_fraction": sched.quantile_fraction,
                              "custom_explore_fn": clamp(space), "log_config": True,
                              "synch": sched.synch}
    last = planned_epochs(cfg.train)
    if sched.type == "pb2":
        # scikit-learn comes with it: only a pb2 search pays that import
        from ray.tune.schedulers.pb2 import PB2

        bounds: dict[str, Any] = {name: [float(spec.low), float(spec.high)]
                                  for name, spec in space.items()
                                  if spec.low is not None and spec.high is not None}
        return population(PB2, last, synch=sched.synch)(hyperparam_bounds=bounds, **common)
    mutations = param_space(cfg)
    return population(PopulationBasedTraining, last, synch=sched.synch)(
        hyperparam_mutations=mutations, **common)


def population(base: type[P], last_epoch: int, *, synch: bool) -> type[P]:
    """``base`` as a population of Train runs: no decision on a trial's last epoch, and no
    pausing of a trial only so that another can take a turn.

    Tune's schedulers rank a trial at its last epoch too and would copy another trial into it: a
    restart (a new process, a Train run) only to stop at once with a copy of the other's model.
    And in their asynchronous mode they pause any trial that reaches a perturbation epoch while
    another is paused or pending: time-sharing for populations larger than the cluster, but
    every turn restarts a Train run, and a trial copied into another is paused for a moment
    after every exploit. Here a population larger than the cluster runs in waves instead.
    In synchronous mode a pause is how a trial waits for the others at the interval, so it
    stays.
    """

    class Population(base):  # type: ignore[valid-type,misc]
        def on_trial_result(self, tune_controller: Any, trial: Any,
                            result: dict[str, Any]) -> str:
            if float(result.get("epoch", 0)) >= last_epoch:
                return str(TrialScheduler.CONTINUE)
            decision = str(super().on_trial_result(tune_controller, trial, result))
            if decision == TrialScheduler.PAUSE and not synch:
                return str(TrialScheduler.CONTINUE)
            return decision

    Population.__name__ = base.__name__  # what Tune's logs and status lines name
    return Population


def param_space(cfg: Config) -> dict[str, Any]:
    """The space as Tune domains: the first population is drawn from it, and PBT redraws from it."""
    return {name: domain(spec) for name, spec in cfg.search.space.items()}


def domain(spec: ParamSpec) -> Any:
    if spec.type == "categorical":
        return list(spec.choices or [])
    assert spec.low is not None and spec.high is not None  # config checks a range's ends
    if spec.type == "int":
        return ray.tune.randint(int(spec.low), int(spec.high) + 1)
    if spec.log:
        return ray.tune.loguniform(spec.low, spec.high)
    return ray.tune.uniform(spec.low, spec.high)


def clamp(space: dict[str, ParamSpec]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """PBT's explore step scales values by 0.8 or 1.2 without looking at the space's bounds:
    keep every value inside its range (and whole where the field is an int)."""

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        for name, spec in space.items():
            if spec.type == "categorical" or spec.low is None or spec.high is None:
                continue
            value = min(max(config[name], spec.low), spec.high)
            config[name] = int(round(value)) if spec.type == "int" else float(value)
        return config

    return explore


def check(cfg: Config) -> None:
    """What PBT needs of the config, each refusal naming its key."""
    search, src, kind = cfg.search, cfg.source, cfg.search.scheduler.type
    metrics, _ = objectives(search)
    if len(metrics) > 1:
        raise ConfigError(src, "search.metric", f"{kind} ranks trials on one metric; got "
                                                f"{len(metrics)} ({', '.join(metrics)})")
    if cfg.train.method in ("zeroshot", "lp"):
        raise ConfigError(src, "train.method", f"{kind} continues trials epoch by epoch; "
                                               f"{cfg.train.method} has no epochs to continue")
    fixed = [name for name in search.space if name not in PERTURBABLE]
    if fixed or not search.space:
        raise ConfigError(src, f"search.space.{fixed[0]}" if fixed else "search.space",
                          f"{kind} changes values inside a running trial, which works for "
                          f"{', '.join(PERTURBABLE)} only; search the others with asha")
    if kind == "pb2":
        for name, spec in search.space.items():
            if spec.type == "categorical":
                raise ConfigError(src, f"search.space.{name}.type", "pb2 models numeric ranges; "
                                                                    "use pbt for choices")
    epochs, interval = planned_epochs(cfg.train), search.scheduler.perturbation_interval
    if interval >= epochs:
        raise ConfigError(src, "search.scheduler.perturbation_interval",
                          f"must be < train.epochs ({epochs}), or no trial is ever continued "
                          f"from another; got {interval}")
    if search.max_concurrent_trials < search.num_samples:
        raise ConfigError(src, "search.max_concurrent_trials",
                          f"must be >= search.num_samples ({search.num_samples}) under {kind}: "
                          f"the population trains side by side; got "
                          f"{search.max_concurrent_trials}")
    refusals = {
        "train.repeats": (cfg.train.repeats > 1,
                          "a trial of few-shot draws has one Train run per draw, none to copy"),
        "search.recheck": (search.recheck is not None,
                           "a trial's values change while it trains: no one config to re-train"),
        "search.budget": (search.budget is not None,
                          "a budget stops a searcher's new trials; a population starts at once"),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise ConfigError(src, key, f"not with {kind}: {why}")


# --- one trial -----------------------------------------------------------------------------


class ReportThrough(UserCallback):  # type: ignore[misc]
    """Ray Train's ``TuneReportCallback``, through a queue the trial reads itself: Tune's own
    carries metrics only, and PBT needs a Tune checkpoint with them."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        path = checkpoint.path if checkpoint is not None else None
        self.queue.put({**metrics[0], CHECKPOINT_PATH_KEY: path})


def run_trial(cfg: Config, trial_id: str, run_id: str) -> None:
    """Train one member of the population: its own Train run, or one continued from the
    checkpoint Tune handed it; report every epoch, with a Tune checkpoint at the intervals."""
    origin = _origin(ray.tune.get_checkpoint())
    name, resume_from, perturbed = trial_id, None, []
    logged = runs.last_step(cfg.tracking.uri, run_id, "epoch")
    if origin is not None and origin["trial"] == trial_id:
        name = origin["run"]  # its own run again (a resumed search): Ray resumes its latest
    elif origin is not None:
        name = f"{trial_id}-e{origin['epoch']}"
        resume_from = origin["path"]
        perturbed = [k for k in cfg.search.space
                     if getattr(cfg.train, k) != origin["config"].get(k)]
    last = _last_report(cfg.storage, name)
    if origin is None:
        _log_values(cfg, run_id, epoch=0)
    elif resume_from is not None and last is None:  # a new continuation, not a resumed one
        _log_lineage(cfg, run_id, origin, perturbed)
        # The line goes on from the other trial's epoch; this trial had logged none after it
        # unless Tune let it go past (then the history goes back, and on from there).
        logged = min(logged, int(origin["epoch"]))
    report = _Reporter(cfg, trial_id, name, run_id, logged)
    if last is not None and int(last.get("epoch", 0)) > (origin or {}).get("epoch", 0):
        # The Train run got further than Tune's checkpoint before its trial stopped (it
        # trains on while Tune decides): that epoch is this line's, and nobody logged it.
        report(last)
    queue: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    fit = trainer.build_trainer(cfg, name, mlflow_run_id=run_id, resume_from=resume_from,
                                perturbed=perturbed, callbacks=[ReportThrough(queue)])
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=_fit, args=(fit, outcome), daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            report(queue.get(timeout=0.5))
        except Empty:
            continue
    while not queue.empty():
        report(queue.get())
    # Epochs an MLflow outage held back: a last, longer try before the trial ends.
    runs.flush(cfg.tracking.uri, run_id, retries=runs.FINAL_FLUSH_RETRIES)
    if "error" in outcome:
        raise outcome["error"]
    if report.epochs == 0 and outcome["result"].metrics:
        # The Train run had finished before this restart: report its last epoch again.
        report(final_report(outcome["result"]))


def _last_report(storage: str, name: str) -> dict[str, Any] | None:
    """The last report of Train run ``name`` (with its checkpoint's path), if it has run."""
    result = trainer.stored_result(f"{storage.rstrip('/')}/{name}")
    return final_report(result) if result is not None else None


def _fit(fit: Any, outcome: dict[str, Any]) -> None:
    try:
        outcome["result"] = fit.fit()
    except BaseException as err:  # noqa: BLE001 - handed to the trial's thread, raised there
        outcome["error"] = err


class _Reporter:
    """Each Train report to Tune, with a Tune checkpoint at every perturbation epoch, and to
    the trial's MLflow run.

    The trial logs its epochs, not the Train run's worker: the worker trains on while Tune
    decides at a perturbation epoch, and if Tune stops the trial there (to continue it from
    another's checkpoint), what it trained meanwhile is not this trial's line. ``ray.tune.report``
    returns only once Tune has let the trial go on, so an epoch logged here, before its report
    and after the previous one's, is on the line that continues: each epoch once.
    """

    def __init__(self, cfg: Config, trial_id: str, run: str, run_id: str, logged: int) -> None:
        self.cfg, self.trial_id, self.run, self.run_id = cfg, trial_id, run, run_id
        self.interval = cfg.search.scheduler.perturbation_interval
        self.logged = logged  # the last epoch in the trial's MLflow run
        self.epochs = 0

    def __call__(self, row: dict[str, Any]) -> None:
        self.epochs += 1
        epoch, path = int(row.get("epoch", 0)), row.get(CHECKPOINT_PATH_KEY)
        if epoch > self.logged:
            runs.log_metrics(self.cfg.tracking.uri, self.run_id, row, step=epoch)
            self.logged = epoch
        if not path or epoch % self.interval:
            ray.tune.report(row)
            return
        with tempfile.TemporaryDirectory(prefix="pbt-") as folder:
            _gather(path, Path(folder))
            origin = {"trial": self.trial_id, "run": self.run, "epoch": epoch,
                      "config": {k: getattr(self.cfg.train, k) for k in self.cfg.search.space}}
            (Path(folder) / ORIGIN).write_text(json.dumps(origin))
            # Tune copies the folder into the trial's own storage before report returns.
            ray.tune.report(row, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def _gather(path: str, folder: Path) -> None:
    """The files of the Train checkpoint at ``path`` into ``folder``: hard links on a local
    disk (no bytes copied twice), a download from other storage."""
    fs, inner = pyarrow.fs.FileSystem.from_uri(path if "://" in path else
                                               Path(path).resolve().as_uri())
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        for source in Path(inner).rglob("*"):
            target = folder / source.relative_to(inner)
            if source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system under the temp folder: copy instead
                target.write_bytes(source.read_bytes())
        return
    pyarrow.fs.copy_files(inner, str(folder), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


def _origin(restored: ray.tune.Checkpoint | None) -> dict[str, Any] | None:
    """Who wrote the Tune checkpoint a trial starts on, and where it is; None without one."""
    if restored is None:
        return None
    fs = restored.filesystem
    assert fs is not None  # Tune's checkpoints always carry theirs
    with fs.open_input_stream(f"{restored.path.rstrip('/')}/{ORIGIN}") as stream:
        origin: dict[str, Any] = json.loads(stream.read())
    origin["path"] = (restored.path if isinstance(fs, pyarrow.fs.LocalFileSystem)
                      else f"{fs.type_name}://{restored.path}")
    return origin


# --- MLflow lineage ------------------------------------------------------------------------


def _log_lineage(cfg: Config, run_id: str, origin: dict[str, Any], perturbed: list[str]) -> None:
    """Tag the trial's run with where it continues from, and chart the values from here."""
    uri = cfg.tracking.uri
    tags = runs.client(uri).get_run(run_id).data.tags
    lineage = json.loads(tags.get(LINEAGE_TAG, "[]"))
    entry = {"from_trial": origin["trial"], "from_epoch": origin["epoch"],
             "values": {k: getattr(cfg.train, k) for k in cfg.search.space}, "changed": perturbed}
    if lineage[-1:] != [entry]:  # a resumed search may start the same continuation again
        lineage.append(entry)
    runs.set_tags(uri, run_id, {LINEAGE_TAG: json.dumps(lineage),
                                "flyp_ray.pbt.from_trial": origin["trial"],
                                "flyp_ray.pbt.from_epoch": origin["epoch"]})
    _log_values(cfg, run_id, epoch=int(origin["epoch"]))
    log.info("continuing from trial %s at epoch %d with %s", origin["trial"], origin["epoch"],
             ", ".join(f"{k}={getattr(cfg.train, k):.4g}" for k in cfg.search.space))


def _log_values(cfg: Config, run_id: str, epoch: int) -> None:
    values = {f"pbt/{k}": float(getattr(cfg.train, k)) for k in cfg.search.space
              if isinstance(getattr(cfg.train, k), (int, float))}
    runs.log_metrics(cfg.tracking.uri, run_id, values, step=epoch)
