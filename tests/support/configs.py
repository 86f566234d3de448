"""Small, fast configs: synthetic data, the tiny model, one CPU worker, a local sqlite MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flyp_ray.finetune.model import tiny_config_path


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """Write a config mapping as YAML and return its path."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


LR_SPACE = {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}


def tiny_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast config: synthetic data, the tiny model, one CPU worker, local sqlite, and a
    search over the learning rate (a section given here is merged into the one below)."""
    raw: dict[str, Any] = {
        "dataset": {"name": "synthetic", "subsample": 64},
        "model": {"arch": str(tiny_config_path()), "pretrained": None},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-3, "warmup_steps": 2,
                  "eval_batch_size": 64},
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "max_failures": 0},
        "search": {"space": LR_SPACE},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test"},
        "storage": str(tmp / "results"),
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def named(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with what every config must name filled in where it does not: the synthetic data
    set and the tiny model with random weights."""
    dataset = {"name": "synthetic", **raw.get("dataset", {})}
    model = {"arch": str(tiny_config_path()), "pretrained": None, **raw.get("model", {})}
    return {**raw, "dataset": dataset, "model": model}
