"""Faults a run must survive or report clearly: a lost node, a stale Tune snapshot, storage
that cannot be written, a corrupt image.

Each test breaks something for real: a Ray node is removed without grace, Tune's snapshot is
rolled back to before the last result, a checkpoint's folder cannot be made, an image is junk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray.tune
from mlflow.tracking import MlflowClient

from flyp_ray import cli, config
from flyp_ray.search import tune
from flyp_ray.tracking import runs
from tests.support import REPO
from tests.support.configs import LR_SPACE, tiny_config, write_config


def roll_back_last_result(search_dir: Path) -> str:
    """Make the search look as if its driver died just before Tune took the last result.

    Tune's newest snapshot gets the trial back as RUNNING with its first epoch's result, and
    the trial's result log in storage loses its last row: what is on disk when the driver is
    killed after the Train run's final checkpoint but before Tune processed that report.
    """
    (state_file,) = search_dir.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    (entry,) = state["trial_data"]
    trial, meta = json.loads(entry[0]), json.loads(entry[1])
    (results,) = search_dir.glob(f"run_trial_{trial['trial_id']}_*/result.json")
    first = results.read_text().splitlines()[0]
    results.write_text(first + "\n")
    trial["status"] = "RUNNING"
    meta["last_result"] = json.loads(first)
    state["trial_data"] = [[json.dumps(trial), json.dumps(meta)]]
    state_file.write_text(json.dumps(state))
    return str(trial["trial_id"])


@pytest.mark.slow
def test_finished_train_run_reports_its_final_result_after_resume(ray_session: None,
                                                                  tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, dataset={"subsample": 32}, train={"epochs": 2, "batch_size": 16},
                      search={"num_samples": 1, "scheduler": {"type": "none"}, "space": LR_SPACE})
    path = write_config(tmp_path / "c.yaml", raw)
    # The search up to its last result, without the summary: its driver "dies" there.
    cfg = config.load(path)
    search = tune.locate(cfg, resume=False)
    parent = runs.start_search_run(cfg, search.name, search.path)
    tune.build_tuner(cfg, search, parent).fit()
    search_dir = Path(search.path)
    trial_id = roll_back_last_result(search_dir)

    # Resumed in this process (a new driver would cost another Ray start): Tune's staging copy
    # of the result log keeps its rows here, so the check is on the trial's own last result.
    summary = tune.run_search(config.load(path), resume=True)

    (trial,) = ray.tune.ExperimentAnalysis(str(search_dir)).trials
    assert trial.last_result["epoch"] == 2  # not the stale epoch 1 of the rolled-back snapshot
    assert trial.last_result[tune.CHECKPOINT_PATH_KEY].endswith("epoch_0002")
    assert summary["num_completed"] == 1 and summary["best_trial_id"] == trial_id
    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])
    experiment = client.get_experiment_by_name("test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id],
                                f"tags.`{runs.TRIAL_TAG}` = '{trial_id}'")
    assert run.data.tags["flyp_ray.status"] == "completed"
    assert run.data.tags["flyp_ray.epochs_done"] == "2"
    # The Train run was not trained again: each epoch reached MLflow once.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch")) == [1, 2]


def unwritable_storage(tmp: Path) -> list[Path]:
    """Storage folders that cannot be written: under a regular file, and a read-only folder.

    Permission bits do not stop root, so the read-only folder is only used for other users.
    """
    (tmp / "a-file").write_text("not a folder\n")
    paths = [tmp / "a-file" / "results"]
    if os.geteuid() != 0:
        read_only = tmp / "read-only"
        read_only.mkdir(mode=0o500)
        paths.append(read_only / "results")
    return paths


def test_unwritable_storage_is_bad_input_before_ray(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for storage in unwritable_storage(tmp_path):
        raw = tiny_config(tmp_path, storage=str(storage))
        path = write_config(tmp_path / "c.yaml", raw)
        for command in ("train", "tune"):
            assert cli.main([command, str(path)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert f"c.yaml: storage: cannot write checkpoints to '{storage}'" in err
        assert not storage.exists()


@pytest.mark.slow
def test_run_goes_on_after_its_node_is_lost(tmp_path: Path) -> None:
    # Its own two-node cluster in another process: the session's Ray is left alone.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "tests.support.node_loss", str(tmp_path)],
                          cwd=REPO, env=env, check=False, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray's own messages about the lost node share stdout: the JSON line is the last one.
    out = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])

    assert out["errors"] == []
    assert out["first_nodes"] == [out["worker"]]  # the first worker ran on the lost node
    assert out["removed_after"] in ("epoch_0001", "epoch_0002")  # removed mid-run
    assert out["head"] in out["later_nodes"]  # the new worker group, on the remaining node
    assert out["outcome"]["metrics"]["epoch"] == 3
    assert out["mlflow_epochs"] == [1, 2, 3]  # every epoch once in MLflow
    assert out["reports"] == 3  # it went on from the checkpoint; a fresh start reports 4+


def last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_checkpoint_that_cannot_be_written_names_the_path(
        ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A file where the run's first checkpoint folder must go: the write fails mid-run (after
    # the first epoch's training), as a full or read-only disk would, whoever runs the test.
    blocked = tmp_path / "results" / "blocked" / "epoch_0001"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way\n")
    raw = tiny_config(tmp_path, dataset={"subsample": 16})
    path = write_config(tmp_path / "c.yaml", raw)

    assert cli.main(["train", str(path), "--name", "blocked"]) == 1
    line = last_line(capsys)
    assert line.startswith("flyp-ray: failed: a training worker stopped: "), line
    assert str(blocked) in line


@pytest.mark.slow
def test_corrupt_image_stops_training_with_its_name(
        ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.wilds_folder import write_csv_dataset

    root = write_csv_dataset(tmp_path / "csvset", n_per_split=8, num_classes=3)
    # Not the first image of its split: those are checked before Ray starts.
    (root / "images" / "train_0003.png").write_bytes(b"\x89PNG garbage")
    raw = tiny_config(tmp_path, dataset={"name": "csv", "root": str(root), "subsample": None,
                                         "classnames": str(root / "classnames.txt")},
                      train={"batch_size": 8})
    path = write_config(tmp_path / "c.yaml", raw)

    assert cli.main(["train", str(path)]) == 2
    line = last_line(capsys)
    assert line.startswith("flyp-ray: error: a training worker stopped: cannot read image "), line
    assert str(root / "images" / "train_0003.png") in line


@pytest.mark.slow
def test_a_run_survives_a_second_ray_instance_started_beside_it(ray_session: None,
                                                                tmp_path: Path) -> None:
    # Ray Train's PlacementGroupCleaner removes a run's workers once the state API does not
    # know its controller; without an address of their own, the session's Ray processes asked
    # the newest Ray instance on the machine, which is the second one here. A run on a Ray
    # without a dashboard (the session's) now starts no cleaner at all (trainer.Trainer), and
    # every Ray process still gets its own cluster's addresses (cluster.own_cluster): this
    # keeps the outcome checked whichever of the two guards it.
    import threading
    import time

    # The second instance starts once the run is under way (one already answering when the
    # run starts did not make the cleaner fail, here), and the run holds after its first
    # report until it answers: otherwise a fast machine could end the run first.
    from flyp_ray.distributed import trainer
    from tests.support.second_ray import (
        HoldAfterFirstReport,
        another_ray_instance,
        state_api_answers,
        wait_until,
    )

    raw = tiny_config(tmp_path, dataset={"subsample": 64}, train={"epochs": 3})
    cfg = config.load(write_config(tmp_path / "c.yaml", raw))
    first_epoch = tmp_path / "results" / "second-ray" / "epoch_0001"
    flag = tmp_path / "second-answers"
    answered: list[float] = []  # when the second instance's state API answered
    with another_ray_instance() as start_second:
        def second_once_the_run_is_under_way() -> None:
            if wait_until(first_epoch.exists, 120):
                url = start_second()
                if wait_until(lambda: state_api_answers(url), 90):
                    answered.append(time.monotonic())
            flag.touch()  # the run goes on either way; the assertion below tells

        starter = threading.Thread(target=second_once_the_run_is_under_way, daemon=True)
        starter.start()
        outcome = trainer.train(cfg, name="second-ray",
                                callbacks=[HoldAfterFirstReport(flag, hold_s=5)])
        ended = time.monotonic()
        starter.join(timeout=120)
    # The cleaners poll every second: the run must have gone on for a few polls after the
    # second instance could answer, or this test proved nothing.
    assert answered and ended - answered[0] > 3, (answered, ended)
    assert outcome.best_epoch >= 1
    history = MlflowClient(cfg.tracking.uri).get_metric_history(outcome.mlflow_run_id, "epoch")
    assert sorted(int(m.step) for m in history) == [1, 2, 3]  # every epoch, once
