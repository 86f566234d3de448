"""MLflow: the one module that talks to the tracking server.

Runs are addressed by id through ``MlflowClient`` (never the global "active run"), because the
run is created by the driver and written to by a Ray worker in another process. A tracking error
is logged and retried, never raised into training: a flaky server must not kill a trial.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from flyp_ray.config import Config, to_dict, train_params
from flyp_ray.errors import ConfigError

log = logging.getLogger(__name__)

KIND_TAG = "flyp_ray.kind"
TRIAL_TAG = "flyp_ray.trial_id"
PARENT_TAG = "mlflow.parentRunId"
RETRIES = 3
# A process's last try before it exits: backoff 1 + 2 + ... + 64 s, about two minutes for
# MLflow to return.
FINAL_FLUSH_RETRIES = 7

# MLflow's UI reads this experiment tag to choose an experiment's first page; without it, its
# GenAI overview (traces). Its UI code (3.17) knows genai_development, custom_model_development
# (shown as "Machine learning", and offered by its experiment-type selector with the GenAI kind),
# finetuning, forecasting, classification, regression, automl and *_inferred variants; every
# kind but genai_development opens on the runs, and maps to the "machine_learning" workflow.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI has a workflow switch (GenAI / Machine learning) in its sidebar, remembered
# by the browser, GenAI at first, and it takes precedence over the tag; a page address that
# names the workflow opens on it whatever the browser remembers.
UI_RUNS_PAGE = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default

# The runs' Source column: the command that made the run (the command line sets it).
COMMAND_ENV = "FLYP_RAY_COMMAND"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
# MLflow's UI shows a LOCAL source by the part after its last "/" (a config file's name alone)
# and a JOB's whole name: "flyp-ray tune search_spaces/iwildcam.yaml". A command is a job.
SOURCE_TYPE = "JOB"
COMMANDS = {"search": "tune", "trial": "tune", "recheck": "tune"}  # by flyp_ray.kind

T = TypeVar("T")


def redact(uri: str) -> str:
    """A tracking URI with any password or token replaced by ``***``."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password and not parts.query:
        return uri  # urlunsplit would also rewrite sqlite://// paths, so touch nothing
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    query = re.sub(r"(?i)((?:token|password|secret|key)[^=&]*=)[^&]*", r"\1***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(query=query))


def check_uri(uri: str, source: str) -> None:
    """Fail fast (before Ray starts) on a tracking URI that cannot work."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")).expanduser()
        if not path.parent.exists():
            raise ConfigError(source, "tracking.uri", f"folder of the database does not exist: "
                                                      f"{redact(uri)!r}")
    elif scheme in ("http", "https"):
        _check_server(uri, source)
    elif scheme in ("", "file"):
        raise ConfigError(source, "tracking.uri", f"MLflow 3 has no file store; use sqlite:///"
                                                  f"mlflow.db or a server, got {redact(uri)!r}")
    elif not _has_store(uri):
        raise ConfigError(source, "tracking.uri", f"MLflow has no tracking store for {scheme}:// "
                                                  f"(sqlite:///<file>, postgresql://, mysql://, "
                                                  f"mssql://, http(s)://<server>, databricks), "
                                                  f"got {redact(uri)!r}")


def _has_store(uri: str) -> bool:
    """Whether MLflow's own registry of tracking stores takes ``uri``'s scheme."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types for this
        return False
    return True


def store_exists(uri: str) -> bool:
    """Whether the tracking store already exists (a sqlite file; a server always does)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser().is_file()
    return True


def _check_server(uri: str, source: str) -> None:
    import requests  # mlflow's own dependency; only needed for this check

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException as err:
        raise ConfigError(source, "tracking.uri", f"MLflow server unreachable at {redact(uri)!r} "
                                                  f"({type(err).__name__})") from None


def client(uri: str) -> MlflowClient:
    """A client bound to ``uri`` (also sets it for the model APIs that use the global URI)."""
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _retry(what: str, fn: Callable[[], T],
           retries: int = RETRIES) -> tuple[bool, T | None]:
    """Run ``fn``, retrying with backoff; (False, None) if it keeps failing, logged."""
    for attempt in range(retries):
        try:
            return True, fn()
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            wait = 2.0**attempt
            log.warning("MLflow %s failed (%s: %s); retry %d/%d in %.0fs", what,
                        type(err).__name__, str(err)[:200], attempt + 1, retries, wait)
            time.sleep(wait)
    log.error("MLflow %s failed %d times; carrying on without it", what, retries)
    return False, None


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing, with MLflow's experiment kind.

    An existing experiment without the kind tag gets it; one with a kind keeps it (someone may
    have chosen another in the UI).
    """
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return str(mlflow_client.create_experiment(
                name, artifact_location=artifact_location(mlflow_client.tracking_uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
        except MlflowException as err:
            # Another search of the same experiment, started at the same moment, created it first.
            found = mlflow_client.get_experiment_by_name(name)
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS) or found is None:
                raise
    if EXPERIMENT_KIND_TAG not in found.tags:
        try:
            mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG,
                                             EXPERIMENT_KIND)
        except Exception as err:  # noqa: BLE001 - a UI hint must not stop a run (read-only user)
            log.warning("could not tag experiment %r as %s (%s: %s)", name, EXPERIMENT_KIND,
                        type(err).__name__, str(err)[:200])
    return str(found.experiment_id)


def source_tags(mlflow_client: MlflowClient, cfg: Config,
                tags: Mapping[str, str]) -> dict[str, str]:
    """The Source of a new run: its parent's (a trial, a re-check, a compared method), else the
    command that runs (``FLYP_RAY_COMMAND``, which the command line sets), else the command
    that makes runs of its kind, with the config."""
    parent = tags.get(PARENT_TAG)
    if parent:
        try:
            found = mlflow_client.get_run(parent).data.tags
        except Exception as err:  # noqa: BLE001 - the Source column must not stop a run
            log.debug("no source from parent run %s (%s)", parent, err)
        else:
            copied = {k: found[k] for k in (SOURCE_NAME_TAG, SOURCE_TYPE_TAG) if k in found}
            if copied:
                return copied
    command = os.environ.get(COMMAND_ENV) or (
        f"flyp-ray {COMMANDS.get(tags.get(KIND_TAG, ''), tags.get(KIND_TAG, 'train'))} "
        f"{cfg.source}")
    return {SOURCE_NAME_TAG: command, SOURCE_TYPE_TAG: SOURCE_TYPE}


def ui_address(uri: str, experiment: str) -> str | None:
    """Where MLflow's UI shows the runs of ``experiment``: the server's page, or the page of
    ``mlflow ui`` on this machine for a database store; None if the experiment is unknown."""
    _, found = _retry("get_experiment_by_name", lambda: MlflowClient(
        tracking_uri=uri).get_experiment_by_name(experiment), retries=1)
    if found is None:
        return None
    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/{UI_RUNS_PAGE.format(experiment_id=found.experiment_id)}"


def artifact_location(uri: str) -> str | None:
    """Beside the database for ``sqlite:///`` stores; the server's own choice otherwise.

    MLflow's default for a database store is ``./mlruns`` under whatever folder the process
    happens to run in, which scatters a search's models over working directories.
    """
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (database.parent / "mlartifacts").as_uri()


def start_run(cfg: Config, run_name: str, tags: Mapping[str, str]) -> str:
    """Create a run with the flat TrainConfig as params and the whole config as an artifact."""
    mlflow_client = client(cfg.tracking.uri)
    exp = experiment_id(mlflow_client, cfg.tracking.experiment)
    run = mlflow_client.create_run(exp, run_name=run_name,
                                   tags={**source_tags(mlflow_client, cfg, tags), **tags})
    run_id = str(run.info.run_id)
    params = [Param(k, str(v)) for k, v in train_params(cfg.train).items()]
    params += [Param("dataset", cfg.dataset.name), Param("model.arch", cfg.model.arch),
               Param("model.pretrained", str(cfg.model.pretrained)),
               Param("workers", str(cfg.resources.workers))]
    mlflow_client.log_batch(run_id, params=params)
    mlflow_client.log_dict(run_id, to_dict(cfg), "config.yaml")
    return run_id


# Metrics that could not be sent, per (tracking URI, run): sent first with the next batch.
# MLflow's own async logging drops a batch that fails while the server is down; this does not.
_PENDING: dict[tuple[str, str], list[Metric]] = {}
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log one epoch's metrics with ``step=epoch``; kept and replayed if MLflow is away."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _numeric(v)]
    _PENDING.setdefault((uri, run_id), []).extend(batch)
    flush(uri, run_id)


def flush(uri: str, run_id: str, retries: int = RETRIES) -> bool:
    """Send the run's pending metrics; True when nothing is left. Never raises."""
    pending = _PENDING.get((uri, run_id), [])
    while pending:
        chunk = pending[:MAX_BATCH]
        sent, _ = _retry("log_metrics", lambda chunk=chunk: MlflowClient(  # type: ignore[misc]
            tracking_uri=uri).log_batch(run_id, metrics=chunk), retries)
        if not sent:
            log.warning("%d metric values of run %s kept to send later", len(pending), run_id)
            return False
        del pending[:len(chunk)]
    _PENDING.pop((uri, run_id), None)
    return True


def log_progress(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> bool:
    """Log throughput readings once, best effort: never retried, kept or raised.

    A reading is stale by the next one, so a failed one is dropped rather than sent later
    (and never holds up the per-epoch metrics, which :func:`log_metrics` keeps until sent).
    """
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _numeric(v)]
    try:
        MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=batch)
    except Exception as err:  # noqa: BLE001 - progress must never stop training
        log.debug("MLflow progress reading dropped (%s: %s)", type(err).__name__, err)
        return False
    return True


def last_step(uri: str, run_id: str, key: str) -> int:
    """The highest step of metric ``key`` in the run (-1 if none, or if MLflow is away)."""
    _, history = _retry("get_metric_history", lambda: MlflowClient(
        tracking_uri=uri).get_metric_history(run_id, key))
    # -1, not 0: a zero-shot run reports its one result as epoch 0.
    return max((m.step for m in history or []), default=-1)


def _numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a run; retried, never raises."""
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    _retry("set_tags", lambda: MlflowClient(tracking_uri=uri).log_batch(run_id, tags=batch))


def log_artifacts(uri: str, run_id: str, folder: Path | str, artifact_path: str) -> None:
    """Upload a folder as artifacts of the run; retried, never raises."""
    _retry("log_artifacts", lambda: MlflowClient(tracking_uri=uri).log_artifacts(
        run_id, str(folder), artifact_path))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close the run (FINISHED, FAILED or KILLED); retried, never raises."""
    _retry("end_run", lambda: MlflowClient(tracking_uri=uri).set_terminated(run_id, status))


# --- searches: one parent run per search, one child run per trial --------------------------

SEARCH_NAME_TAG = "flyp_ray.search_name"
SEARCH_PATH_TAG = "flyp_ray.search_path"


def _quoted(value: str) -> str:
    """A string literal for an MLflow filter (which has no escape for a quote)."""
    if "'" in value:
        raise ValueError(f"cannot search MLflow for a value with a quote: {value!r}")
    return f"'{value}'"


def find_run(uri: str, experiment: str, tags: Mapping[str, str]) -> str | None:
    """The newest run of ``experiment`` that carries all of ``tags``, or None."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    where = " and ".join(f"tags.`{k}` = {_quoted(v)}" for k, v in tags.items())
    runs = mlflow_client.search_runs([found.experiment_id], where, max_results=1,
                                     order_by=["attributes.start_time DESC"])
    return str(runs[0].info.run_id) if runs else None


def search_params(cfg: Config) -> dict[str, str]:
    """The search spec and the fixed settings of a search as flat MLflow params."""
    search = to_dict(cfg)["search"]
    params = {f"search.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
              for k, v in search.items() if k not in ("space", "scheduler")}
    params.update({f"search.scheduler.{k}": str(v) for k, v in search["scheduler"].items()})
    params.update({f"search.space.{k}": json.dumps(v, sort_keys=True)
                   for k, v in search["space"].items()})
    params.update({f"train.{k}": str(v) for k, v in train_params(cfg.train).items()})
    params.update({"dataset": cfg.dataset.name, "model.arch": cfg.model.arch,
                   "model.pretrained": str(cfg.model.pretrained),
                   "workers": str(cfg.resources.workers)})
    return params


def start_search_run(cfg: Config, name: str, path: str, parent_run_id: str | None = None) -> str:
    """Create the parent run of a search: the search spec as params, the config as artifact."""
    mlflow_client = client(cfg.tracking.uri)
    exp = experiment_id(mlflow_client, cfg.tracking.experiment)
    tags = {KIND_TAG: "search", SEARCH_NAME_TAG: name, SEARCH_PATH_TAG: path}
    if parent_run_id is not None:
        tags[PARENT_TAG] = parent_run_id
    tags.update(source_tags(mlflow_client, cfg, tags))
    run_id = str(mlflow_client.create_run(exp, run_name=name, tags=tags).info.run_id)
    mlflow_client.log_batch(run_id, params=[Param(k, v) for k, v in search_params(cfg).items()])
    mlflow_client.log_dict(run_id, to_dict(cfg), "config.yaml")
    return run_id


def start_trial_run(cfg: Config, parent_run_id: str, trial_id: str) -> str:
    """Create a trial's child run, named after the trial id, with the flat TrainConfig as params."""
    tags = {KIND_TAG: "trial", PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id}
    return start_run(cfg, trial_id, tags)


def trial_runs(uri: str, experiment: str, parent_run_id: str) -> dict[str, Run]:
    """The child runs of a search by trial id (the newest run where a trial id repeats)."""
    mlflow_client = client(uri)
    exp = experiment_id(mlflow_client, experiment)
    runs = mlflow_client.search_runs([exp], f"tags.`{PARENT_TAG}` = {_quoted(parent_run_id)}",
                                     order_by=["attributes.start_time ASC"])
    return {run.data.tags[TRIAL_TAG]: run for run in runs if TRIAL_TAG in run.data.tags}


def open_children(uri: str, experiment: str, parent_run_id: str) -> list[Run]:
    """The runs nested under ``parent_run_id`` that are still RUNNING."""
    mlflow_client = client(uri)
    exp = experiment_id(mlflow_client, experiment)
    where = f"tags.`{PARENT_TAG}` = {_quoted(parent_run_id)} and attributes.status = 'RUNNING'"
    return list(mlflow_client.search_runs([exp], where))


def search_runs(uri: str, experiment: str) -> list[Run]:
    """The finished parent runs of searches in ``experiment``, newest first."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    where = f"tags.`{KIND_TAG}` = 'search' and attributes.status = 'FINISHED'"
    return list(mlflow_client.search_runs([found.experiment_id], where,
                                          order_by=["attributes.start_time DESC"]))


def status(uri: str, run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, FAILED, KILLED), or None if MLflow cannot say."""
    _, run = _retry("get_run", lambda: MlflowClient(tracking_uri=uri).get_run(run_id))
    return None if run is None else str(run.info.status)


def duration_s(uri: str, run_id: str) -> float:
    """How long a finished run ran, in seconds (0 if MLflow cannot say)."""
    _, run = _retry("get_run", lambda: MlflowClient(tracking_uri=uri).get_run(run_id))
    if run is None or not run.info.end_time or not run.info.start_time:
        return 0.0
    return (run.info.end_time - run.info.start_time) / 1000


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed search); retried, never raises."""
    _retry("reopen_run", lambda: MlflowClient(tracking_uri=uri).update_run(run_id, "RUNNING"))
