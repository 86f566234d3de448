"""A run of ``train.repeats`` few-shot draws: side by side (each draw a Train run of its own)
against the draws one after another inside one Train run (how repeats ran before).

Both train the same config (synthetic data, the tiny model, ``--k-shot`` images per class,
``--epochs``, one worker of ``--cpus`` CPUs per run) on one local Ray of ``--ray-cpus`` CPUs, in
turns (in a row, side by side, in a row, ...), so that a machine shared with other work slows
both alike; medians are compared. "Side by side" is ``flyp-ray train``'s path
(:func:`flyp_ray.distributed.draws.train`: the nested MLflow runs, the per-epoch means, every
epoch checkpointed); "in a row" is one TorchTrainer whose worker builds and trains each draw in
turn with the package's own run and loop, and checkpoints nothing (the old path's costs minus
its MLflow logging), so the comparison does not flatter the new path.

    python bench/fewshot_draws.py                          # R=4, 3 epochs, 1 CPU per run
    python bench/fewshot_draws.py --repeats-of-pair 3 --draws 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = str(Path(HERE).parent)
sys.path.insert(0, HERE)

import ray  # noqa: E402
import ray.train  # noqa: E402
from _common import machine, median, spread, worker_path  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from flyp_ray.config import Config, from_dict  # noqa: E402
from flyp_ray.distributed import draws, trainer  # noqa: E402
from flyp_ray.distributed.cluster import runtime_env  # noqa: E402
from flyp_ray.finetune.model import tiny_config_path  # noqa: E402


def bench_config(args: argparse.Namespace, folder: str) -> Config:
    raw = {
        "dataset": {"name": "synthetic"},
        "model": {"arch": str(tiny_config_path()), "pretrained": None},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 1.0e-4,
                  "warmup_steps": 1, "k_shot": args.k_shot, "repeats": args.draws,
                  "wiseft_alphas": None},
        "resources": {"workers": 1, "cpus_per_worker": args.cpus, "max_failures": 0},
        "tracking": {"uri": f"sqlite:///{folder}/mlflow.db", "experiment": "bench-draws"},
        "storage": f"{folder}/results",
    }
    return from_dict(raw, f"{folder}/bench.yaml")


def draws_in_a_row(loop_config: dict[str, Any]) -> None:
    """The Train worker of the old path: every draw built and trained in turn, one report."""
    from flyp_ray.distributed import worker
    from flyp_ray.finetune.loop import run_epochs

    cfg: Config = loop_config["config"]
    finals = []
    for draw in range(cfg.train.repeats):
        last: dict[str, float] = {}
        run_epochs(worker.worker_run(cfg, draw), 0, lambda _e, m, into=last: into.update(m))
        finals.append(last)
    with tempfile.TemporaryDirectory() as folder:
        ray.train.report(draws.summarise(finals),
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


def in_a_row(cfg: Config, name: str) -> tuple[float, float]:
    run = TorchTrainer(draws_in_a_row, train_loop_config={"config": cfg},
                       scaling_config=trainer.scaling(cfg),
                       run_config=ray.train.RunConfig(name=name,
                                                      storage_path=trainer.storage_path(cfg)))
    start = time.perf_counter()
    result = run.fit()
    return time.perf_counter() - start, float(result.metrics["id_val/acc"])


def side_by_side(cfg: Config, name: str) -> tuple[float, float]:
    start = time.perf_counter()
    outcome = draws.train(cfg, name=name, log_model=False)
    return time.perf_counter() - start, outcome.metrics["id_val/acc"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=4, help="train.repeats")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--k-shot", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs of each run's one worker")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats-of-pair", type=int, default=2, help="interleaved pairs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env({"PYTHONPATH": worker_path(HERE, REPO)}, local=True))
    row, side = [], []
    with tempfile.TemporaryDirectory() as folder:
        cfg = bench_config(args, folder)
        for i in range(args.repeats_of_pair):
            seconds, acc_row = in_a_row(cfg, f"row-{i}")
            row.append(seconds)
            seconds, acc_side = side_by_side(cfg, f"side-{i}")
            side.append(seconds)
            print(f"pair {i}: in a row {row[-1]:.1f} s (final id_val/acc {acc_row:.3f}), side "
                  f"by side {side[-1]:.1f} s (best epoch's mean {acc_side:.3f})", flush=True)
    ray.shutdown()
    out = {"draws": args.draws, "epochs": args.epochs, "k_shot": args.k_shot,
           "cpus_per_run": args.cpus, "ray_cpus": args.ray_cpus,
           "in_a_row_s": row, "side_by_side_s": side,
           "in_a_row_median_s": median(row), "side_by_side_median_s": median(side),
           "side_over_row": median(side) / median(row), "machine": machine()}
    print(f"{args.draws} draws x {args.epochs} epochs, {args.k_shot}-shot, {args.cpus} CPU per "
          f"run on {args.ray_cpus} Ray CPUs: in a row {median(row):.1f} s ({spread(row)}), side "
          f"by side {median(side):.1f} s ({spread(side)}); side/row "
          f"{out['side_over_row']:.2f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
