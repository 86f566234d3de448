"""Every method end to end on real Ray Train and MLflow, the comparison table, few-shot repeats.

(A two-objective search's Pareto front is checked by tests/search/test_tune.py's ASHA search.)

Uses the session's shared local Ray and a test-written WILDS-format iWildCam folder read by the
real WILDS loader, with the tiny model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flyp_ray.config import from_dict
from flyp_ray.distributed import draws
from flyp_ray.search import compare
from flyp_ray.tracking import registry, runs
from tests.support.configs import tiny_config

pytestmark = pytest.mark.slow


def wilds_config(tmp: Path, root: Path, train: dict[str, object] | None = None,
                 **sections: dict[str, object]) -> dict[str, object]:
    return tiny_config(tmp, dataset={"name": "iwildcam", "root": str(root), "subsample": 16},
                       train={"epochs": 1, "batch_size": 8, "warmup_steps": 1,
                              "wiseft_alphas": [0.0, 0.5, 1.0], **(train or {})}, **sections)


def test_compare_runs_every_method_and_writes_the_table(
        ray_session: None, tmp_path: Path, wilds_root: Path) -> None:
    cfg = from_dict(wilds_config(tmp_path, wilds_root), str(tmp_path / "iwildcam.yaml"))
    summary = compare.run_compare(cfg, list(compare.METHODS))
    table = {row["method"]: row for row in summary["table"]}
    assert list(table) == list(compare.METHODS)
    for method, row in table.items():
        assert row["error"] is None, (method, row["error"])
        assert row["id_metric"] == "id_test/acc" and row["ood_metric"] == "ood_test/acc"
        assert 0 <= row["id_acc"] <= 1 and 0 <= row["ood_acc"] <= 1
        assert (row["wiseft_alpha"] is None) == (method == "zeroshot")
    folder = Path(summary["folder"])
    assert "| lpft | 1 |" in (folder / "table.md").read_text()
    with open(folder / "table.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == list(compare.METHODS)
    assert (folder / "id_vs_ood.png").stat().st_size > 1000

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags[runs.KIND_TAG] == "compare"
    assert parent.data.metrics["flyp/ood_acc"] == table["flyp"]["ood_acc"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/table.md", "compare/table.csv", "compare/id_vs_ood.png"} <= artifacts
    spans = []
    for method, run_id in summary["runs"].items():
        run = client.get_run(run_id)
        assert run.data.tags[runs.PARENT_TAG] == parent.info.run_id
        assert run.data.params["method"] == method
        assert run.data.metrics["ood_test/acc"] == table[method]["ood_acc"]
        spans.append((run.info.start_time, run.info.end_time))
    # Side by side: every method's run had started before the first one ended.
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    lp_run = client.get_run(summary["runs"]["lp"])
    assert lp_run.data.metrics["lp/l2"] in cfg.train.lp_l2
    assert "wiseft/0.5/ood_test/acc" in client.get_run(summary["runs"]["ce"]).data.metrics
    # A baseline's logged model is its image tower and trained head, and scores as in training.
    logged = registry.evaluate_model(cfg, f"runs:/{summary['runs']['lpft']}/model")
    assert logged["ood_test/acc"] == pytest.approx(table["lpft"]["ood_acc"])


def test_a_failed_method_becomes_a_row_and_the_others_go_on(
        ray_session: None, tmp_path: Path, wilds_root: Path) -> None:
    # An empty search space fails ce's search inside its task (the CLI would refuse it before
    # starting); zeroshot has nothing to search and runs.
    raw = wilds_config(tmp_path, wilds_root, search={"space": {}})
    cfg = from_dict(raw, str(tmp_path / "iwildcam.yaml"))

    summary = compare.run_compare(cfg, ["ce", "zeroshot"], tune=True)

    rows = {row["method"]: row for row in summary["table"]}
    assert list(rows) == ["ce", "zeroshot"]
    assert "search.space: is empty" in rows["ce"]["error"]
    assert rows["zeroshot"]["error"] is None and 0 <= rows["zeroshot"]["ood_acc"] <= 1
    assert "| ce | 0 | failed: " in (Path(summary["folder"]) / "table.md").read_text()
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_few_shot_repeats_report_mean_and_std(
        ray_session: None, tmp_path: Path, wilds_root: Path) -> None:
    raw = wilds_config(tmp_path, wilds_root, train={"k_shot": 1, "repeats": 2, "batch_size": 4,
                                                    "wiseft_alphas": None})
    cfg = from_dict(raw, str(tmp_path / "fewshot.yaml"))
    outcome = draws.train(cfg)
    metrics = outcome.metrics
    assert metrics["repeats"] == 2 and "id_val/acc_std" in metrics
    # Each draw is a run nested under the train run; the outcome is the mean of the draws'
    # values at the selected epoch, which the train run holds per epoch.
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    found = client.search_runs(
        [experiment], f"tags.`{runs.PARENT_TAG}` = '{outcome.mlflow_run_id}'")
    assert sorted(r.data.tags[draws.DRAW_TAG] for r in found) == ["0", "1"]
    epoch = outcome.best_epoch
    values = [next(m.value for m in client.get_metric_history(r.info.run_id, "id_val/acc")
                   if m.step == epoch) for r in found]
    assert metrics["id_val/acc"] == pytest.approx(sum(values) / 2)
    logged = {m.step: m.value
              for m in client.get_metric_history(outcome.mlflow_run_id, "id_val/acc")}
    assert logged[epoch] == pytest.approx(metrics["id_val/acc"])


def test_a_rechecked_search_gives_its_champions_mean() -> None:
    summary = {"best_metrics": {"id_val/acc": 0.9}, "champion_trial_id": "b",
               "recheck": [{"trial_id": "a", "mean": {"id_val/acc": 0.7}},
                           {"trial_id": "b", "mean": {"id_val/acc": 0.8}}]}
    assert compare.searched_metrics(summary) == {"id_val/acc": 0.8}
    assert compare.searched_metrics({"best_metrics": {"id_val/acc": 0.9}}) == {"id_val/acc": 0.9}
