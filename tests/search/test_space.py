"""The search space: Optuna distributions from ``search.space``, samplers, warm-start points."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.search.optuna import OptunaSearch

from flyp_ray import config
from flyp_ray.errors import ConfigError
from flyp_ray.search import space as search_space
from tests.support import REPO
from tests.support.configs import tiny_config, write_config


def load(tmp_path: Path, **search: Any) -> config.Config:
    return config.load(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, search=search)))


def test_float_log_int_and_categorical(tmp_path: Path) -> None:
    cfg = load(tmp_path, space={
        "lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
        "warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 10},
        "epochs": {"type": "int", "low": 1, "high": 64, "log": True},
        "method": {"type": "categorical", "choices": ["flyp", "ce"]},
        "temperature": {"type": "categorical", "choices": [None, 0.05]},
    })
    space = search_space.distributions(cfg)
    assert space["lr"] == FloatDistribution(1e-6, 1e-4, log=True)
    assert space["weight_decay"] == FloatDistribution(0.0, 0.3, step=0.1)
    assert space["warmup_steps"] == IntDistribution(0, 100, step=10)
    assert space["epochs"] == IntDistribution(1, 64, log=True)
    assert space["method"] == CategoricalDistribution(["flyp", "ce"])
    assert space["temperature"] == CategoricalDistribution([None, 0.05])


def test_samples_lie_in_the_space_and_make_valid_configs(tmp_path: Path) -> None:
    cfg = load(tmp_path, space={
        "lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
        "warmup_steps": {"type": "int", "low": 0, "high": 9},
    })
    space = search_space.distributions(cfg)
    study = optuna.create_study(sampler=search_space.sampler(cfg.search, cfg.source))
    for _ in range(20):
        params = study.ask(fixed_distributions=space).params
        assert 1e-6 <= params["lr"] <= 1e-4
        assert isinstance(params["warmup_steps"], int)
        trial_cfg = config.with_train(cfg, **params)
        assert trial_cfg.train.lr == params["lr"]


def test_seeded_sampler_repeats_itself(tmp_path: Path) -> None:
    cfg = load(tmp_path, seed=7, space={"lr": {"type": "float", "low": 1e-6, "high": 1e-2,
                                               "log": True}})
    space = search_space.distributions(cfg)

    def draws() -> list[float]:
        study = optuna.create_study(sampler=search_space.sampler(cfg.search, cfg.source))
        return [study.ask(fixed_distributions=space).params["lr"] for _ in range(5)]

    assert draws() == draws()


@pytest.mark.parametrize(("name", "kind"), [
    ("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
    ("nsga2", optuna.samplers.NSGAIISampler), ("gp", optuna.samplers.GPSampler),
])
def test_sampler_by_name(tmp_path: Path, name: str, kind: type) -> None:
    cfg = load(tmp_path, sampler=name, space={"lr": {"type": "float", "low": 1e-6, "high": 1e-4}})
    assert isinstance(search_space.sampler(cfg.search, cfg.source), kind)


@pytest.mark.parametrize(("space", "key", "problem"), [
    ({"lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True, "step": 1e-6}},
     "search.space.lr.step", "cannot be combined with log"),
    ({"warmup_steps": {"type": "int", "low": 0, "high": 10, "step": 2.5}},
     "search.space.warmup_steps.step", "whole number"),
    ({"temperature": {"type": "float", "low": 0.0005, "high": 0.05, "log": True}},
     "search.space.temperature.low", "between 0.001 and 10"),
    ({"epochs": {"type": "float", "low": 1, "high": 5}},
     "search.space.epochs.low", "expected an integer"),
    ({"method": {"type": "categorical", "choices": ["flyp", "flip"]}},
     "search.space.method.choices[1]", "must be one of"),
    ({"method": {"type": "categorical", "choices": [["flyp"]]}},
     "search.space.method.choices[0]", "must be a number, string"),
])
def test_space_errors_name_the_key(tmp_path: Path, space: dict[str, Any], key: str,
                                   problem: str) -> None:
    cfg = load(tmp_path, space=space)
    with pytest.raises(ConfigError, match=problem) as err:
        search_space.distributions(cfg)
    assert err.value.key == key
    assert err.value.source.endswith("c.yaml")


def test_clips_recipe_refuses_a_temperature_range_under_its_clamp(tmp_path: Path) -> None:
    """``--set recipe=clip`` on a shipped file: the temperature range reaches under the clamp's
    bound, so the search stops before Ray starts rather than failing trial by trial."""
    path = REPO / "search_spaces" / "iwildcam.yaml"
    with pytest.raises(ConfigError, match="must be >= 0.01 .1 / max_logit_scale 100.") as err:
        search_space.distributions(config.load(path, ["dataset.root=/d", "recipe=clip"]))
    assert err.value.key == "search.space.temperature.low"
    fixed = ["dataset.root=/d", "recipe=clip", "search.space.temperature.low=0.01"]
    assert search_space.distributions(config.load(path, fixed))


def test_a_corner_that_clashes_across_dimensions_is_refused(tmp_path: Path) -> None:
    cfg = load(tmp_path, space={
        "recipe": {"type": "categorical", "choices": ["flyp", "clip"]},
        "temperature": {"type": "float", "low": 0.005, "high": 0.05, "log": True}})
    with pytest.raises(ConfigError, match="the corner recipe='clip', temperature=0.005 is "
                                          "refused: train.temperature: must be >= 0.01") as err:
        search_space.distributions(cfg)
    assert err.value.key == "search.space"


def test_empty_space_is_refused(tmp_path: Path) -> None:
    cfg = load(tmp_path, space={})
    with pytest.raises(ConfigError, match="search.space: is empty"):
        search_space.searcher(cfg, study_name="s")


def test_cmaes_without_its_package_or_with_two_metrics(tmp_path: Path) -> None:
    cfg = load(tmp_path, sampler="cmaes", metric=["id_val/acc", "ood_val/acc"], mode=["max", "max"],
               space={"lr": {"type": "float", "low": 1e-6, "high": 1e-4}})
    with pytest.raises(ConfigError, match="search.sampler: cmaes optimises one metric"):
        search_space.sampler(cfg.search, cfg.source)


@pytest.mark.skipif(importlib.util.find_spec("cmaes") is not None, reason="cmaes is installed")
def test_cmaes_names_its_missing_package(tmp_path: Path) -> None:
    cfg = load(tmp_path, sampler="cmaes",
               space={"lr": {"type": "float", "low": 1e-6, "high": 1e-4}})
    with pytest.raises(ConfigError, match="search.sampler: cmaes needs the 'cmaes' package"):
        search_space.sampler(cfg.search, cfg.source)


def test_searcher_single_and_multi_objective(tmp_path: Path) -> None:
    cfg = load(tmp_path, metric=["id_val/acc", "ood_val/acc"], mode=["max", "max"],
               space={"lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True}})
    searcher = search_space.searcher(cfg, study_name="multi")
    assert isinstance(searcher, OptunaSearch)
    assert searcher.metric == ["id_val/acc", "ood_val/acc"]
    point = searcher.suggest("t1")
    assert point is not None and 1e-6 <= point["lr"] <= 1e-4


def test_points_to_evaluate_come_first(tmp_path: Path) -> None:
    cfg = load(tmp_path, space={"lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
                                "method": {"type": "categorical", "choices": ["flyp", "ce"]}})
    points = [{"lr": 3e-5, "method": "ce"}]
    searcher = search_space.searcher(cfg, study_name="warm", points=points)
    assert searcher.suggest("t1") == {"lr": 3e-5, "method": "ce"}
    assert searcher.suggest("t2") != {"lr": 3e-5, "method": "ce"}


def test_fitting_points_fill_drop_and_dedupe(tmp_path: Path) -> None:
    cfg = load(tmp_path, space={"lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
                                "warmup_steps": {"type": "int", "low": 0, "high": 10}})
    space = search_space.distributions(cfg)
    fallback = {"lr": 1e-5, "warmup_steps": 2}
    points = [
        {"lr": 2e-5, "warmup_steps": 3, "weight_decay": 0.5},  # extra keys are dropped
        {"lr": 2e-5, "warmup_steps": 3},  # a repeat
        {"lr": 5e-5},  # warmup_steps from the fixed config
        {"lr": 1e-2, "warmup_steps": 3},  # outside the range
        {"lr": 2e-5, "warmup_steps": 2.5},  # not an integer
        {"lr": "2e-5", "warmup_steps": 3},  # a string is not a number
    ]
    assert search_space.fitting_points(space, points, fallback) == [
        {"lr": 2e-5, "warmup_steps": 3}, {"lr": 5e-5, "warmup_steps": 2}]
