"""Plots of a search, logged as PNG artifacts (``plots/``) of its MLflow parent run.

The trials are rebuilt as an Optuna study from the search's records with Optuna's public API
(``optuna.create_study``, ``optuna.trial.create_trial``), so that Optuna's own matplotlib plots
draw them: optimisation history, parameter importances, parallel coordinates. A scatter of ID
against OOD accuracy shows every trial's robustness trade-off, with the selected trial (one
metric) or the Pareto front (several metrics) marked.

A plot is a convenience: any failure is logged as a warning and never reaches the search.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # drawn by a headless driver: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import optuna  # noqa: E402
from optuna.distributions import BaseDistribution  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from flyp_ray.config import Config, objectives  # noqa: E402
from flyp_ray.search.space import distributions  # noqa: E402
from flyp_ray.tracking import runs

log = logging.getLogger(__name__)

Record = Mapping[str, Any]  # {"trial_id": str, "params": dict, "metrics": dict, "status": str}

ARTIFACT_PATH = "plots"
# Ray Tune's TERMINATED (also what an ASHA-stopped trial ends as) and Optuna/MLflow spellings.
FINISHED = frozenset({"TERMINATED", "COMPLETE", "COMPLETED", "FINISHED"})
# The accuracy pairs the ID-vs-OOD plot tries, validation first (what selection looks at).
ID_OOD_PAIRS = (("id_val/acc", "ood_val/acc"), ("id_test/acc", "ood_test/acc"))
TRIAL_ID = "trial_id"  # user attribute that ties a FrozenTrial back to its record


def log_search_plots(cfg: Config, parent_run_id: str, records: Sequence[Record]) -> None:
    """Draw the search's plots and log them to the parent run; warns instead of raising."""
    try:
        study = study_from_records(cfg, records)
        with tempfile.TemporaryDirectory() as tmp:
            written = draw_all(cfg, study, records, Path(tmp))
            if written:
                runs.log_artifacts(cfg.tracking.uri, parent_run_id, tmp, ARTIFACT_PATH)
        log.debug("search plots: %s", ", ".join(written) or "none (no completed trial)")
    except Exception as err:  # noqa: BLE001 - plots must never fail a finished search
        log.warning("search plots skipped: %s: %s", type(err).__name__, str(err)[:300])


# --- the study -----------------------------------------------------------------------------


def study_from_records(cfg: Config, records: Sequence[Record]) -> optuna.Study:
    """An in-memory Optuna study holding one frozen trial per usable record."""
    metrics, modes = objectives(cfg.search)
    directions: list[Literal["minimize", "maximize"]] = [
        "maximize" if mode == "max" else "minimize" for mode in modes]
    study = optuna.create_study(directions=directions)
    space = distributions(cfg)
    for record in records:
        trial = frozen_trial(record, space, metrics)
        if trial is not None:
            study.add_trial(trial)
    return study


def frozen_trial(record: Record, space: Mapping[str, BaseDistribution],
                 metrics: Sequence[str]) -> FrozenTrial | None:
    """A record as an Optuna trial: COMPLETE with its metrics if it finished with all of them,
    FAIL otherwise; None (with a warning) if its params do not fit the space."""
    given = record.get("params") or {}
    params = {name: given[name] for name in space if name in given}
    values = [_number(record.get("metrics") or {}, m) for m in metrics]
    finished = str(record.get("status", "")).upper() in FINISHED
    complete = finished and all(v is not None for v in values)
    try:
        return optuna.trial.create_trial(
            state=TrialState.COMPLETE if complete else TrialState.FAIL,
            values=[float(v) for v in values if v is not None] if complete else None,
            params=params, distributions={name: space[name] for name in params},
            user_attrs={TRIAL_ID: str(record.get("trial_id"))})
    except ValueError as err:  # a value outside its distribution, e.g. from an older space
        log.warning("search plots: trial %s left out (%s)", record.get("trial_id"), err)
        return None


def _number(metrics: Mapping[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --- the plots -----------------------------------------------------------------------------


def draw_all(cfg: Config, study: optuna.Study, records: Sequence[Record],
             folder: Path) -> list[str]:
    """Write every plot the trials allow into ``folder``; returns the file names."""
    metrics, _ = objectives(cfg.search)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    varying = varying_params(complete)
    plots: dict[str, Callable[[], Any]] = {}
    for i, metric in enumerate(metrics):
        suffix = "" if len(metrics) == 1 else f"_{_slug(metric)}"
        name = f"optimization_history{suffix}"
        plots[name] = functools.partial(optuna_plots.plot_optimization_history, study,
                                        target=_target(study, i), target_name=metric)
    # Importances need a spread to explain: two trials and a parameter that took two values.
    if len(complete) >= 2 and varying:
        plots["param_importances"] = lambda: optuna_plots.plot_param_importances(
            study, params=varying, target=_lower_is_better(study, 0), target_name=metrics[0])
    if varying:
        plots["parallel_coordinate"] = lambda: optuna_plots.plot_parallel_coordinate(
            study, params=varying, target=_target(study, 0), target_name=metrics[0])
    plots["id_vs_ood"] = lambda: id_vs_ood(study, records)
    return [name for name, draw in plots.items() if _save(name, draw, folder)]


def varying_params(trials: Sequence[FrozenTrial]) -> list[str]:
    """The parameters that took more than one value among ``trials``."""
    seen: dict[str, set[str]] = {}
    for trial in trials:
        for name, value in trial.params.items():
            seen.setdefault(name, set()).add(repr(value))
    return sorted(name for name, values in seen.items() if len(values) > 1)


def _target(study: optuna.Study, index: int) -> Callable[[FrozenTrial], float] | None:
    # Optuna plots a single objective by itself and needs a target for one of several.
    if len(study.directions) == 1:
        return None
    return lambda trial: float(trial.values[index])


def _lower_is_better(study: optuna.Study, index: int) -> Callable[[FrozenTrial], float] | None:
    # Optuna's default importance evaluator reads a custom target as "lower is better".
    if len(study.directions) == 1:
        return None
    sign = -1.0 if study.directions[index] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return lambda trial: sign * float(trial.values[index])


def _save(name: str, draw: Callable[[], Any], folder: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Said of every custom target; _lower_is_better already orients it.
            warnings.filterwarnings("ignore", message=".*importances of params to achieve low")
            # Said when a search has too few trials to rank (the plot is drawn all the same).
            warnings.filterwarnings("ignore", message=".*quantiles select the same set of trials")
            drawn = draw()
    except Exception as err:  # noqa: BLE001 - one plot failing leaves the others
        log.warning("search plots: %s skipped: %s: %s", name, type(err).__name__, str(err)[:200])
        plt.close("all")
        return False
    if drawn is None:
        return False
    figure = drawn.figure if hasattr(drawn, "figure") else drawn[0].figure  # Axes or array
    figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return True


def id_vs_ood(study: optuna.Study, records: Sequence[Record]) -> Any:
    """A scatter of ID against OOD accuracy, one point per trial; None without such metrics."""
    pair = next((p for p in ID_OOD_PAIRS if any(_has(r, p) for r in records)), None)
    if pair is None:
        return None
    points = {str(r.get("trial_id")): (float(r["metrics"][pair[0]]), float(r["metrics"][pair[1]]))
              for r in records if _has(r, pair)}
    figure, ax = plt.subplots(figsize=(6, 5))
    xs, ys = zip(*points.values(), strict=True)
    ax.scatter(xs, ys, c="tab:blue", alpha=0.7, label="trial")
    marked = highlighted(study)
    label = "Pareto front" if len(study.directions) > 1 else "selected trial"
    front = sorted(points[t] for t in marked if t in points)
    if front:
        fx, fy = zip(*front, strict=True)
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="tab:red", linewidths=2,
                   label=label)
        if len(front) > 1:
            ax.plot(fx, fy, color="tab:red", linewidth=1, alpha=0.6)
    return _finish_id_vs_ood(ax, pair, "ID vs OOD accuracy of every trial")


def _has(record: Record, pair: tuple[str, str]) -> bool:
    metrics = record.get("metrics") or {}
    return all(_number(metrics, name) is not None for name in pair)


def highlighted(study: optuna.Study) -> set[str]:
    """Trial ids of the selected trial (one objective) or of the Pareto front (several)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return set()
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    return {str(t.user_attrs.get(TRIAL_ID)) for t in best}


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")


def save_compare_plot(table: Sequence[Mapping[str, Any]],
                      curves: Mapping[str, Sequence[tuple[float, float, float]]],
                      path: Path) -> bool:
    """The methods' ID-vs-OOD scatter with each WiSE-FT curve, as a PNG; False if not drawn.

    Each method is a filled point; its WiSE-FT curve runs from the zero-shot model (alpha 0) to
    it (alpha 1), with the alpha chosen on id_val ringed.
    """
    points = [t for t in table if t.get("id_acc") is not None and t.get("ood_acc") is not None]
    if not points:
        return False
    return _save(path.stem, lambda: _compare_axes(points, curves), path.parent)


def _compare_axes(points: Sequence[Mapping[str, Any]],
                  curves: Mapping[str, Sequence[tuple[float, float, float]]]) -> Any:
    figure, ax = plt.subplots(figsize=(7, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(points):
        color = colors[i % len(colors)]
        curve = curves.get(str(t["method"]), [])
        if len(curve) > 1:
            ax.plot([c[1] for c in curve], [c[2] for c in curve], color=color, alpha=0.6,
                    marker=".", linewidth=1)
        if t.get("wiseft_id_acc") is not None and t.get("wiseft_ood_acc") is not None:
            ax.scatter([t["wiseft_id_acc"]], [t["wiseft_ood_acc"]], s=140, facecolors="none",
                       edgecolors=color, linewidths=2)
        ax.scatter([t["id_acc"]], [t["ood_acc"]], color=color, s=60, label=str(t["method"]),
                   zorder=3)
    return _finish_id_vs_ood(ax, (points[0]["id_metric"], points[0]["ood_metric"]),
                             "Methods compared; lines: WiSE-FT from zero-shot (alpha 0) to "
                             "finetuned (1)")


def _finish_id_vs_ood(ax: Any, pair: tuple[str, str], title: str) -> Any:
    """Axis labels naming the two metrics, the title, grid and legend of an ID-vs-OOD plot."""
    ax.set_xlabel(f"ID accuracy ({pair[0]})")
    ax.set_ylabel(f"OOD accuracy ({pair[1]})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return ax
