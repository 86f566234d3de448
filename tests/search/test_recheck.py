"""Re-checks and budgets: real searches (Ray Tune + Optuna + Ray Train) tracked in a real MLflow
server, and the pieces that decide them in one process."""

from __future__ import annotations

import pickle
import statistics
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from flyp_ray import config, preflight
from flyp_ray.errors import ConfigError
from flyp_ray.search import budget, recheck, tune
from flyp_ray.tracking import runs
from tests.support.configs import LR_SPACE, tiny_config, write_config


def search_config(tmp: Path, tracking_uri: str, experiment: str, **search: Any) -> config.Config:
    raw = tiny_config(tmp, dataset={"subsample": 32},
                      train={"epochs": 1, "batch_size": 16, "warmup_steps": 1},
                      search={"space": LR_SPACE, "scheduler": {"type": "none"},
                              "max_concurrent_trials": 2, **search},
                      tracking={"uri": tracking_uri, "experiment": experiment,
                                "registered_model": f"{experiment}-model"})
    return config.load(write_config(tmp / "c.yaml", raw))


def recheck_runs(client: MlflowClient, experiment: str, parent: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    where = (f"tags.`{runs.KIND_TAG}` = '{recheck.KIND}' and "
             f"tags.`{runs.PARENT_TAG}` = '{parent}'")
    return list(client.search_runs([exp.experiment_id], where))


@pytest.mark.slow
def test_recheck_crowns_the_best_mean_and_resumes_without_retraining(
        ray_session: None, mlflow_server: str, tmp_path: Path) -> None:
    cfg = search_config(tmp_path, mlflow_server, "recheck", num_samples=2,
                        recheck={"top_k": 2, "seeds": 2})
    summary = tune.run_search(cfg)
    client = MlflowClient(mlflow_server)
    parent = summary["mlflow_parent_run_id"]

    # The two trials best on id_val/acc, each with two seeds it was not trained with (0).
    entries = summary["recheck"]
    assert [e["seeds"] for e in entries] == [[1, 2], [1, 2]]
    assert [run.get("error") for e in entries for run in e["runs"]] == [None] * 4
    assert len({e["trial_id"] for e in entries}) == 2
    # Each is an MLflow run nested under the search, tagged with its config's trial and seed.
    found = recheck_runs(client, "recheck", parent)
    assert sorted((r.data.tags[runs.TRIAL_TAG], r.data.tags[recheck.SEED_TAG]) for r in found) \
        == sorted((e["trial_id"], str(s)) for e in entries for s in e["seeds"])
    by_run = {r.info.run_id: r for r in found}
    for entry in entries:
        values = [client.get_metric_history(run["mlflow_run_id"], "id_val/acc")[-1].value
                  for run in entry["runs"]]
        assert entry["mean"]["id_val/acc"] == pytest.approx(statistics.mean(values))
        assert entry["std"]["id_val/acc"] == pytest.approx(statistics.stdev(values))
        for run in entry["runs"]:
            assert by_run[run["mlflow_run_id"]].info.status == "FINISHED"
            assert by_run[run["mlflow_run_id"]].data.params["seed"] == str(run["seed"])
    # The champion is the best mean; its model is its seed best on id_val/acc, registered with
    # the mean, the std and the number of seeds.
    champion = max(entries, key=lambda e: e["mean"]["id_val/acc"])
    assert summary["champion_trial_id"] == champion["trial_id"]
    best_seed = max(champion["runs"], key=lambda r: r["metrics"]["id_val/acc"])
    version = client.get_model_version("recheck-model", summary["registered_model"]["version"])
    assert version.run_id == best_seed["mlflow_run_id"]
    assert version.tags["recheck.seeds"] == "2"
    assert float(version.tags["recheck.mean.id_val/acc"]) == pytest.approx(
        champion["mean"]["id_val/acc"])
    assert float(version.tags["recheck.std.id_val/acc"]) == pytest.approx(
        champion["std"]["id_val/acc"])

    # Interrupted before one seed's run was closed: --resume trains no finished seed again.
    interrupted = entries[1]["runs"][0]["mlflow_run_id"]
    client.update_run(interrupted, "RUNNING")
    epochs_before = {r: len(client.get_metric_history(r, "epoch")) for r in by_run}
    resumed = tune.run_search(cfg, resume=True)
    assert [e["mean"] for e in resumed["recheck"]] == [e["mean"] for e in entries]
    assert len(recheck_runs(client, "recheck", parent)) == 4  # no new run
    assert {r: len(client.get_metric_history(r, "epoch")) for r in by_run} == epochs_before
    assert client.get_run(interrupted).info.status == "FINISHED"


SAMPLES = 1000  # trials a budgeted search may start: 60 ms each to run them all in a minute


@pytest.mark.slow
def test_a_spent_budget_starts_no_trial_and_no_recheck(ray_session: None, tmp_path: Path) -> None:
    # One minute of one worker, and more samples than any machine runs in a minute (a Ray Train
    # trial's start-up alone takes seconds): only the budget can stop the search, on a fast
    # machine as on a slow one. The re-check does not start either.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = search_config(tmp_path, uri, "budget", num_samples=SAMPLES, max_concurrent_trials=1,
                        budget={"worker_hours": 1 / 60}, recheck={"top_k": 1, "seeds": 1})
    summary = tune.run_search(cfg)
    spent = summary["budget"]["spent_worker_hours"]
    assert summary["budget"]["worker_hours"] == pytest.approx(1 / 60)
    assert 1 / 60 <= spent and 1 <= summary["num_trials"] < SAMPLES
    assert "recheck" not in summary and summary["registered_model"] is not None
    # The trials that ran spent it: the last one started before the budget was gone.
    assert spent - max(r["seconds"] for r in tune.trial_records(cfg, tune.locate(cfg, True))) \
        / 3600 < 1 / 60
    parent = MlflowClient(uri).get_run(summary["mlflow_parent_run_id"])
    assert parent.data.metrics["budget/spent_worker_hours"] == pytest.approx(spent)
    assert parent.data.tags["flyp_ray.budget.worker_hours"] == str(1 / 60)


# --- in one process ------------------------------------------------------------------------


def test_a_budget_too_small_for_one_trial_is_refused(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, search={"budget": {"worker_hours": 0.01}},
                      resources={"workers": 2, "cpus_per_worker": 0.5})
    with pytest.raises(ConfigError, match=r"search.budget.worker_hours: is 0.3 minutes of one "
                                          r"trial's 2 worker\(s\), not enough for one trial"):
        config.load(write_config(tmp_path / "c.yaml", raw))


def test_a_trial_of_draws_costs_every_draws_workers(tmp_path: Path) -> None:
    # Three draws train side by side, each with its own worker: three workers for the trial.
    raw = tiny_config(tmp_path, train={"k_shot": 2, "repeats": 3},
                      search={"budget": {"worker_hours": 0.03}})
    with pytest.raises(ConfigError, match=r"is 0.6 minutes of one trial's 3 worker\(s\)"):
        config.load(write_config(tmp_path / "c.yaml", raw))
    raw["search"]["budget"]["worker_hours"] = 0.1
    cfg = config.load(write_config(tmp_path / "c.yaml", raw))
    assert budget.spent(cfg, [600.0, 600.0]) == pytest.approx(1.0)  # 20 minutes x 3 workers


def test_ledger_restores_in_place_and_stops_at_rungs(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, train={"epochs": 9},
        search={"scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 3}})))
    assert budget.rungs(cfg) == [1, 3]
    ledger = budget.Ledger(worker_hours=1.0, hourly_rate=2.0)  # 30 minutes of trials
    stop = budget.StopAtRung(ledger, budget.rungs(cfg))
    assert not stop("a", {"time_total_s": 1000.0, "epoch": 1})
    assert not stop("b", {"time_total_s": 900.0, "epoch": 2})  # 1900 s: 1.06 h, spent
    assert ledger.exhausted
    assert not stop("b", {"time_total_s": 900.0, "epoch": 2})  # between rungs: goes on
    assert stop("b", {"time_total_s": 950.0, "epoch": 3})  # at a rung: stops

    from flyp_ray.search import space

    searcher = budget.BudgetSearcher(space.searcher(cfg, study_name="s"), ledger)
    state = pickle.loads(pickle.dumps(searcher.get_state()))  # as Tune saves a wrapper
    fresh = budget.Ledger(worker_hours=1.0, hourly_rate=2.0)
    restored = budget.BudgetSearcher(space.searcher(cfg, study_name="s"), fresh)
    restored.set_state(state)
    assert fresh.seconds == {"a": 1000.0, "b": 950.0} and fresh.exhausted
    assert restored.suggest("c") == "FINISHED"


def test_tune_all_shares_a_budget_by_the_work_of_a_trial(tmp_path: Path) -> None:
    small = tiny_config(tmp_path, dataset={"subsample": 32}, train={"epochs": 1})
    large = tiny_config(tmp_path, dataset={"subsample": 64}, train={"epochs": 3},
                        resources={"workers": 2, "cpus_per_worker": 0.5})
    cfgs = [config.load(write_config(tmp_path / f"{n}.yaml", raw))
            for n, raw in (("small", small), ("large", large))]
    shared = preflight.check_searches(cfgs, 14.0)
    # work: 32 images x 1 epoch x 1 worker against 64 x 3 x 2 workers = 1 : 12
    assert [c.search.budget.worker_hours for c in shared] == pytest.approx([14 / 13, 168 / 13])
    with pytest.raises(ConfigError, match="search.budget.worker_hours"):
        preflight.check_searches(cfgs, 0.001)
