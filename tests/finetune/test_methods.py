"""The baselines, WiSE-FT and few-shot draws in the one loop, in one process (no Ray).

Runs the real loop code (:func:`flyp_ray.finetune.run.build_run`,
:func:`flyp_ray.finetune.loop.run_epochs`) on a test-written WILDS-format iWildCam folder read by
the real WILDS loader, with the tiny model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import ray.train
import torch

from flyp_ray.config import Config, from_dict
from flyp_ray.data import fewshot
from flyp_ray.data.load import inspect_data
from flyp_ray.distributed import draws, worker
from flyp_ray.errors import DataError
from flyp_ray.finetune import checkpoint, loop, probe, reports, wiseft
from flyp_ray.finetune.evaluate import unwrap
from flyp_ray.finetune.run import build_run
from tests.support.configs import tiny_config

CPU = torch.device("cpu")
TEST_SPLITS = ("id_test", "ood_test")


def config(tmp: Path, root: Path, **train: Any) -> Config:
    raw = tiny_config(tmp, dataset={"name": "iwildcam", "root": str(root)},
                      train={"epochs": 2, "batch_size": 8, "warmup_steps": 1, **train})
    return from_dict(raw, "test.yaml")


def run_to_end(cfg: Config) -> list[dict[str, float]]:
    """Every epoch's reported metrics of a fresh run of ``cfg``."""
    run = build_run(cfg, CPU)
    reports: list[dict[str, float]] = []
    loop.run_epochs(run, 0, lambda epoch, metrics: reports.append(metrics))
    return reports


def split_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if k.split("/")[0] in ("id_val", "id_test", "ood_val", "ood_test")}


@pytest.mark.parametrize("method", ["flyp", "ce", "lpft"])
def test_wiseft_ends_are_the_zero_shot_and_the_finetuned_model_exactly(
        tmp_path: Path, wilds_root: Path, method: str) -> None:
    zero_shot = split_metrics(run_to_end(config(tmp_path, wilds_root, method="zeroshot"))[-1])
    epochs = run_to_end(config(tmp_path, wilds_root, method=method, epochs=3,
                               wiseft_alphas=[0.0, 0.5, 1.0]))
    final = epochs[-1]
    # The finetuned end is the epoch best on id_val/acc (the last of equals, as Ray keeps).
    selected = max(reversed(epochs), key=lambda m: m["id_val/acc"])
    finetuned = split_metrics(selected)
    assert finetuned.keys() == zero_shot.keys() and "ood_test/acc" in finetuned
    assert finetuned != zero_shot  # training changed something, or the test proves nothing
    assert {k: final[f"wiseft/0.0/{k}"] for k in zero_shot} == zero_shot
    assert {k: final[f"wiseft/1.0/{k}"] for k in finetuned} == finetuned
    assert "wiseft/0.5/ood_test/acc" in final
    # Every epoch carries the WiSE-FT objective, so a search (and its scheduler) can use it;
    # before the sweep it is the current weights' value (alpha 1).
    for interim in epochs[:-1]:
        assert "wiseft/0.5/id_val/acc" not in interim
        assert interim["wiseft/best/id_val/acc"] == interim["id_val/acc"]
    best = final["wiseft/best/alpha"]
    assert final["wiseft/best/id_val/acc"] == final[f"wiseft/{best}/id_val/acc"]
    assert final["wiseft/best/id_val/acc"] == max(final[f"wiseft/{a}/id_val/acc"]
                                                  for a in ("0.0", "0.5", "1.0"))


def same_state(a: wiseft.State, b: wiseft.State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_mixes_towards_the_best_epoch_before_the_restart(
        tmp_path: Path, wilds_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A worker group restarted from epoch 2 finds epoch 1, the best on id_val, in storage."""
    storage = tmp_path / "run"
    first = build_run(config(tmp_path, wilds_root, epochs=1, wiseft_alphas=[0.0, 1.0]), CPU)

    def save(epoch: int, metrics: dict[str, float]) -> None:
        checkpoint.save(storage / worker.epoch_dir(epoch), unwrap(first.model), first.state,
                        epoch, metrics, worker.checkpoint_extra(first))

    reports: list[dict[str, float]] = []
    loop.run_epochs(first, 0, lambda epoch, metrics: (reports.append(metrics),
                                                      save(epoch, metrics)))
    best_weights = wiseft.snapshot(unwrap(first.model))
    # Epoch 2, worse on id_val: its weights move, and the best epoch stays 1.
    with torch.no_grad():
        for param in unwrap(first.model).parameters():
            param.add_(0.05 * torch.randn_like(param))
    worse = wiseft.snapshot(unwrap(first.model))
    save(2, {"epoch": 2.0, "id_val/acc": reports[0]["id_val/acc"] - 0.25})

    cfg = config(tmp_path, wilds_root, epochs=3, wiseft_alphas=[0.0, 1.0])
    resumed = build_run(cfg, CPU)
    latest = ray.train.Checkpoint(str(storage / worker.epoch_dir(2)))
    assert worker.restore(resumed, latest) == 2
    assert same_state(wiseft.snapshot(unwrap(resumed.model)), worse)
    assert resumed.best.epoch == 1 and resumed.best.state is not None
    assert same_state(resumed.best.state, best_weights)
    assert resumed.best.score == reports[0]["id_val/acc"]
    final: list[dict[str, float]] = []
    loop.run_epochs(resumed, 2, lambda epoch, metrics: final.append(metrics))
    (last,) = final
    assert last["wiseft/1.0/id_val/acc"] == max(reports[0]["id_val/acc"], last["id_val/acc"])

    # The best epoch's checkpoint gone (kept by another objective): said, and mixed from here.
    checkpoint_1 = storage / worker.epoch_dir(1)
    for file in checkpoint_1.iterdir():
        file.unlink()
    checkpoint_1.rmdir()
    again = build_run(cfg, CPU)
    with caplog.at_level(logging.WARNING, logger="flyp_ray.distributed.worker"):
        assert worker.restore(again, latest) == 2
    assert again.best.state is None
    assert "epoch 1 (best on id_val) has no checkpoint left" in caplog.text


def test_resuming_at_the_best_epoch_keeps_its_weights(tmp_path: Path, wilds_root: Path) -> None:
    run = build_run(config(tmp_path, wilds_root, epochs=1, wiseft_alphas=[1.0]), CPU)
    folder = tmp_path / worker.epoch_dir(1)
    loop.run_epochs(run, 0, lambda epoch, metrics: checkpoint.save(
        folder, unwrap(run.model), run.state, epoch, metrics, worker.checkpoint_extra(run)))
    resumed = build_run(config(tmp_path, wilds_root, epochs=2, wiseft_alphas=[1.0]), CPU)

    assert worker.restore(resumed, ray.train.Checkpoint(str(folder))) == 1
    assert resumed.best.epoch == 1 and resumed.best.state is not None
    assert same_state(resumed.best.state, wiseft.snapshot(unwrap(run.model)))


class Tripwire(torch.utils.data.Dataset[Any]):
    """A test split that fails the test when anything reads it."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        raise AssertionError(f"the linear probe read test split {self.name}")


def test_linear_probe_chooses_on_id_val_and_never_reads_a_test_split(
        tmp_path: Path, wilds_root: Path) -> None:
    cfg = config(tmp_path, wilds_root, method="lp", lp_l2=[0.0, 1.0, 1.0e6])
    run = build_run(cfg, CPU)
    splits = run.data.splits
    guarded = {name: dataclasses.replace(splits[name],
                                         dataset=Tripwire(name, len(splits[name].labels)))
               for name in TEST_SPLITS}
    start = run.model.head.detach().clone()
    run.data = dataclasses.replace(run.data, splits={**splits, **guarded})
    chosen = probe.fit_probe(run)  # any read of id_test or ood_test raises
    assert chosen["lp/l2"] in (0.0, 1.0, 1.0e6)
    # The choice is the strength whose head is best on id_val, ties to the stronger one.
    train = probe.features(run, probe.eval_view(splits["train"], splits["id_val"]))
    select = probe.features(run, splits["id_val"])
    scale = float(run.model.logit_scale.exp())
    accuracy = {l2: float(((scale * select[0] @ probe.fit_head(*train, start, scale, l2))
                           .argmax(1) == select[1]).float().mean()) for l2 in (0.0, 1.0, 1.0e6)}
    assert accuracy[chosen["lp/l2"]] == max(accuracy.values())
    assert not torch.equal(run.model.head, start) or chosen["lp/l2"] == 1.0e6


def test_linear_probe_without_id_val_is_refused(tmp_path: Path, wilds_root: Path) -> None:
    run = build_run(config(tmp_path, wilds_root, method="lp"), CPU)
    run.data = dataclasses.replace(run.data, splits={k: v for k, v in run.data.splits.items()
                                                     if k != "id_val"})
    with pytest.raises(DataError, match="id_val"):
        probe.fit_probe(run)


@pytest.mark.parametrize("classes", [4, 10])
def test_k_shot_draws_k_per_class_seeded(classes: int) -> None:
    labels = torch.arange(200) % classes
    for k in (1, 5):
        drawn = fewshot.draw(labels, k, seed=3)
        assert torch.bincount(labels[drawn], minlength=classes).tolist() == [k] * classes
        assert torch.equal(drawn, fewshot.draw(labels, k, seed=3))
    assert not torch.equal(fewshot.draw(labels, 5, seed=3), fewshot.draw(labels, 5, seed=4))
    with pytest.raises(DataError, match="k_shot"):
        fewshot.draw(labels, 200 // classes + 1, seed=0)


def test_k_shot_training_split_and_repeat_summary(tmp_path: Path, wilds_root: Path) -> None:
    run = build_run(config(tmp_path, wilds_root, method="flyp", k_shot=2), CPU)
    train = run.data.splits["train"]
    assert len(train.labels) == 2 * len(torch.unique(train.labels))
    assert [item[2] for item in train.dataset] == list(range(len(train.labels)))
    summary = draws.summarise([{"epoch": 2, "id_val/acc": 0.5}, {"epoch": 2, "id_val/acc": 0.7}])
    assert summary["id_val/acc"] == pytest.approx(0.6)
    assert summary["id_val/acc_std"] == pytest.approx(0.1414, abs=1e-3)
    assert summary["repeats"] == 2 and summary["epoch"] == 2


@pytest.mark.parametrize("train", [
    {"method": "zeroshot"},
    {"method": "lp", "wiseft_alphas": [0.0, 1.0]},
    {"method": "ce", "eval_splits": ["id_val"]},
    {"method": "lpft", "wiseft_alphas": [0.5], "eval_splits": ["id_val", "ood_val"]},
    {"method": "flyp", "wiseft_alphas": [0.0, 1.0]},
    {"method": "flyp", "repeats": 2, "k_shot": 2, "epochs": 2},
], ids=["zeroshot", "lp-wiseft", "ce-eval-splits", "lpft", "flyp-wiseft", "flyp-repeats"])
def test_the_names_validate_knows_are_what_runs_report(tmp_path: Path, wilds_root: Path,
                                                       train: dict[str, Any]) -> None:
    # validate checks search metrics against reports.reported: it must be exactly this.
    cfg = config(tmp_path, wilds_root, **train)
    expected = reports.reported(cfg.train, inspect_data(cfg.dataset, cfg.source).splits)
    if cfg.train.repeats > 1:  # as a run of draws reports: each epoch, the draws summarised
        per_draw: list[list[dict[str, float]]] = []
        for draw in range(cfg.train.repeats):
            epochs: list[dict[str, float]] = []
            loop.run_epochs(build_run(cfg, CPU, draw=draw), 0,
                            lambda epoch, metrics, into=epochs: into.append(metrics))
            per_draw.append(epochs)
        reported = [draws.summarise(rows) for rows in zip(*per_draw, strict=True)]
    else:
        reported = run_to_end(cfg)
    names = [{reports.pattern(k) for k in metrics} for metrics in reported]
    assert set.intersection(*names) == expected.every
    assert set.union(*names) == expected.some
