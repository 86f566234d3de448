"""``flyp-ray compare``: every method on one data set, side by side, with the same budget.

Each method (``zeroshot``, ``lp``, ``ce``, ``lpft``, ``flyp``) runs through the same loop, data
path and evaluation: one ``train`` run each, or with ``--tune`` one search each with the config's
``search`` section (the same number of trials for every method that has something to search;
``zeroshot`` trains nothing and ``lp`` picks its regularisation on id_val by itself, so each runs
once). The methods run at the same time, one Ray task each. Every finetuned method is also
evaluated with WiSE-FT. The result is the paper-style table (Markdown and CSV) and an ID-vs-OOD
scatter with each method's WiSE-FT curve, written to a folder and logged to a ``compare`` MLflow
run under which every method's run is nested.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from flyp_ray.config import Config, with_train
from flyp_ray.distributed import draws, trainer, verbosity
from flyp_ray.errors import BadInput, first_line
from flyp_ray.finetune.wiseft import name as alpha_name
from flyp_ray.search import plots
from flyp_ray.search import tune as search_mod
from flyp_ray.tracking import runs

log = logging.getLogger(__name__)

METHODS = ("zeroshot", "lp", "ce", "lpft", "flyp")
SEARCHED = ("ce", "lpft", "flyp")  # methods whose TrainConfig values a search changes
DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]
# The accuracy the table calls ID and OOD: test splits where the data set has them.
ID_METRICS = ("id_test/acc", "id_val/acc")
OOD_METRICS = ("ood_test/acc", "ood_val/acc")


@dataclasses.dataclass
class Row:
    """One method's line of the table."""

    method: str
    trials: int
    metrics: dict[str, float]
    mlflow_run_id: str | None = None
    error: str | None = None


def parse_methods(text: str) -> list[str]:
    """``zeroshot,lp,...`` as a list; an unknown name is a BadInput naming it."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BadInput(f"--methods: unknown method {unknown[0] if unknown else text!r} "
                       f"(choose from {', '.join(METHODS)})")
    return methods


def method_config(cfg: Config, method: str) -> Config:
    """``cfg`` for one method: its ``train.method`` and, for finetuned ones, WiSE-FT's alphas."""
    alphas = None if method == "zeroshot" else (cfg.train.wiseft_alphas or DEFAULT_ALPHAS)
    return with_train(cfg, method=method, wiseft_alphas=alphas)


def run_method(cfg: Config, method: str, tune: bool, parent_run_id: str, label: str) -> Row:
    """Train or search one method; a failure becomes the row's error, never the comparison's.

    ``label`` (the comparison's folder name) names the method's search: the searches run at the
    same time and would otherwise race for the config's next free search name.
    """
    mcfg = method_config(cfg, method)
    verbosity.ray_process(method)  # a Ray task of its own: its lines, named after the method
    try:
        if tune and method in SEARCHED:
            summary = search_mod.run_search(mcfg, parent_run_id=parent_run_id,
                                            name=f"{label}-{method}")
            return Row(method, int(summary["num_trials"]), searched_metrics(summary),
                       summary["mlflow_parent_run_id"])
        outcome = draws.train(mcfg, name=f"{trainer.new_name(mcfg)}-{method}",
                              parent_run_id=parent_run_id)
        return Row(method, 1, outcome.metrics, outcome.mlflow_run_id)
    except Exception as err:  # noqa: BLE001 - Ray Train's errors share no narrower base
        reason = first_line(err)
        log.error("compare: %s failed: %s", method, reason)
        return Row(method, 0, {}, error=reason)


def searched_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """A search's row: its champion's mean over the re-check seeds where the config asked for
    a re-check (the best trial's own figures are biased upwards), else the best trial's."""
    champion = next((r for r in summary.get("recheck") or []
                     if r["trial_id"] == summary.get("champion_trial_id")), None)
    return dict(champion["mean"] if champion else summary["best_metrics"])


def run_methods(cfg: Config, methods: Sequence[str], tune: bool, parent_run_id: str,
                label: str) -> list[Row]:
    """Every method at once, each driven by a Ray task of its own; rows in ``methods`` order.

    Side by side, the comparison takes as long as its slowest method where the cluster has room
    for all of them, and Ray queues the runs where it has not. A process per method, not a
    thread: Ray Tune keeps process-wide state (its trainable registry, the main thread's signal
    handlers), so two searches cannot share a driver. The tasks reserve no CPU: they only wait
    on runs whose workers reserve their own. Each task's process exits when its method is done
    (``max_calls=1``) rather than idle in Ray's pool holding a driver's worth of state.
    """
    task = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(run_method)
    pending = [task.remote(cfg, method, tune, parent_run_id, label) for method in methods]
    return [_row(method, ref) for method, ref in zip(methods, pending, strict=True)]


def _row(method: str, ref: ray.ObjectRef) -> Row:
    """The task's row; a task that died (its process killed) becomes an error row too."""
    try:
        row: Row = ray.get(ref)
        return row
    except ray.exceptions.RayError as err:
        reason = first_line(err)
        log.error("compare: %s stopped: %s", method, reason)
        return Row(method, 0, {}, error=reason)


def pick(metrics: Mapping[str, float], names: Sequence[str], prefix: str = "") -> str | None:
    """The first of ``names`` that ``metrics`` has (under ``prefix``)."""
    return next((n for n in names if f"{prefix}{n}" in metrics), None)


def table_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The table as dicts: ID and OOD accuracy, with and without WiSE-FT."""
    out = []
    for row in rows:
        m = row.metrics
        id_name, ood_name = pick(m, ID_METRICS), pick(m, OOD_METRICS)
        wise = "wiseft/best/alpha" in m
        out.append({
            "method": row.method,
            "trials": row.trials,
            "id_val_acc": m.get("id_val/acc"),
            "id_acc": m.get(id_name) if id_name else None,
            "ood_acc": m.get(ood_name) if ood_name else None,
            "wiseft_alpha": m.get("wiseft/best/alpha") if wise else None,
            "wiseft_id_acc": m.get(f"wiseft/best/{id_name}") if wise and id_name else None,
            "wiseft_ood_acc": m.get(f"wiseft/best/{ood_name}") if wise and ood_name else None,
            "id_metric": id_name,
            "ood_metric": ood_name,
            "error": row.error,
        })
    return out


COLUMNS = ("method", "trials", "id_val_acc", "id_acc", "ood_acc", "wiseft_alpha",
           "wiseft_id_acc", "wiseft_ood_acc", "id_metric", "ood_metric", "error")


def to_csv(table: Sequence[Mapping[str, Any]]) -> str:
    """The table as CSV (empty cells for what a method does not have)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for line in table:
        writer.writerow({k: "" if line.get(k) is None else line[k] for k in COLUMNS})
    return buffer.getvalue()


def _cell(value: Any, percent: bool = True) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:g}"


def to_markdown(table: Sequence[Mapping[str, Any]], title: str) -> str:
    """The paper-style table: accuracy in percent, WiSE-FT at the alpha chosen on id_val."""
    first = next((t for t in table if t["id_metric"]), {})
    id_name, ood_name = first.get("id_metric") or "ID", first.get("ood_metric") or "OOD"
    lines = [f"# {title}", "",
             f"| method | trials | id_val acc | ID ({id_name}) | OOD ({ood_name}) | WiSE-FT alpha "
             f"| WiSE-FT ID | WiSE-FT OOD |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        if t["error"]:
            lines.append(f"| {t['method']} | {t['trials']} | failed: {t['error']} |||||||")
            continue
        lines.append(
            f"| {t['method']} | {t['trials']} | {_cell(t['id_val_acc'])} | {_cell(t['id_acc'])} "
            f"| {_cell(t['ood_acc'])} | {_cell(t['wiseft_alpha'], percent=False)} "
            f"| {_cell(t['wiseft_id_acc'])} | {_cell(t['wiseft_ood_acc'])} |")
    lines += ["", "Accuracy in percent. WiSE-FT: the mix of zero-shot and finetuned weights whose "
              "alpha is best on id_val/acc."]
    return "\n".join(lines) + "\n"


def curves(rows: Sequence[Row]) -> dict[str, list[tuple[float, float, float]]]:
    """Each method's WiSE-FT curve: (alpha, ID acc, OOD acc) for every alpha it has."""
    out = {}
    for row in rows:
        m = row.metrics
        id_name, ood_name = pick(m, ID_METRICS), pick(m, OOD_METRICS)
        if not id_name or not ood_name:
            continue
        points = []
        for alpha in _alphas(m):
            prefix = f"wiseft/{alpha_name(alpha)}/"
            if f"{prefix}{id_name}" in m and f"{prefix}{ood_name}" in m:
                points.append((alpha, m[f"{prefix}{id_name}"], m[f"{prefix}{ood_name}"]))
        out[row.method] = points
    return out


def _alphas(metrics: Mapping[str, float]) -> list[float]:
    found = set()
    for key in metrics:
        parts = key.split("/")
        if parts[0] == "wiseft" and parts[1] != "best":
            found.add(float(parts[1]))
    return sorted(found)


def output_folder(cfg: Config) -> Path:
    """``<storage>/compare-<config stem>-<id>``, or a temporary folder for remote storage."""
    stem = "config" if cfg.source.startswith("<") else Path(cfg.source).stem
    name = f"compare-{stem}-{uuid.uuid4().hex[:8]}"
    if "://" in cfg.storage:  # the files still reach MLflow, which is where people look
        return Path(tempfile.mkdtemp(prefix="flyp_ray_")) / name
    return Path(trainer.storage_path(cfg)) / name


def run_compare(cfg: Config, methods: Sequence[str], *, tune: bool = False) -> dict[str, Any]:
    """Run every method, write the table and the plot, log them to MLflow; returns the summary."""
    folder = output_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.uri
    parent = runs.start_run(cfg, folder.name, {runs.KIND_TAG: "compare",
                                                  "flyp_ray.methods": ",".join(methods),
                                                  "flyp_ray.search.tune": str(tune).lower()})
    rows = run_methods(cfg, methods, tune, parent, folder.name)
    table = table_rows(rows)
    (folder / "table.md").write_text(to_markdown(table, f"{cfg.dataset.name}: methods compared"))
    (folder / "table.csv").write_text(to_csv(table))
    plotted = plots.save_compare_plot(table, curves(rows), folder / "id_vs_ood.png")
    summary = {"folder": str(folder), "table": table, "mlflow_run_id": parent,
               "plot": str(folder / "id_vs_ood.png") if plotted else None,
               "runs": {r.method: r.mlflow_run_id for r in rows}}
    (folder / "compare.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    for t in table:
        values = {f"{t['method']}/{k}": v for k, v in t.items()
                  if isinstance(v, float) and k not in ("method",)}
        runs.log_metrics(uri, parent, values, step=0)
    runs.log_artifacts(uri, parent, folder, "compare")
    failed = any(r.error for r in rows)
    runs.end_run(uri, parent, "FAILED" if failed and all(r.error for r in rows) else "FINISHED")
    return summary
