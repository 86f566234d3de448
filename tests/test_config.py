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
    ("train: {temperature: 0.001}\n", "train.temperature", "0.001"),
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
