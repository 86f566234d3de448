"""What a person reads when a command is done: a few lines and a small table, not the JSON.

The JSON result (summary.json, or a command's last stdout line) has everything; these texts
have what a user acts on: the selected metrics on every split, the chosen hyperparameters, the
registered model, where the results are and the page of MLflow's UI that shows the runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flyp_ray.config import SPLITS, Config, objectives
from flyp_ray.distributed.trainer import TrainOutcome, selection
from flyp_ray.tracking import runs

Column = Mapping[str, str]  # metric name -> the cell's text


def on_splits(metric: str, *columns: Mapping[str, Any]) -> list[str]:
    """``id_val/acc`` -> the same measure on every evaluation split the columns have."""
    split, _, name = metric.partition("/")
    if split not in SPLITS or not name:
        return [metric]
    keys = [f"{s}/{name}" for s in SPLITS[1:]]
    # ImageNet's shift sets: ood_test/<set>/<name>
    keys += sorted({k for c in columns for k in c if k.startswith("ood_test/")
                    and k.endswith(f"/{name}") and k.count("/") == 2})
    return [k for k in keys if any(k in c for c in columns)]


def table(columns: Mapping[str, Column], keys: Sequence[str]) -> list[str]:
    """Rows of ``keys``, a column per entry of ``columns`` (``-`` where one has no value)."""
    width = max((len(k) for k in keys), default=0)
    sizes = {h: max([len(h)] + [len(c.get(k, "-")) for k in keys]) for h, c in columns.items()}
    lines = [" " * width + "".join(f"  {h:>{sizes[h]}}" for h in columns)]
    for key in keys:
        lines.append(f"{key:<{width}}" + "".join(f"  {c.get(key, '-'):>{sizes[h]}}"
                                                 for h, c in columns.items()))
    return lines


def numbers(metrics: Mapping[str, float]) -> dict[str, str]:
    return {k: f"{v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float))}


def champion(summary: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The re-checked config that won (``champion_trial_id``), if the search re-checked."""
    return next((r for r in summary.get("recheck") or []
                 if r["trial_id"] == summary.get("champion_trial_id")), None)


def chosen(cfg: Config, params: Mapping[str, Any] | None) -> str:
    """The searched hyperparameters of a config, as ``lr=0.000122, weight_decay=0.00607``."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in (params or {}).items() if k in cfg.search.space)


def look_at_it(cfg: Config) -> list[str]:
    """How to open the runs in MLflow's UI: the command for a database store, and the page."""
    uri = cfg.tracking.uri
    page = runs.ui_address(uri, cfg.tracking.experiment)
    if uri.startswith(("http://", "https://")):
        return [f"look at it   {page or runs.redact(uri)}"]
    lines = [f"look at it   mlflow ui --backend-store-uri {runs.redact(uri)}"]
    return lines + ([f"             then {page}"] if page else [])


def search_text(cfg: Config, summary: Mapping[str, Any], *,
                first: Mapping[str, Column] | None = None, best_label: str = "best trial",
                title: str | None = None) -> str:
    """The end of a search: its table (``first``'s columns before the best trial's, then the
    champion's mean +- std), the best trial's hyperparameters, champion, model, files, UI."""
    metric = selection(cfg)[0]
    best = summary.get("best_metrics") or {}
    won = champion(summary)
    columns: dict[str, Column] = {**(first or {}), best_label: numbers(best)}
    if won:
        columns["champion"] = {k: f"{v:.3f} +- {won['std'].get(k, 0.0):.3f}"
                               for k, v in won["mean"].items()}
    keys = [k for m in objectives(cfg.search)[0] for k in on_splits(m, *columns.values())]
    model = summary.get("registered_model") or {}
    done = (f"{summary.get('num_trials', 0)} trials: {summary.get('num_completed', 0)} "
            f"finished, {summary.get('num_failed', 0)} failed")
    lines = ["", title or f"flyp-ray tune: {summary.get('search_name')} done, {done}",
             *table(columns, list(dict.fromkeys(keys)) or [metric]), ""]
    lines.append(f"best trial   {summary.get('best_trial_id')}  "
                 f"{chosen(cfg, summary.get('best_config'))}")
    if won:
        assert cfg.search.recheck is not None
        lines.append(f"champion     {won['trial_id']}  (the best mean over {len(won['seeds'])} "
                     f"new seeds of the {cfg.search.recheck.top_k} best trials)")
    lines.append(f"model        models:/{model.get('name')}/{model.get('version')}"
                 f"{promotion_note(summary.get('promotion'))}" if model
                 else "model        (not registered)")
    lines.append(f"results      {summary.get('search_path')}/summary.json")
    return "\n".join([*lines, *look_at_it(cfg)])


def promotion_note(decided: Mapping[str, Any] | None) -> str:
    """What the registry did with the search's model, for the model line."""
    if not decided:
        return ""
    champion = decided.get("champion_version")
    if decided.get("decision") == "first":
        return "  (the first version: champion)"
    if decided.get("decision") == "promoted":
        return f"  (promoted: champion, over version {champion})"
    if champion is None:
        return "  (kept as challenger: no decision could be made; see its promotion.why tag)"
    return f"  (kept as challenger: version {champion} stays champion)"


def train_text(cfg: Config, outcome: TrainOutcome) -> str:
    """The end of ``flyp-ray train``: the selected epoch's metrics on every split, and where."""
    metrics = outcome.metrics
    keys = [k for m in objectives(cfg.search)[0] for k in on_splits(m, metrics)]
    return "\n".join(["", f"flyp-ray train: done, the epoch best on {selection(cfg)[0]} is "
                          f"{outcome.best_epoch}",
                      *table({"selected": numbers(metrics)}, list(dict.fromkeys(keys))), "",
                      f"checkpoint   {outcome.checkpoint}",
                      f"MLflow run   {outcome.mlflow_run_id}", *look_at_it(cfg)])


def eval_text(model: str, metrics: Mapping[str, float]) -> str:
    """The end of ``flyp-ray eval``: accuracy, macro F1 and worst-group accuracy per split."""
    names = ("acc", "macro_f1", "worst_group_acc")
    splits = dict.fromkeys(k.rsplit("/", 1)[0] for k in metrics if k.rsplit("/", 1)[-1] in names)
    columns = {n: {s: f"{metrics[f'{s}/{n}']:.3f}" for s in splits if f"{s}/{n}" in metrics}
               for n in names}
    return "\n".join(["", f"flyp-ray eval: {model}", *table(columns, list(splits))])


def compare_text(summary: Mapping[str, Any]) -> str:
    """The end of ``flyp-ray compare``: its Markdown table (table.md) and its folder."""
    written = Path(summary["folder"]) / "table.md"
    body = [line for line in (written.read_text().splitlines() if written.is_file() else [])
            if not line.startswith("# ")]
    return "\n".join(["", "flyp-ray compare: done", *body, f"results      {summary['folder']}"])
