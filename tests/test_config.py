"""Strict config loading: types, ranges, YAML numbers, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from flyp_ray import config
from flyp_ray.errors import ConfigError
from flyp_ray.finetune.model import tiny_config_path
from tests.support.configs import tiny_config, write_config


def load_text(tmp_path: Path, text: str, *overrides: str) -> config.Config:
    """Load ``text`` as a config file, with the data set and model every config must name put
    after it where it names none (after: line numbers in messages stay those of ``text``)."""
    required = {"dataset": "dataset: {name: synthetic}\n",
                "model": f"model: {{arch: {tiny_config_path()}, pretrained: null}}\n"}
    head = "".join(v for k, v in required.items()
                   if not text.startswith(k) and f"\n{k}:" not in text)
    path = tmp_path / "c.yaml"
    path.write_text(text + head)
    return config.load(path, overrides)


def test_defaults_and_sections(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    assert cfg.train.method == "flyp"
    assert cfg.train.batch_size == 16
    assert cfg.source.endswith("c.yaml")


def test_relative_sqlite_store_is_made_absolute_where_it_was_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray workers run in a folder of Ray's: a relative sqlite path must not travel as such."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative = load_text(tmp_path, "tracking: {uri: 'sqlite:///mlflow.db'}\n")
    assert relative.tracking.uri == f"sqlite:///{work / 'mlflow.db'}"
    override = load_text(tmp_path, "", "tracking.uri=sqlite:///runs/m.db")
    assert override.tracking.uri == f"sqlite:///{work / 'runs' / 'm.db'}"
    absolute = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert load_text(tmp_path, f"tracking: {{uri: '{absolute}'}}\n").tracking.uri == absolute


def test_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "train: {lr: 1e-5, min_lr: 1e-7}\n")
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == 1e-7


def test_quoted_number_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml: train.lr: expected a number, got the "
                                          r"string '1e-5' \(write it without quotes\)"):
        load_text(tmp_path, "train: {lr: '1e-5'}\n")


@pytest.mark.parametrize(("text", "key", "value"), [
    ("train: {lgo: true}\n", "train.lgo", "unknown key"),
    ("trian: {}\n", "trian", "unknown key"),
    ("train: {epochs: 2.5}\n", "train.epochs", "2.5"),
    ("train: {lr: -1.0}\n", "train.lr", "-1.0"),
    ("train: {precision: fp8}\n", "train.precision", "fp8"),
    ("train: {temperature: 0.0005}\n", "train.temperature", "0.0005"),
    ("train: {recipe: clip, temperature: 0.005}\n", "train.temperature", "max_logit_scale 100"),
    ("train: {max_logit_scale: 50.0, temperature: 0.01}\n", "train.temperature", "0.01"),
    ("train: {recipe: adam}\n", "train.recipe", "'adam'"),
    ("train: {adam_beta2: 1.0}\n", "train.adam_beta2", "1.0"),
    ("train: {adam_beta1: -0.1}\n", "train.adam_beta1", "-0.1"),
    ("train: {adam_eps: 0.0}\n", "train.adam_eps", "0.0"),
    ("train: {max_logit_scale: 0.5}\n", "train.max_logit_scale", "0.5"),
    ("train: {decay_gains_biases: 'no'}\n", "train.decay_gains_biases", "'no'"),
    ("train: {min_lr: 1.0}\n", "train.min_lr", "1.0"),
    ("search: {space: {lr: {type: float, low: 1.0, high: 0.1}}}\n", "search.space.lr.low", "1.0"),
    ("search: {space: {lr: {type: float, low: 0.0, high: 0.1, log: true}}}\n",
     "search.space.lr.low", "0.0"),
    ("search: {space: {lgo: {type: float, low: 0.1, high: 1.0}}}\n", "search.space.lgo",
     "not a train field"),
    ("search: {num_samples: 0}\n", "search.num_samples", "0"),
    ("search: {metric: [id_val/acc, ood_val/acc], mode: max}\n", "search.mode", "max"),
    ("dataset: {name: imagenet21k}\n", "dataset.name", "imagenet21k"),
    ("dataset: {name: iwildcam}\n", "dataset.root", "required"),
    ("resources: {workers: 0}\n", "resources.workers", "0"),
    ("train: [1, 2]\n", "train", "expected a mapping"),
    ("tracking: {promotion: {policy: sometimes}}\n", "tracking.promotion.policy", "'sometimes'"),
    ("tracking: {promotion: {min_delta: -0.1}}\n", "tracking.promotion.min_delta", "-0.1"),
    ("tracking: {promotion: {guard: {ood_test/acc: -0.01}}}\n",
     "tracking.promotion.guard.ood_test/acc", "-0.01"),
    ("tracking: {promotion: {guard: {id_val/acc: 0.01}}}\n",
     "tracking.promotion.guard.id_val/acc", "the search metric itself"),
])
def test_bad_values_name_key_and_value(tmp_path: Path, text: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'c.yaml'}: {key}:"), message
    assert value in message and "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml: malformed YAML at line 3"):
        load_text(tmp_path, "train:\n  lr: [1\nmodel: {}\n")


def test_overrides_bare_and_dotted(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "", "lr=3e-5", "dataset.subsample=8", "search.num_samples=3",
                    "storage=/tmp/x")
    assert cfg.train.lr == 3e-5
    assert cfg.dataset.subsample == 8
    assert cfg.search.num_samples == 3
    assert cfg.storage == "/tmp/x"


def test_override_with_unknown_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--set: lrr: unknown key"):
        load_text(tmp_path, "", "lrr=1")
    with pytest.raises(ConfigError, match=r"dataset.rooot: unknown key"):
        load_text(tmp_path, "", "dataset.rooot=/x")


def test_with_train_checks_sampled_values(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    assert config.with_train(cfg, lr=2e-5, epochs=3).train.lr == 2e-5
    with pytest.raises(ConfigError, match="train.lr"):
        config.with_train(cfg, lr=-1.0)


def test_search_space_parses(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
search:
  space:
    lr: {type: float, low: 1e-6, high: 1e-4, log: true}
    batch_size: {type: categorical, choices: [16, 32]}
    warmup_steps: {type: int, low: 0, high: 100}
""")
    assert cfg.search.space["lr"].low == 1e-6
    assert cfg.search.space["batch_size"].choices == [16, 32]


def test_recipe_defaults_are_the_flyp_references(tmp_path: Path) -> None:
    train = config.resolve_recipe(load_text(tmp_path, "").train)
    assert train.recipe == "flyp"
    assert (train.adam_beta1, train.adam_beta2, train.adam_eps) == (0.9, 0.999, 1e-8)
    assert train.decay_gains_biases is True and train.max_logit_scale is None


def test_one_setting_switches_to_clips_recipe_and_a_set_field_wins(tmp_path: Path) -> None:
    train = config.resolve_recipe(load_text(tmp_path, "", "recipe=clip").train)
    assert (train.adam_beta1, train.adam_beta2, train.adam_eps) == (0.9, 0.98, 1e-6)
    assert train.decay_gains_biases is False and train.max_logit_scale == 100.0
    mixed = load_text(tmp_path, "train: {recipe: clip, adam_eps: 1e-8}\n").train
    assert config.resolve_recipe(mixed).adam_eps == 1e-8
    assert config.resolve_recipe(mixed).adam_beta2 == 0.98
    # Resolving is idempotent: the resolved values, run again, are the same run.
    assert config.resolve_recipe(train) == train


def test_a_search_may_vary_the_recipe(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
search:
  space:
    recipe: {type: categorical, choices: [flyp, clip]}
    adam_beta2: {type: float, low: 0.95, high: 0.999}
""")
    trial = config.with_train(cfg, recipe="clip", adam_beta2=0.97)
    assert config.resolve_recipe(trial.train).max_logit_scale == 100.0
    assert config.resolve_recipe(trial.train).adam_beta2 == 0.97


def test_mlflow_params_show_the_effective_recipe(tmp_path: Path) -> None:
    params = config.train_params(load_text(tmp_path, "", "recipe=clip").train)
    assert (params["recipe"], params["adam_beta2"], params["adam_eps"]) == ("clip", 0.98, 1e-6)
    assert params["decay_gains_biases"] is False and params["max_logit_scale"] == 100.0
    flyp = config.train_params(load_text(tmp_path, "").train)
    assert flyp["adam_beta2"] == 0.999 and flyp["max_logit_scale"] == "null"  # no clamp


def test_temperatures_past_clips_cap_are_allowed_without_a_clamp(tmp_path: Path) -> None:
    assert load_text(tmp_path, "train: {temperature: 0.005}\n").train.temperature == 0.005
    assert load_text(tmp_path, "train: {recipe: clip, temperature: 0.01}\n").train.recipe == "clip"


def test_last_best_takes_the_later_of_equal_epochs() -> None:
    # Ray Train keeps the later of two equally scored checkpoints: the chosen epoch must be it.
    epochs = [{"epoch": 1, "acc": 0.4}, {"epoch": 2, "acc": 0.4}, {"epoch": 3, "acc": 0.3}]
    assert config.last_best(epochs, lambda e: e["acc"], "max")["epoch"] == 2
    assert config.last_best(epochs, lambda e: e["acc"], "min")["epoch"] == 3
    losses = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.2}, {"epoch": 3, "loss": 0.2}]
    assert config.last_best(losses, lambda e: e["loss"], "min")["epoch"] == 3
    # between trials the earlier of equals stays first
    assert config.best_first(epochs, lambda e: e["acc"], "max")[0]["epoch"] == 1
