"""Few-shot draws side by side: a real search (Ray Tune + Optuna + Ray Train, MLflow) whose
trial trains ``train.repeats`` draws as Train runs of their own, and the means in one process."""

from __future__ import annotations

import os
import re
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import ray.tune
import ray.util
from mlflow.tracking import MlflowClient

from flyp_ray import config
from flyp_ray.distributed import draws
from flyp_ray.search import tune
from flyp_ray.tracking import runs
from tests.support.configs import tiny_config, write_config
from tests.support.processes import held_groups, train_workers

EPOCHS = 3


def draw_workers() -> dict[int, list[str]]:
    """Each Train worker process of this Ray that has logged a draw's progress: pid -> its
    lines (``{run}-draw{r}: ...``), read from the worker's log file in Ray's session folder."""
    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    found = {}
    for path in logs.glob("worker-*.err"):
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if re.match(r"\S+-draw\d+: ", line)]
        if lines:
            found[int(path.stem.rsplit("-", 1)[1])] = lines
    return found


def kill_after_its_first_checkpoint(draw: int, storage: Path, seen: dict[int, list[str]],
                                    deadline_s: float = 300) -> threading.Thread:
    """In the background: SIGKILL the Train worker of ``draw`` once Ray has registered the
    draw's first checkpoint (its run's checkpoint manager wrote its snapshot under
    ``storage``); the worker's pid goes into ``seen`` with its log lines so far."""
    def watch() -> None:
        deadline = time.monotonic() + deadline_s
        snapshot = f"*-draws/*-draw{draw}/checkpoint_manager_snapshot.json"
        while time.monotonic() < deadline and not any(storage.rglob(snapshot)):
            time.sleep(0.1)
        for pid, lines in draw_workers().items():
            if pid in train_workers() and any(f"-draw{draw}: " in line for line in lines):
                os.kill(pid, signal.SIGKILL)
                seen[pid] = lines

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def draws_config(tmp: Path, max_failures: int, **search: object) -> config.Config:
    """Trials of two few-shot draws each, one trial at a time."""
    raw = tiny_config(tmp, dataset={"subsample": 64},
                      train={"epochs": EPOCHS, "batch_size": 8, "k_shot": 4, "repeats": 2,
                             "warmup_steps": 1},
                      search={"max_concurrent_trials": 1, **search},
                      resources={"workers": 1, "cpus_per_worker": 0.5,
                                 "max_failures": max_failures})
    return config.load(write_config(tmp / "c.yaml", raw))


@pytest.mark.slow
def test_a_trial_of_two_draws_reports_each_epochs_mean_and_retries_a_killed_draw_alone(
        ray_session: None, tmp_path: Path) -> None:
    cfg = draws_config(tmp_path, 1, num_samples=1, scheduler={"type": "none"})
    before = set(draw_workers())  # other tests' draws, in this session's Ray
    killed: dict[int, list[str]] = {}
    # Draw 1 loses its worker for real once its first epoch is a checkpoint, while draw 0
    # trains on.
    watcher = kill_after_its_first_checkpoint(1, tmp_path / "results", killed)
    summary = tune.run_search(cfg)
    watcher.join(timeout=1)
    assert summary["num_completed"] == 1 and summary["num_failed"] == 0
    assert len(killed) == 1, killed
    completed = summary["best_trial_id"]
    # Only draw 1 started again, from its checkpoint; draw 0's one worker went on.
    workers = {pid: lines for pid, lines in draw_workers().items() if pid not in before}
    by_draw = {d: [lines for lines in workers.values()
                   if any(line.startswith(f"{completed}-draw{d}: ") for line in lines)]
               for d in (0, 1)}
    assert len(by_draw[0]) == 1 and len(by_draw[1]) == 2, workers
    assert sum("resuming after epoch 1" in line for lines in by_draw[1] for line in lines) == 1, \
        "\n".join(line for lines in by_draw[1] for line in lines)

    # Each draw is an MLflow run nested under the trial's, tagged with its kind and number.
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    trial_run = runs.find_run(cfg.tracking.uri, cfg.tracking.experiment,
                              {runs.PARENT_TAG: summary["mlflow_parent_run_id"],
                               runs.TRIAL_TAG: completed})
    found = client.search_runs([experiment], f"tags.`{runs.PARENT_TAG}` = '{trial_run}'")
    assert sorted((r.data.tags[runs.KIND_TAG], r.data.tags[draws.DRAW_TAG]) for r in found) \
        == [("draw", "0"), ("draw", "1")]
    assert {r.info.status for r in found} == {"FINISHED"}
    draw_runs = sorted(found, key=lambda r: r.data.tags[draws.DRAW_TAG])
    for run in draw_runs:  # the restarted draw too: every epoch once
        steps = sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch"))
        assert steps == list(range(1, EPOCHS + 1))
    history = [{int(m.step): m.value for m in client.get_metric_history(r.info.run_id,
                                                                       "id_val/acc")}
               for r in draw_runs]

    # Tune got one report per epoch: the mean over the draws of that epoch, and its std.
    frame = ray.tune.ExperimentAnalysis(summary["search_path"]).trial_dataframes[completed]
    rows = frame.sort_values("epoch").to_dict("records")
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    for row in rows:
        values = [h[int(row["epoch"])] for h in history]
        assert row["repeats"] == 2
        assert row["id_val/acc"] == pytest.approx(statistics.mean(values))
        assert row["id_val/acc_std"] == pytest.approx(statistics.stdev(values))
    # The trial's own run holds the means per epoch, and the summary the selected epoch's.
    means = client.get_metric_history(trial_run, "id_val/acc")
    assert sorted(int(m.step) for m in means) == list(range(1, EPOCHS + 1))
    best = summary["best_metrics"]
    assert "id_val/acc_std" in best
    assert best["id_val/acc"] == pytest.approx(max(r["id_val/acc"] for r in rows))
    # Its checkpoint is the one of the draw best at that epoch, kept in the draws' folder.
    checkpoint = Path(summary["best_checkpoint"])
    assert checkpoint.parent.parent.name.endswith("-draws") and checkpoint.is_dir()



@pytest.mark.slow
def test_asha_stops_a_trial_of_draws_and_its_draws_end_with_it(
        ray_session: None, tmp_path: Path) -> None:
    # Selecting on train/lr makes ASHA's decision known in advance (as in test_tune's ASHA
    # search): with seed 2 the second trial's lr (1.1e-4) is below the first's (7.5e-4), and
    # one trial at a time, so ASHA stops the second after its first epoch's mean. Workers may
    # restart (max_failures 1): when the search freed a stopped trial's groups while its process
    # still lived, its Train runs restarted their workers in new groups, which stayed reserved.
    cfg = draws_config(tmp_path, 1, num_samples=2, seed=2, metric="train/lr", mode="max",
                       scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 3})
    held_before = held_groups()  # the session's Ray is shared with the file's other tests
    summary = tune.run_search(cfg)
    assert summary["num_completed"] == 2 and summary["num_failed"] == 0  # stopped: complete
    frames = ray.tune.ExperimentAnalysis(summary["search_path"]).trial_dataframes
    (stopped,) = set(frames) - {summary["best_trial_id"]}
    assert [int(e) for e in frames[stopped]["epoch"]] == [1]
    # Its run and its draws' runs, which Tune's stop left open, end as stopped trials do.
    client = MlflowClient(cfg.tracking.uri)
    stopped_run = runs.find_run(cfg.tracking.uri, cfg.tracking.experiment,
                                {runs.PARENT_TAG: summary["mlflow_parent_run_id"],
                                 runs.TRIAL_TAG: stopped})
    assert client.get_run(stopped_run).data.tags["flyp_ray.status"] == "stopped"
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    its_draws = client.search_runs([experiment], f"tags.`{runs.PARENT_TAG}` = '{stopped_run}'")
    assert sorted(r.data.tags[draws.DRAW_TAG] for r in its_draws) == ["0", "1"]
    assert {r.info.status for r in its_draws} == {"FINISHED"}
    # Its draws' workers and placement groups went with it.
    assert held_groups() - held_before == set()
    its_workers = {pid for pid, lines in draw_workers().items()
                   if any(line.startswith(f"{stopped}-draw") for line in lines)}
    assert len(its_workers) == 2
    deadline = time.monotonic() + 30  # Ray ends the stopped draws' processes in the background
    while its_workers & set(train_workers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not its_workers & set(train_workers())


# --- in one process ------------------------------------------------------------------------


def test_an_epochs_mean_waits_for_every_draw(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, train={"epochs": 3, "repeats": 2, "k_shot": 1})))
    means = draws.Means(cfg)
    means.add(0, {"epoch": 1, "id_val/acc": 0.5, "checkpoint_path": "a1"})
    means.add(0, {"epoch": 2, "id_val/acc": 0.6, "checkpoint_path": "a2"})
    assert means.ready() == []  # draw 1 has reached no epoch yet
    means.add(1, {"epoch": 1, "id_val/acc": 0.7, "checkpoint_path": "b1"})
    (first,) = means.ready()
    assert first["id_val/acc"] == pytest.approx(0.6)
    assert first["id_val/acc_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert first["repeats"] == 2 and first["epoch"] == 1
    assert first["checkpoint_path"] == "b1"  # the draw best at that epoch
    assert means.ready() == []  # given once
    means.add(1, {"epoch": 2, "diverged": 1.0, "id_val/acc": 0.0})
    assert means.ready() == [] and means.diverged is not None
    assert means.diverged["repeats"] == 2
