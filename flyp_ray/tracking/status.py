"""``flyp-ray status``: where each data set's tuning stands, read from MLflow alone.

Per data set: its registered model, the champion's version with its ID and OOD accuracy (as its
search measured them), the data digest it was trained on and whether the data has changed since
(the digest of now, where the data can be read from here; ``unknown`` where it cannot), the last
search (its MLflow run) and the last promotion decision (the newest version's ``promotion.*``
tags). Nothing else is needed: it works from a laptop against the team's server.

Without configs, every registered model of ``$MLFLOW_TRACKING_URI`` that holds flyp-ray models
(their versions carry a ``dataset`` tag) is listed; the data and its change are then unknown.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flyp_ray.config import Config, objectives
from flyp_ray.tracking import lineage, lock, runs

# The accuracy a person reads as ID and as OOD: test splits where the data set has them.
ID_METRICS = ("id_test/acc", "id_val/acc")
OOD_METRICS = ("ood_test/acc", "ood_val/acc")
DEFAULT_URI = "sqlite:///mlflow.db"  # as tracking.uri's default


def of_config(cfg: Config) -> dict[str, Any]:
    """The status of one config's data set."""
    out: dict[str, Any] = {"config": cfg.source, "dataset": cfg.dataset.name,
                           "registered_model": cfg.tracking.registered_model,
                           "tracking_uri": runs.redact(cfg.tracking.uri)}
    since = lineage.since_champion(cfg)
    out.update(_model(cfg.tracking.uri, since.name, since.champion, objectives(cfg.search)[0][0]))
    out["data_digest_now"] = since.data_digest
    out["data_changed"] = _tell(since.data_changed)
    out["config_changed"] = _tell(since.config_changed)
    out["last_search"] = last_search(cfg.tracking.uri, cfg.tracking.experiment)
    return out


def of_registry(uri: str | None = None) -> list[dict[str, Any]]:
    """The status of every registered model of flyp-ray's in ``uri`` (default:
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if not runs.store_exists(uri):
        return []
    client = runs.client(uri)
    found = []
    for model in client.search_registered_models(max_results=1000):
        if model.name.endswith(lock.SUFFIX):
            continue
        newest = _newest(client, model.name)
        if newest is None or "dataset" not in newest.tags:
            continue
        champion = lineage.champion_version(uri, model.name)
        metric = (champion or newest).tags.get("metric", "")
        entry: dict[str, Any] = {"config": None, "dataset": newest.tags["dataset"],
                                 "registered_model": model.name, "tracking_uri": runs.redact(uri)}
        entry.update(_model(uri, model.name, champion, metric))
        entry.update({"data_digest_now": None, "data_changed": "unknown",
                      "config_changed": "unknown", "last_search": None})
        found.append(entry)
    return found


def _model(uri: str, name: str | None, champion: ModelVersion | None,
           metric: str) -> dict[str, Any]:
    """The champion's entries and the last decision."""
    client = runs.client(uri)
    out: dict[str, Any] = {"champion": None, "last_decision": None}
    if name is None:
        return out
    if champion is not None:
        out["champion"] = {
            "version": str(champion.version),
            "registered": _when(champion.creation_timestamp),
            "metric": metric,
            "metrics": _metrics(client, champion, metric),
            "data_digest": champion.tags.get(lineage.DATA_TAG),
            "config_digest": champion.tags.get(lineage.CONFIG_TAG),
        }
    newest = _newest(client, name) if runs.store_exists(uri) else None
    if newest is not None and "promotion.decision" in newest.tags:
        tags = newest.tags
        out["last_decision"] = {"version": str(newest.version),
                                "decision": tags["promotion.decision"],
                                "compared_with": tags.get("promotion.compared_with") or None,
                                "why": tags.get("promotion.why"),
                                "decided_at": tags.get("promotion.decided_at")}
    return out


def _metrics(client: MlflowClient, version: ModelVersion, metric: str) -> dict[str, float]:
    """The champion's search metric and its ID and OOD accuracy, as its run recorded them (a
    re-check's mean where the version has one)."""
    recorded: dict[str, float] = {}
    if version.run_id:
        try:
            recorded = dict(client.get_run(version.run_id).data.metrics)
        except MlflowException:
            recorded = {}
    recorded.update({k.removeprefix("recheck.mean."): float(v) for k, v in version.tags.items()
                     if k.startswith("recheck.mean.")})
    shown = [metric, next((m for m in ID_METRICS if m in recorded), ""),
             next((m for m in OOD_METRICS if m in recorded), "")]
    return {m: recorded[m] for m in dict.fromkeys(shown) if m in recorded}


def _newest(client: MlflowClient, name: str) -> ModelVersion | None:
    if "'" in name:
        return None
    try:
        found = client.search_model_versions(f"name = '{name}'", max_results=1,
                                             order_by=["version_number DESC"])
    except MlflowException:
        return None
    return found[0] if found else None


def last_search(uri: str, experiment: str) -> dict[str, Any] | None:
    """The newest search run of ``experiment``, whatever its status."""
    if not runs.store_exists(uri):
        return None
    client = runs.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    where = f"tags.`{runs.KIND_TAG}` = 'search'"
    latest = client.search_runs([found.experiment_id], where, max_results=1,
                                order_by=["attributes.start_time DESC"])
    if not latest:
        return None
    run = latest[0]
    return {"name": run.info.run_name, "status": run.info.status,
            "started": _when(run.info.start_time), "mlflow_run_id": run.info.run_id}


def _tell(changed: bool | None) -> bool | str:
    return "unknown" if changed is None else changed


def _when(millis: int | None) -> str | None:
    if not millis:
        return None
    stamp = datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone.utc)
    return stamp.isoformat(timespec="seconds")


# --- the table -------------------------------------------------------------------------------


def table(entries: Sequence[Mapping[str, Any]]) -> str:
    """The statuses as a table for a person, one row per data set."""
    header = ("data set", "model", "champion", "ID", "OOD", "data", "last search",
              "last decision")
    rows = [header] + [_row(e) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _row(entry: Mapping[str, Any]) -> tuple[str, ...]:
    champion = entry.get("champion") or {}
    metrics = champion.get("metrics") or {}
    search = entry.get("last_search") or {}
    decision = entry.get("last_decision") or {}
    return (
        str(entry.get("dataset")),
        str(entry.get("registered_model") or "-"),
        f"v{champion['version']}" if champion else "none",
        _metric(metrics, ID_METRICS),
        _metric(metrics, OOD_METRICS),
        _data(entry, champion),
        f"{search['name']} {search['status'].lower()} {search['started']}" if search else "-",
        f"v{decision['version']} {decision['decision']}" if decision else "-",
    )


def _metric(metrics: Mapping[str, float], names: Sequence[str]) -> str:
    name = next((n for n in names if n in metrics), None)
    return f"{metrics[name]:.3f} {name}" if name else "-"


def _data(entry: Mapping[str, Any], champion: Mapping[str, Any]) -> str:
    trained_on = champion.get("data_digest") or "?"
    changed = entry.get("data_changed")
    if changed == "unknown":
        return f"{trained_on} (now unknown)"
    return f"{trained_on} ({'changed' if changed else 'unchanged'})"
