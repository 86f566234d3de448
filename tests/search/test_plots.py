"""Search plots: records in, PNG artifacts of the parent run out (real Optuna, real MLflow)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from flyp_ray import config
from flyp_ray.search import plots
from flyp_ray.tracking import runs
from tests.support.configs import tiny_config, write_config

PNG = b"\x89PNG\r\n\x1a\n"
SPACE = {"lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True},
         "weight_decay": {"type": "float", "low": 0.0, "high": 0.3}}


def record(trial_id: str, lr: float, wd: float, id_acc: float | None, ood_acc: float | None,
           status: str = "TERMINATED") -> dict[str, Any]:
    metrics = {"epoch": 2.0}
    if id_acc is not None:
        metrics["id_val/acc"] = id_acc
    if ood_acc is not None:
        metrics["ood_val/acc"] = ood_acc
    return {"trial_id": trial_id, "params": {"lr": lr, "weight_decay": wd, "epochs": 2},
            "metrics": metrics, "status": status}


RECORDS = [
    record("t1", 1e-4, 0.1, 0.60, 0.40),
    record("t2", 3e-4, 0.2, 0.70, 0.35),  # best ID
    record("t3", 1e-3, 0.0, 0.55, 0.45),  # best OOD
    record("t4", 2e-3, 0.3, 0.50, 0.30),  # dominated by t1
    record("t5", 5e-3, 0.1, None, None, status="ERROR"),
]


@dataclasses.dataclass(frozen=True)
class Search:
    path: Path
    client: MlflowClient

    def config(self, *overrides: str) -> config.Config:
        return config.load(self.path, overrides)

    def plots_of(self, records: list[dict[str, Any]], *overrides: str) -> dict[str, bytes]:
        """Run log_search_plots on a fresh parent run; the PNG files it logged, by name."""
        cfg = self.config(*overrides)
        parent = runs.start_run(cfg, "search", {runs.KIND_TAG: "search"})
        plots.log_search_plots(cfg, parent, records)
        found = self.client.list_artifacts(parent, plots.ARTIFACT_PATH)
        out = {}
        for item in found:
            local = self.client.download_artifacts(parent, item.path)
            out[Path(item.path).name] = Path(local).read_bytes()
        return out


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Search:
    tmp = tmp_path_factory.mktemp("plots")
    raw = tiny_config(tmp, search={"space": SPACE, "metric": "id_val/acc", "mode": "max"})
    path = write_config(tmp / "search.yaml", raw)
    return Search(path, MlflowClient(config.load(path).tracking.uri))


def test_all_plots_logged_as_png(search: Search) -> None:
    files = search.plots_of(RECORDS)
    assert set(files) == {"optimization_history.png", "param_importances.png",
                          "parallel_coordinate.png", "id_vs_ood.png"}
    for name, content in files.items():
        assert content.startswith(PNG) and len(content) > 5000, name


def test_one_trial_does_not_crash(search: Search) -> None:
    files = search.plots_of(RECORDS[:1])
    # Nothing varies with one trial: no importances, no parallel coordinates.
    assert set(files) == {"optimization_history.png", "id_vs_ood.png"}


def test_no_completed_trial_logs_nothing(search: Search) -> None:
    assert search.plots_of([RECORDS[-1]]) == {}
    assert search.plots_of([]) == {}


def test_multi_objective_names_each_history_and_marks_pareto_front(search: Search) -> None:
    overrides = ("search.metric=[id_val/acc, ood_val/acc]", "search.mode=[max, max]")
    files = search.plots_of(RECORDS, *overrides)
    assert {"optimization_history_id_val_acc.png", "optimization_history_ood_val_acc.png",
            "param_importances.png", "parallel_coordinate.png", "id_vs_ood.png"} == set(files)
    study = plots.study_from_records(search.config(*overrides), RECORDS)
    assert plots.highlighted(study) == {"t1", "t2", "t3"}


def test_single_objective_marks_the_selected_trial(search: Search) -> None:
    study = plots.study_from_records(search.config(), RECORDS)
    assert plots.highlighted(study) == {"t2"}
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE"] * 4 + ["FAIL"]


def test_min_mode_and_out_of_space_trial(search: Search) -> None:
    # A metric where lower is better: the values of id_val/acc, read as id_val/loss.
    records = [{**r, "metrics": {k.replace("id_val/acc", "id_val/loss"): v
                                 for k, v in r["metrics"].items()}}
               for r in [*RECORDS[:4], record("outside", 0.5, 0.1, 0.99, 0.99)]]
    cfg = search.config("search.metric=id_val/loss", "search.mode=min")
    study = plots.study_from_records(cfg, records)
    assert plots.highlighted(study) == {"t4"}  # lowest id_val/loss; 'outside' is left out
    assert len(study.trials) == 4
