"""Population-based training: what validate refuses, and a real PBT search on Ray Tune + Train.

The search test selects on ``train/lr`` so that Tune's ranking is known in advance: with
``search.seed: 0`` Tune's generator draws lr 1.9e-3 for trial 0 and 3e-4 for trial 1, and a
trial's ``train/lr`` is its lr times the schedule's factor, the same for both at any epoch. It
runs Tune's synchronous mode with an interval of 2 over 4 epochs: whichever trial starts first
waits at epoch 2 for the other, so there is exactly one decision, with both trials present, and
trial 1 continues from trial 0's checkpoint of epoch 2 however the two were scheduled (in the
asynchronous mode, a trial that starts late may find the other already finished).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flyp_ray import cli, config
from flyp_ray.config import TrainConfig
from flyp_ray.finetune import optim
from flyp_ray.search import pbt, tune
from flyp_ray.tracking import runs
from tests.support.configs import tiny_config, write_config

PBT = {"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5}


def pbt_config(tmp: Path, *, epochs: int = 4, train: dict | None = None, **search: object) -> Path:
    raw = tiny_config(tmp, dataset={"subsample": 16},
                      train={"epochs": epochs, "batch_size": 8, "warmup_steps": 1,
                             **(train or {})},
                      search={"num_samples": 2, "max_concurrent_trials": 2, "scheduler": PBT,
                              **search})
    return write_config(tmp / "pbt.yaml", raw)


@pytest.mark.parametrize(("search", "train", "key", "says"), [
    ({"space": {"batch_size": {"type": "int", "low": 8, "high": 16}}}, {},
     "search.space.batch_size", "works for lr, weight_decay, temperature, min_lr only"),
    ({"metric": ["id_val/acc", "ood_val/acc"], "mode": ["max", "max"]}, {},
     "search.metric", "ranks trials on one metric"),
    ({"scheduler": {**PBT, "perturbation_interval": 4}}, {},
     "search.scheduler.perturbation_interval", "must be < train.epochs (4)"),
    ({"max_concurrent_trials": 1}, {},
     "search.max_concurrent_trials", "the population trains side by side"),
    ({"recheck": {"top_k": 1, "seeds": 1}}, {}, "search.recheck", "not with pbt"),
    ({}, {"method": "lp"}, "train.method", "lp has no epochs to continue"),
    ({"scheduler": {"type": "asha", "synch": True}}, {},
     "search.scheduler.synch", "only pbt and pb2 wait for the population"),
    ({"scheduler": {**PBT, "type": "pb2"},
      "space": {"temperature": {"type": "categorical", "choices": [0.01, 0.05]}}}, {},
     "search.space.temperature.type", "pb2 models numeric ranges"),
])
def test_validate_refuses_what_pbt_cannot_do(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             search: dict, train: dict, key: str,
                                             says: str) -> None:
    path = pbt_config(tmp_path, train=train, **search)
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key}: " in err[0] and says in err[0], err


def test_pb2_over_a_numeric_space_validates(tmp_path: Path) -> None:
    cfg = config.load(pbt_config(tmp_path, scheduler={**PBT, "type": "pb2"}))
    assert type(tune.scheduler(cfg)).__name__ == "PB2"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()` before")
def test_continued_optimizer_takes_the_new_rate_and_decay_and_keeps_its_moments() -> None:
    """After a donor's state is loaded, the optimizer trains on with this config's values at
    the donor's point of the schedule: the rate a run with these values from the start has."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    donor = TrainConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2, epochs=2,
                        decay_gains_biases=False)
    taker = TrainConfig(lr=4e-4, weight_decay=0.02, warmup_steps=2, epochs=2,
                        decay_gains_biases=False)
    trained = optim.build_state(model, donor, 10, torch.device("cpu"))
    for _ in range(5):
        model(torch.randn(3, 4)).square().sum().backward()
        trained.optimizer.step()
        trained.scheduler.step()
    state = optim.build_state(model, taker, 10, torch.device("cpu"))
    state.optimizer.load_state_dict(trained.optimizer.state_dict())
    state.scheduler.load_state_dict(trained.scheduler.state_dict())
    optim.adopt_values(state, model, taker)

    fresh = optim.build_state(model, taker, 10, torch.device("cpu"))
    for _ in range(5):
        fresh.scheduler.step()  # the same point of the schedule, nothing trained
    assert [g["lr"] for g in state.optimizer.param_groups] == [
        g["lr"] for g in fresh.optimizer.param_groups]
    assert [g["weight_decay"] for g in state.optimizer.param_groups] == [0.0, 0.02]
    moments = [s["exp_avg"] for s in trained.optimizer.state.values()]
    assert all(torch.equal(a, s["exp_avg"])
               for a, s in zip(moments, state.optimizer.state.values(), strict=True))
    assert state.scheduler.last_epoch == 5


@pytest.mark.slow
def test_pbt_search_continues_the_worse_trial_from_the_better(ray_session: None,
                                                              tmp_path: Path) -> None:
    path = pbt_config(tmp_path, metric="train/lr", mode="max", seed=0,
                      scheduler={**PBT, "perturbation_interval": 2, "synch": True})
    summary = tune.run_search(config.load(path))
    assert summary["num_trials"] == 2 and summary["num_failed"] == 0

    folder = tmp_path / "results" / "search-pbt"
    exploits = (folder / "pbt_global.txt").read_text().splitlines()  # Tune's own record
    assert len(exploits) == 1, exploits
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    assert experiment is not None
    trials = {r.data.tags[runs.TRIAL_TAG]: r for r in client.search_runs(
        [experiment.experiment_id], f"tags.`{runs.KIND_TAG}` = 'trial'")}
    first, second = sorted(trials)
    (entry,) = json.loads(trials[second].data.tags[pbt.LINEAGE_TAG])
    assert entry["from_trial"] == first and entry["from_epoch"] == 2 and "lr" in entry["changed"]
    assert pbt.LINEAGE_TAG not in trials[first].data.tags
    lr = entry["values"]["lr"]
    # The taker trains on as a new Train run; the donor, paused at epoch 2 to wait for it,
    # continues its own.
    assert sorted(p.name for p in (folder / "trials").iterdir()) == [first, second, f"{second}-e2"]
    charted = {m.step: m.value for m in client.get_metric_history(
        trials[second].info.run_id, "pbt/lr")}
    assert charted[2] == pytest.approx(lr) and charted[0] != pytest.approx(lr)

    # Each trial's history holds every epoch once, though both Train runs paused at epoch 2
    # may have trained epoch 3 before their processes stopped: the taker's epoch 3 is its
    # continuation's, the donor's the one its own run resumed with. The taker trained epoch 3
    # at the new rate from the donor's point of the schedule: its train/lr over the donor's is
    # the ratio of the two rates.
    for trial in trials.values():
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "epoch")]
        assert sorted(steps) == [1, 2, 3, 4], steps
    taker, donor = (_history(client, trials[t].info.run_id, "train/lr") for t in (second, first))
    donor_lr = float(trials[first].data.params["lr"])
    assert taker[3] / donor[3] == pytest.approx(lr / donor_lr, rel=1e-9)


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """A metric by epoch."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}
