"""The search end to end: real Ray Tune + Optuna + Ray Train on a WILDS-format folder, MLflow.

Each test runs small searches with the tiny model on 16 images; trials take one Train worker
with half a CPU, so two fit next to each other on the shared 2-CPU test cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from flyp_ray import cli, config
from flyp_ray.errors import BadInput
from flyp_ray.search import tune, tune_row
from flyp_ray.tracking import runs
from tests.support.configs import LR_SPACE, tiny_config, write_config
from tests.support.processes import held_groups

pytestmark = pytest.mark.slow



def search_config(tmp: Path, wilds_root: Path, name: str = "iwildcam", *, epochs: int,
                  cpus: float = 0.5, dataset: dict[str, Any] | None = None,
                  **search: Any) -> Path:
    raw = tiny_config(tmp, dataset={"name": "iwildcam", "root": str(wilds_root), "subsample": 16,
                                    **(dataset or {})},
                      train={"epochs": epochs, "batch_size": 8, "warmup_steps": 1},
                      resources={"cpus_per_worker": cpus},
                      search={"space": LR_SPACE, **search})
    return write_config(tmp / f"{name}.yaml", raw)


def mlflow_client(tmp: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def runs_of(client: MlflowClient, kind: str, parent: str | None = None) -> list[Run]:
    exp = client.get_experiment_by_name("test")
    where = f"tags.`{runs.KIND_TAG}` = '{kind}'"
    if parent is not None:
        where += f" and tags.`{runs.PARENT_TAG}` = '{parent}'"
    return list(client.search_runs([exp.experiment_id], where))


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    """The steps of the ``epoch`` metric: one per epoch the trial trained and reported."""
    return sorted(m.step for m in client.get_metric_history(run_id, "epoch"))


def test_search_with_asha_tracks_parent_and_trials(ray_session: None, mlflow_server: str,
                                                   tmp_path: Path, wilds_root: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Selecting on train/lr makes ASHA's decisions known in advance: after epoch 1 each trial's
    # train/lr is its sampled peak lr. With seed 1 the third sample is the smallest of the four,
    # and trial 3 only starts once an earlier trial has finished (2 at a time), so ASHA has a
    # higher value recorded at its rung and must stop trial 3 after one epoch.
    # Half a CPU per worker, 2 trials at a time: the later trials fit only if the workers of
    # the trials ASHA stopped were freed (tune.FreeStoppedWorkers).
    # Two objectives: ASHA and the best trial follow the first; summary.json adds the Pareto
    # front of both over the completed trials.
    path = search_config(tmp_path, wilds_root, epochs=3, cpus=0.5,
                         metric=["train/lr", "id_val/acc"], mode=["max", "max"],
                         num_samples=4, max_concurrent_trials=2, seed=1,
                         scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 3})
    # A real tracking server on 127.0.0.1, and a registered model at the end.
    cfg = config.load(path, [f"tracking.uri={mlflow_server}", "tracking.experiment=test",
                             "tracking.registered_model=flyp-test"])
    held_before = held_groups()
    with caplog.at_level(logging.INFO, logger="flyp_ray.search.trial_lines"):
        summary = tune.run_search(cfg)
    assert held_groups() - held_before == set()

    search_dir = tmp_path / "results" / "search-iwildcam"
    assert json.loads((search_dir / "summary.json").read_text()) == summary
    assert summary["num_trials"] == 4 and summary["num_completed"] == 4
    assert summary["num_failed"] == 0

    client = MlflowClient(tracking_uri=mlflow_server)
    (parent,) = runs_of(client, "search")
    assert parent.info.run_id == summary["mlflow_parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.scheduler.type"] == "asha"
    assert json.loads(parent.data.params["search.space.lr"])["log"] is True
    children = runs_of(client, "trial", parent.info.run_id)
    assert len(children) == 4
    ids = [c.data.tags[runs.TRIAL_TAG] for c in children]
    assert len(set(ids)) == 4
    peak: dict[str, float] = {}
    epochs: dict[str, int] = {}
    for child in children:
        trial_id = child.data.tags[runs.TRIAL_TAG]
        assert child.info.run_name == trial_id
        assert child.info.status == "FINISHED"
        assert float(child.data.params["lr"]) > 0 and child.data.params["epochs"] == "3"
        steps = epochs_logged(client, child.info.run_id)
        assert steps == list(range(1, len(steps) + 1))  # step = epoch, each epoch once
        # Tune's count: a stopped trial may log an epoch or two more to MLflow while Tune is
        # still shutting it down.
        epochs[trial_id] = int(child.data.tags["flyp_ray.epochs_done"])
        assert 1 <= epochs[trial_id] <= len(steps) <= 3
        peak[trial_id] = max(m.value for m in client.get_metric_history(child.info.run_id,
                                                                        "train/lr"))
        stopped = child.data.tags["flyp_ray.status"] == "stopped"
        assert stopped == (epochs[trial_id] < 3)
    assert min(epochs.values()) < 3, f"ASHA stopped no trial: {epochs}"
    assert max(epochs.values()) == 3
    # A line when each trial started and one when it ended, saying how.
    lines = [r.getMessage() for r in caplog.records if r.name == "flyp_ray.search.trial_lines"]
    for trial_id, done in epochs.items():
        assert sum(line.startswith(f"trial {trial_id} started: lr=") for line in lines) == 1
        how = "completed" if done == 3 else f"stopped early by the scheduler at epoch {done}"
        assert sum(line.startswith(f"trial {trial_id} {how}: train/lr ") for line in lines) == 1
    # MLflow's UI opens the experiment on its runs; a trial's Source is its search's.
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags[runs.EXPERIMENT_KIND_TAG] == "custom_model_development"
    source = (parent.data.tags[runs.SOURCE_NAME_TAG], parent.data.tags[runs.SOURCE_TYPE_TAG])
    assert source[0].startswith("flyp-ray tune") and source[0].endswith("iwildcam.yaml")
    assert {(c.data.tags[runs.SOURCE_NAME_TAG], c.data.tags[runs.SOURCE_TYPE_TAG])
            for c in children} == {source}

    best_id = max(peak, key=lambda t: peak[t])
    assert summary["best_trial_id"] == best_id
    assert summary["best_metrics"]["train/lr"] == pytest.approx(peak[best_id])
    assert summary["best_config"]["lr"] == pytest.approx(
        float(next(c for c in children if c.info.run_name == best_id).data.params["lr"]))
    assert parent.data.tags["flyp_ray.best_trial_id"] == best_id
    assert parent.data.metrics["train/lr"] == pytest.approx(peak[best_id])
    assert_pareto_front(cfg, summary)
    checkpoint = Path(summary["best_checkpoint"])
    assert checkpoint.parent == search_dir / "trials" / best_id and checkpoint.is_dir()
    assert_registered_model_predicts(mlflow_server, summary,
                                     wilds_root / "iwildcam_v2.0" / "train")


def assert_pareto_front(cfg: config.Config, summary: dict[str, Any]) -> None:
    """The front is exactly the completed trials that no other completed trial dominates."""
    records = tune.trial_records(cfg, tune.locate(cfg, resume=True))
    points = {r["trial_id"]: (r["metrics"]["train/lr"], r["metrics"]["id_val/acc"])
              for r in records if r["status"] == "completed"}

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())

    front = {f["trial_id"] for f in summary["pareto_front"]}
    assert front and front == {t for t, p in points.items() if not dominated(p)}


def assert_registered_model_predicts(uri: str, summary: dict[str, Any], images: Path) -> None:
    """The registered version loads with pyfunc and names a class, with probabilities, for each
    of a few of the data set's own JPEG files."""
    import mlflow.pyfunc
    import pandas as pd

    name, version = summary["registered_model"]["name"], summary["registered_model"]["version"]
    assert name == "flyp-test"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    files = sorted(images.glob("*.jpg"))[:3]
    answer = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert len(answer) == 3
    for row in answer.to_dict(orient="records"):
        assert len(row["probabilities"]) == 4  # the WILDS folder has 4 classes
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, rel=1e-5)
        assert row["probability"] == max(row["probabilities"].values())
    alias = MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, "champion")
    assert alias.version == version


def experiment_statuses(search_dir: Path) -> dict[str, str]:
    """Trial id -> status in Tune's newest experiment snapshot (what a restore starts from)."""
    states = sorted(search_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-write
        return {}
    trials = (json.loads(state) for state, _ in data["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def files_with_times(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def kill_search_when(path: Path, ready: Callable[[], bool], what: str) -> None:
    """Run ``flyp-ray tune path`` in a process of its own and SIGKILL it once ``ready()``."""
    log = path.parent / "first.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Tune snapshots the experiment at most every 10 s by default (longer on a loaded machine):
    # time enough for a short trial to finish unseen. A snapshot each loop step makes the
    # snapshot that a resume starts from as recent as what ``ready`` saw.
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    # Its own local Ray, in its own process group: SIGKILL to the group takes all of it down.
    proc = subprocess.Popen([sys.executable, "-m", "flyp_ray", "tune", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not {what} in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_search_resumes_without_rerunning_finished_trials(
        ray_session: None, tmp_path: Path, wilds_root: Path) -> None:
    # The trials share the node's disk cache: the second one decodes nothing.
    cache = {"cache": "disk", "cache_dir": str(tmp_path / "cache")}
    path = search_config(tmp_path, wilds_root, epochs=1, metric="id_val/loss", mode="min",
                         num_samples=2, max_concurrent_trials=1, scheduler={"type": "none"},
                         dataset=cache)
    search_dir = tmp_path / "results" / "search-iwildcam"
    kill_search_when(path, lambda: "TERMINATED" in experiment_statuses(search_dir).values(),
                     "a trial finished")
    finished = [t for t, s in experiment_statuses(search_dir).items() if s == "TERMINATED"]
    assert len(finished) == 1
    (done,) = finished

    client = mlflow_client(tmp_path)
    (parent,) = runs_of(client, "search")
    assert parent.info.status == "RUNNING"  # the driver died without closing it
    before = {c.data.tags[runs.TRIAL_TAG]: c for c in runs_of(client, "trial",
                                                                   parent.info.run_id)}
    assert epochs_logged(client, before[done].info.run_id) == [1]
    done_files = files_with_times(search_dir / "trials" / done)
    # A state file that a kill cut short is refused in one line, before Ray starts; Tune itself
    # would restore half of the search and wait for trials that never come.
    (saved,) = search_dir.glob("searcher-state-*.pkl")
    intact = saved.read_bytes()
    saved.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(BadInput, match=rf"{saved.name} is cut short \({len(intact) // 2} bytes"):
        tune.check(config.load(path), resume=True)
    saved.write_bytes(intact)

    summary = tune.run_search(config.load(path), resume=True)

    assert summary["mlflow_parent_run_id"] == parent.info.run_id
    assert summary["num_trials"] == 2 and summary["num_completed"] == 2
    children = runs_of(client, "trial", parent.info.run_id)
    ids = [c.data.tags[runs.TRIAL_TAG] for c in children]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 2  # one run per trial, reused
    decoded = {}
    for child in children:
        assert epochs_logged(client, child.info.run_id) == [1]
        readings = client.get_metric_history(child.info.run_id, "perf/decoded")
        decoded[child.data.tags[runs.TRIAL_TAG]] = [m.value for m in readings]
    # The first trial's one epoch (one step of the folder's 8 training images) filled the
    # training split's cache; the second trial, another process of another Ray, read it.
    assert decoded.pop(done) == [8.0]
    assert list(decoded.values()) == [[0.0]]
    assert files_with_times(search_dir / "trials" / done) == done_files  # not run again
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert not (tmp_path / "results" / "search-iwildcam-2").exists()


def test_a_resumed_trial_keeps_its_best_epoch_from_before_the_crash(
        ray_session: None, tmp_path: Path, wilds_root: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # On train/lr the first epoch is the best (one warm-up step, then the schedule decays):
    # the search is killed after its trial reported two epochs, and Tune, resumed, starts the
    # trial's rows again from the epochs trained since. Ray Train kept epoch 1's checkpoint.
    path = search_config(tmp_path, wilds_root, epochs=4, metric="train/lr", mode="max",
                         num_samples=1, max_concurrent_trials=1, scheduler={"type": "none"})
    search_dir = tmp_path / "results" / "search-iwildcam"
    kill_search_when(path, lambda: len(reported_epochs(search_dir)) >= 2, "two epochs reported")
    assert "TERMINATED" not in experiment_statuses(search_dir).values()

    with caplog.at_level(logging.INFO, logger="flyp_ray.search.trial_lines"):
        summary = tune.run_search(config.load(path), resume=True)

    assert 1 not in reported_epochs(search_dir)  # Tune's own rows no longer have the best
    assert summary["best_metrics"]["epoch"] == 1
    assert summary["best_checkpoint"].endswith("epoch_0001")
    (end,) = [r.getMessage() for r in caplog.records if " completed: " in r.getMessage()]
    assert end.endswith(f"train/lr {summary['best_metrics']['train/lr']:.3f} (best, epoch 1)")


def reported_epochs(search_dir: Path) -> list[int]:
    """The epochs in Tune's rows of the search's one trial (its result.json)."""
    rows = []
    for line in "".join(p.read_text() for p in search_dir.glob("run_trial_*/result.json")) \
            .splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line caught mid-write
            rows.append(json.loads(line))
    return [int(r["epoch"]) for r in rows if "epoch" in r]


def test_tune_all_warm_starts_from_the_previous_best(ray_session: None, tmp_path: Path,
                                                     wilds_root: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    common = {"metric": "id_val/loss", "mode": "min", "num_samples": 2,
              "max_concurrent_trials": 2, "scheduler": {"type": "none"}, "warm_start": True}
    # One trial is a best for the second search to start from; the second needs two, to
    # show that only its first trial takes the previous best.
    first = search_config(tmp_path, wilds_root, "first", epochs=1, seed=3,
                          **{**common, "num_samples": 1})
    second = search_config(tmp_path, wilds_root, "second", epochs=1, seed=4, **common)

    assert cli.main(["tune-all", str(first), str(second)]) == 0

    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    one, two = result["searches"]
    assert one["config"] == str(first) and two["config"] == str(second)
    assert "first.yaml" in err and "second.yaml" in err  # the table of best results
    from ray.tune import ExperimentAnalysis

    # In the order Tune created them (the tag starts with the trial's number), not finished.
    second_trials = sorted(ExperimentAnalysis(two["search_path"]).trials,
                           key=lambda t: int(t.experiment_tag.split("_")[0]))
    assert second_trials[0].config == {"lr": one["best_config"]["lr"]}
    assert second_trials[1].config != second_trials[0].config


def test_a_trials_best_epoch_is_the_later_of_equals_and_skips_rows_without_the_metric() -> None:
    rows = [{"epoch": 1, "id_val/acc": 0.5}, {"epoch": 2}, {"epoch": 3, "id_val/acc": 0.5},
            {"epoch": 4, "id_val/acc": float("nan")}]
    assert tune._best_row(rows, "id_val/acc", "max") == {"epoch": 3, "id_val/acc": 0.5}
    assert tune._best_row([{"epoch": 1}], "id_val/acc", "max") is None


def test_a_train_snapshot_cut_short_by_the_crash_leaves_a_trial_its_tune_rows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config.from_dict(tiny_config(tmp_path), "cut.yaml")
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": [')
    with caplog.at_level(logging.WARNING):
        assert tune_row.kept_epochs(cfg, str(tmp_path), "t1") == []
    assert "trial t1: its Train run's kept epochs unreadable" in caplog.text
    assert tune_row.kept_epochs(cfg, str(tmp_path), "never-ran") == []


def test_resume_without_a_search_is_bad_input(tmp_path: Path, wilds_root: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = search_config(tmp_path, wilds_root, epochs=1)
    assert cli.main(["tune", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no search named search-iwildcam[-N] to resume" in err[0]


def test_bad_scheduler_is_bad_input_before_ray(tmp_path: Path, wilds_root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = search_config(tmp_path, wilds_root, epochs=1, scheduler={"grace_period": 3})
    assert cli.main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.scheduler.grace_period: must be <= train.epochs (1), got 3" in err
    assert not (tmp_path / "results").exists()


def test_fresh_search_takes_the_next_free_name(tmp_path: Path, wilds_root: Path) -> None:
    cfg = config.load(search_config(tmp_path, wilds_root, epochs=1))
    assert tune.locate(cfg, resume=False).name == "search-iwildcam"
    (tmp_path / "results" / "search-iwildcam").mkdir(parents=True)
    (tmp_path / "results" / "search-iwildcam-2").mkdir()
    assert tune.locate(cfg, resume=False).name == "search-iwildcam-3"
    assert tune.locate(cfg, resume=True).name == "search-iwildcam-2"
