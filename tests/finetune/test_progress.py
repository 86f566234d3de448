"""Progress inside an epoch, and a loop that reads the loss only where it logs (no Ray)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from flyp_ray.config import Config, from_dict
from flyp_ray.errors import TrialDiverged
from flyp_ray.finetune import loop, progress
from flyp_ray.finetune.run import build_run
from tests.support.configs import tiny_config

CPU = torch.device("cpu")


def config(tmp: Path, dataset: dict[str, Any] | None = None, **train: Any) -> Config:
    """Synthetic data, 64 training images in batches of 16: four steps an epoch."""
    raw = tiny_config(tmp, dataset={"subsample": 64, **(dataset or {})},
                      train={"epochs": 2, "batch_size": 16, **train})
    return from_dict(raw, "test.yaml")


def test_readings_every_n_steps_on_the_optimizer_step_axis(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = build_run(config(tmp_path, {"cache": "none"}, log_every_steps=3), CPU)
    readings: list[tuple[int, dict[str, float]]] = []
    with caplog.at_level(logging.DEBUG, logger="flyp_ray.finetune.loop"):
        loop.run_epochs(run, 0, lambda epoch, metrics: None,
                        lambda step, figures: readings.append((step, figures)))

    # Every 3 steps and at each epoch's end, numbered by optimizer steps since the start.
    assert [step for step, _ in readings] == [3, 4, 7, 8]
    assert [f["epoch"] for _, f in readings] == [0.75, 1.0, 1.75, 2.0]
    for _, figures in readings:
        assert figures["samples_per_s"] > 0 and figures["step_ms"] > 0
        assert 0 <= figures["data_wait"] <= 1
        assert "decoded" not in figures  # no cache: nothing to count
    records = [r for r in caplog.records if r.name == "flyp_ray.finetune.loop"]
    lines = [r.getMessage() for r in records]
    assert [line.split(":")[0] for line in lines] == ["epoch 1 step 3/4", "epoch 1/2",
                                                      "epoch 2 step 3/4", "epoch 2/2"]
    # A terminal (INFO) gets the first line and then one a minute; --verbose (DEBUG) all.
    assert [r.levelno for r in records] == [logging.INFO] + [logging.DEBUG] * 3
    assert "samples/s" in lines[0] and "ms/step" in lines[0] and "data wait" in lines[0]
    assert "train" in lines[1] and "eval" in lines[1] and "data wait" in lines[1]


def test_the_cache_shows_what_each_epoch_decoded(tmp_path: Path) -> None:
    cfg = config(tmp_path, dataset={"cache": "disk", "cache_dir": str(tmp_path / "cache")})
    readings: list[dict[str, float]] = []
    run = build_run(cfg, CPU)
    loop.run_epochs(run, 0, lambda epoch, metrics: None, lambda _, f: readings.append(f))
    assert [f["decoded"] for f in readings] == [64, 0]  # the first epoch fills it

    # Another run on the node (a later trial) finds the training split decoded already.
    again = build_run(cfg, CPU)
    later: list[dict[str, float]] = []
    loop.run_epochs(again, 0, lambda epoch, metrics: None, lambda _, f: later.append(f))
    assert [f["decoded"] for f in later] == [0, 0]


def test_train_loss_is_the_mean_of_the_step_losses(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = build_run(config(tmp_path, log_every_steps=3), CPU)
    losses: list[float] = []
    step = loop.loss_step

    def recorded(*args: Any) -> torch.Tensor:
        loss = step(*args)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(loop, "loss_step", recorded)
    metrics = loop.train_epoch(run, 1)
    assert len(losses) == 4
    assert metrics["train/loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_a_diverged_loss_stops_the_epoch_at_the_next_reading(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    run = build_run(config(tmp_path, log_every_steps=2), CPU)
    taken: list[int] = []
    step = loop.loss_step

    def nan_at_step_1(*args: Any) -> torch.Tensor:
        taken.append(1)
        loss = step(*args)
        return loss * float("nan") if len(taken) == 1 else loss

    monkeypatch.setattr(loop, "loss_step", nan_at_step_1)
    with pytest.raises(TrialDiverged, match="at epoch 1, in steps 1-2"):
        loop.train_epoch(run, 1)
    assert len(taken) == 2  # found at the first reading, not after the whole epoch


def test_progress_line_reads_as_one_short_line() -> None:
    figures = {"samples_per_s": 3150.4, "step_ms": 81.24, "data_wait": 0.023}
    assert progress.line(figures) == "3150 samples/s, 81.2 ms/step, data wait 2%"
    assert progress.line({**figures, "decoded": 512}).endswith(", decoded 512")


def test_pace_lets_one_line_a_minute_through(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    pace = progress.Pace(every_s=60.0)
    levels = []
    for at in (0.0, 2.0, 32.0, 59.9, 60.5, 120.0, 120.5):
        now[0] = at
        levels.append(pace.level())
    # A minute is counted from the last INFO line: 60.5 s, then 120.5 s.
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG, logging.DEBUG,
                      logging.INFO, logging.DEBUG, logging.INFO]
