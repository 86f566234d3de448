"""A search's trial lines, from a real Tune run: one when a trial starts, one when it ends.

The trials here are plain function trainables (no Ray Train), each scripted to end one way:
completed, stopped by Tune before its last epoch, failed, diverged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import ray.tune

from flyp_ray.config import from_dict
from flyp_ray.search.trial_lines import TrialLines
from tests.support.configs import tiny_config

CASES = ("completes", "stopped", "fails", "diverges", "plateaus")
ACC = {"completes": 0.3, "stopped": 0.2, "fails": 0.1, "diverges": 0.25}
PLATEAU = (0.4, 0.4, 0.3)  # two equal bests: the line names the later, as the summary does


def scripted(config: dict[str, Any]) -> None:
    """Three epochs of ``id_val/acc``, or fewer, the way ``config["case"]`` says."""
    case = config["case"]
    for epoch in (1, 2, 3):
        if case == "fails" and epoch == 2:
            raise ValueError("boom in epoch 2")
        if case == "diverges" and epoch == 2:  # what the worker reports: the worst value
            ray.tune.report({"epoch": 2, "diverged": 1.0, "id_val/acc": 0.0})
            return
        acc = PLATEAU[epoch - 1] if case == "plateaus" else ACC[case] * epoch
        ray.tune.report({"epoch": epoch, "id_val/acc": acc, "stop_here": case == "stopped"})


class StopWhenAsked(ray.tune.Stopper):
    """Stops a trial as a scheduler would: Tune ends it before its last epoch."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return bool(result.get("stop_here"))

    def stop_all(self) -> bool:
        return False


def test_each_trial_says_when_it_starts_and_how_it_ended(
        ray_session: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = from_dict(tiny_config(tmp_path, train={"epochs": 3}), "lines.yaml")
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(scripted, {"CPU": 0.1}),
        param_space={"case": ray.tune.grid_search(list(CASES))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=2),
        run_config=ray.tune.RunConfig(
            name="lines", storage_path=str(tmp_path / "results"), stop=StopWhenAsked(),
            callbacks=[TrialLines(cfg)], verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=0)))
    with caplog.at_level(logging.INFO, logger="flyp_ray.search.trial_lines"):
        tuner.fit()

    lines = [r.getMessage() for r in caplog.records if r.name == "flyp_ray.search.trial_lines"]
    started = {m.group(2): m.group(1) for line in lines
               if (m := re.fullmatch(r"trial (\w+) started: case=(\w+)", line))}
    assert sorted(started) == sorted(CASES), lines
    ended = {case: next(line for line in lines if line.startswith(f"trial {trial} ")
                        and "started" not in line) for case, trial in started.items()}
    assert ended["completes"] == f"trial {started['completes']} completed: id_val/acc 0.900 " \
                                 "(best, epoch 3)"
    assert ended["stopped"] == f"trial {started['stopped']} stopped early by the scheduler at " \
                               "epoch 1: id_val/acc 0.200 (best, epoch 1)"
    assert ended["fails"] == f"trial {started['fails']} failed after 1 epoch: ValueError: " \
                             "boom in epoch 2"
    # the diverged epoch's worst value is a marker, not a measurement
    assert ended["diverges"] == f"trial {started['diverges']} diverged at epoch 2: id_val/acc " \
                                "0.250 (best, epoch 1)"
    assert ended["plateaus"] == f"trial {started['plateaus']} completed: id_val/acc 0.400 " \
                                "(best, epoch 2)"
    assert len(lines) == 2 * len(CASES)


def test_a_hook_that_fails_does_not_stop_the_search(tmp_path: Path) -> None:
    lines = TrialLines(from_dict(tiny_config(tmp_path), "lines.yaml"))
    # Tune aborts the whole search when a callback raises: a trial without an id must not.
    lines.on_trial_start(0, [], trial=None)
    lines.on_trial_result(0, [], trial=None, result={"epoch": 1})
    lines.on_trial_complete(0, [], trial=None)
    lines.on_trial_error(0, [], trial=None)
