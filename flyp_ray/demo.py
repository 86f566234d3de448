"""``flyp-ray demo``: the whole product on built-in data, on one machine, in a few minutes.

1. The tiny open_clip model gets a short CLIP pre-training on synthetic *captions* (cached), so
   that it starts with real zero-shot accuracy, as a downloaded CLIP would.
2. Its zero-shot metrics are measured and logged as an MLflow run: the baseline to beat.
3. A small FLYP search (Ray Tune + Optuna TPE + ASHA) finetunes it on the synthetic shapes set,
   every trial a Ray Train run, all of it tracked in a local sqlite MLflow; the best model is
   logged and registered.

Nothing is downloaded. Everything lands in one folder (``./flyp-ray-demo`` by default).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from flyp_ray import config
from flyp_ray.data.load import load_data
from flyp_ray.finetune import pretrain
from flyp_ray.finetune.evaluate import evaluate_splits, zero_shot_head
from flyp_ray.finetune.model import load_model, tiny_config_path
from flyp_ray.search import report, tune
from flyp_ray.tracking import inputs, runs

log = logging.getLogger(__name__)

EXPERIMENT = "flyp-demo"


def demo_config(folder: Path, pretrained: Path) -> config.Config:
    """The demo's config: small enough for a 2-core laptop, real enough to show FLYP working."""
    raw: dict[str, Any] = {
        "dataset": {"name": "synthetic", "subsample": 300},
        "model": {"arch": str(tiny_config_path()), "pretrained": str(pretrained)},
        "train": {"method": "flyp", "epochs": 4, "batch_size": 32, "lr": 3.0e-4,
                  "weight_decay": 0.1, "warmup_steps": 5, "eval_batch_size": 300},
        # Two trials at a time, each one worker on half a core: both fit on a 2-core machine.
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "max_failures": 1},
        "search": {
            "metric": "id_val/acc", "mode": "max", "num_samples": 6,
            "max_concurrent_trials": 2,
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            # The two best configs again with two new seeds each: the champion is the best mean.
            "recheck": {"top_k": 2, "seeds": 2},
            "space": {
                "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True},
                "weight_decay": {"type": "float", "low": 0.0, "high": 0.3},
                "temperature": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
            },
        },
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": EXPERIMENT,
                     "registered_model": "flyp-demo"},
        "storage": str(folder / "results"),
    }
    return config.from_dict(raw, source="demo")


def zero_shot_metrics(cfg: config.Config) -> dict[str, float]:
    """Every split's metrics of the pretrained model's zero-shot head (no training)."""
    loaded = load_model(cfg.model, cfg.source)
    data = load_data(cfg.dataset, loaded.preprocess_train, loaded.preprocess_eval, cfg.source)
    device = torch.device("cpu")
    head = zero_shot_head(loaded.model, loaded.tokenizer, data.classnames, data.templates, device)
    splits = [split for name, split in data.splits.items() if name != "train"]
    return evaluate_splits(loaded.model, head, splits, batch_size=cfg.train.eval_batch_size,
                           device=device, precision="fp32")


def log_zero_shot(cfg: config.Config, metrics: dict[str, float]) -> str:
    """The baseline as an MLflow run of its own (method zeroshot, epoch 0)."""
    zs = config.with_train(cfg, method="zeroshot", epochs=0)
    run_id = runs.start_run(zs, "zeroshot", {runs.KIND_TAG: "zeroshot"})
    inputs.log_data(cfg.tracking.uri, run_id, inputs.measure(cfg))
    runs.log_metrics(cfg.tracking.uri, run_id, metrics, step=0)
    runs.end_run(cfg.tracking.uri, run_id)
    return run_id


def report_text(cfg: config.Config, zero_shot: dict[str, float], summary: dict[str, Any]) -> str:
    """The human-readable result: the zero-shot start, the best trial and the champion, with
    the best trial's hyperparameters, the model, where the results are and how to look."""
    return report.search_text(cfg, summary, first={"zero-shot": report.numbers(zero_shot)},
                              best_label="FLYP best", title="flyp-ray demo: done")


def run_demo(folder: Path) -> tuple[dict[str, Any], str]:
    """Pre-train (cached), measure zero-shot, search; the search summary and the report."""
    folder = folder.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log.info("step 1/3: tiny CLIP pre-training on synthetic captions (once; cached in %s)",
             pretrain.cache_dir())
    cfg = demo_config(folder, pretrain.pretrain_tiny())
    zero_shot = zero_shot_metrics(cfg)
    log_zero_shot(cfg, zero_shot)
    log.info("step 2/3: zero-shot evaluation of the pretrained model: id_val/acc %.3f, "
             "ood_val/acc %.3f", zero_shot["id_val/acc"], zero_shot["ood_val/acc"])
    log.info("step 3/3: FLYP search, %d trials, %d at a time", cfg.search.num_samples,
             cfg.search.max_concurrent_trials)
    summary = tune.run_search(cfg)
    summary["zero_shot_metrics"] = zero_shot
    return summary, report_text(cfg, zero_shot, summary)
