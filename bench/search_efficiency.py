"""Epochs TPE + ASHA and PBT spend to come within 1 point of a full grid's best ID-val accuracy.

Both searches train the tiny model on the built-in synthetic data set with the package's loop
(``loop.run_epochs``, one trial per Ray Tune trial, no Ray Train: what is measured is the search,
not the trial's plumbing). The grid tries every combination of lr x temperature x weight_decay
for ``--epochs`` epochs; Ray Tune's ``OptunaSearch`` (TPE) with ``ASHAScheduler`` (time attribute
``epoch``) samples the same ranges. Every reported epoch counts as one epoch spent, in the order
reported; the result is the search's epochs up to its first report within 1 point of the grid's
best, as a fraction of the grid's epochs (target: at most 25%).

``--pbt-population N`` (default 16: N x ``--epochs`` epochs, about what TPE + ASHA spends in all)
also runs Tune's ``PopulationBasedTraining`` over the same ranges, perturbing every epoch, as
``search.scheduler.type: pbt`` does: a trial continued from another's checkpoint takes the new
values with the same calls a Train worker makes (``optim.adopt_values``, ``apply_temperature``).

    python bench/search_efficiency.py                     # 4 x 3 x 2 grid, 4 epochs, 24 samples
    python bench/search_efficiency.py --pretrained --seeds 0,1,2   # from the pre-trained tiny
                                                                   # model, three sampler seeds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import optuna  # noqa: E402
import ray  # noqa: E402
import ray.tune  # noqa: E402
import torch  # noqa: E402
from _common import machine, worker_path  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from flyp_ray.config import DatasetConfig, ModelConfig, TrainConfig  # noqa: E402
from flyp_ray.data.load import load_data  # noqa: E402
from flyp_ray.finetune import checkpoint, loop, optim, pretrain  # noqa: E402
from flyp_ray.finetune.model import apply_temperature, load_model, tiny_config_path  # noqa: E402
from flyp_ray.finetune.run import make_run, seed_everything  # noqa: E402
from flyp_ray.search import pbt as flyp_pbt  # noqa: E402

METRIC = "id_val/acc"
GRID = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "temperature": [0.02, 0.05, 0.1],
        "weight_decay": [0.0, 0.2]}


def trainable(config: dict[str, Any]) -> None:
    """One trial: the loop on synthetic data, reporting ID-val accuracy every epoch."""
    torch.set_num_threads(1)
    seed_everything(0)
    loaded = load_model(ModelConfig(arch=str(tiny_config_path()), pretrained=config["weights"]))
    data = load_data(DatasetConfig(name="synthetic", subsample=config["subsample"]),
                     loaded.preprocess_train, loaded.preprocess_eval, "bench")
    train = TrainConfig(epochs=config["epochs"], batch_size=32, warmup_steps=5,
                        eval_batch_size=256, eval_splits=["id_val"], lr=config["lr"],
                        temperature=config["temperature"], weight_decay=config["weight_decay"])
    loader = DataLoader(data.splits["train"].dataset, batch_size=32, shuffle=True, drop_last=True)
    run = make_run(loaded.model, data, loaded.tokenizer, train, loader, torch.device("cpu"))

    start = restore(run, train)

    def report(epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch, METRIC: metrics[METRIC], "wall": time.time()}
        if not config.get("pbt"):
            ray.tune.report(row)
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(Path(folder), run.model, run.state, epoch, row)
            ray.tune.report(row, checkpoint=ray.tune.Checkpoint.from_directory(folder))

    loop.run_epochs(run, start, report)


def restore(run: Any, train: TrainConfig) -> int:
    """The epoch of the checkpoint PBT started this trial on (0: none), loaded with this
    trial's values taking over, as in a Train worker (``worker.adopt_perturbed``)."""
    saved = ray.tune.get_checkpoint()
    if saved is None:
        return 0
    with saved.as_directory() as folder:
        checkpoint.load_weights(folder, run.model)
        epoch = checkpoint.load_training(Path(folder), run.state)
    optim.adopt_values(run.state, run.model, train)
    apply_temperature(run.model, train)
    return epoch


def reports(results: ray.tune.ResultGrid) -> list[tuple[float, float]]:
    """(wall time, accuracy) of every epoch reported by every trial."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or "wall" not in frame:
            raise RuntimeError(f"no per-epoch results from {result.path}: {result.error}")
        rows += list(zip(frame["wall"], frame[METRIC], strict=True))
    return sorted(rows)


def run(param_space: dict[str, Any], storage: str, name: str, **tune: Any) -> ray.tune.ResultGrid:
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"cpu": 1}), param_space=param_space,
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode="max", **tune),
        # The JSON logger writes the per-epoch rows that metrics_dataframe reads back.
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      callbacks=[JsonLoggerCallback()]))
    return tuner.fit()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--subsample", type=int, default=256, help="images per split")
    p.add_argument("--samples", type=int, default=24, help="TPE + ASHA trials (0: none)")
    p.add_argument("--seeds", default="0", help="TPE sampler seeds, comma-separated: one "
                   "search each against the same grid")
    p.add_argument("--pretrained", action="store_true",
                   help="start every trial from the pre-trained tiny model "
                        "(flyp_ray.finetune.pretrain)")
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--grid-best", type=float, default=None,
                   help="skip the grid: its best, printed by an earlier run of the same arguments")
    p.add_argument("--pbt-population", type=int, default=16,
                   help="PBT's population (0: no PBT search)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    weights = str(pretrain.pretrain_tiny()) if args.pretrained else None
    fixed = {"epochs": args.epochs, "subsample": args.subsample, "weights": weights}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": worker_path(HERE),
                                      "OMP_NUM_THREADS": "1"}})
    grid_epochs = math.prod(len(v) for v in GRID.values()) * args.epochs
    with tempfile.TemporaryDirectory() as storage:
        if args.grid_best is None:
            grid_space = {**fixed, **{k: ray.tune.grid_search(v) for k, v in GRID.items()}}
            grid = reports(run(grid_space, storage, "grid",
                               max_concurrent_trials=args.concurrent))
            best = max(acc for _, acc in grid)
        else:  # the grid of an earlier run of the same arguments: it is deterministic
            grid, best = [], args.grid_best
        print(f"grid: best {METRIC} {best:.4f} in {grid_epochs} epochs", flush=True)
        seeds = [int(seed) for seed in args.seeds.split(",")]
        searches = [search(args, fixed, storage, seed, best, grid_epochs)
                    for seed in seeds if args.samples]
        populations = [population(args, fixed, storage, seed, best, grid_epochs)
                       for seed in seeds if args.pbt_population]
    ray.shutdown()
    fractions = [s["fraction"] for s in searches]
    reached = [f for f in fractions if f is not None]
    out = {"grid_best": best, "grid_epochs": grid_epochs, "grid_epochs_reported": len(grid),
           "pretrained": args.pretrained, "searches": searches, "pbt": populations,
           "median_fraction": statistics.median(reached) if searches
           and len(reached) == len(fractions) else None, "machine": machine()}
    if out["median_fraction"] is not None:
        print(f"median over {len(fractions)} seed(s): {100 * out['median_fraction']:.0f}% of "
              f"the grid's epochs")
    pbt_reached = [p["fraction"] for p in populations if p["fraction"] is not None]
    out["pbt_median_fraction"] = (statistics.median(pbt_reached) if populations
                                  and len(pbt_reached) == len(populations) else None)
    if out["pbt_median_fraction"] is not None:
        print(f"PBT, median over {len(populations)} seed(s): "
              f"{100 * out['pbt_median_fraction']:.0f}% of the grid's epochs")
    print(json.dumps(out))
    return out


def search(args: argparse.Namespace, fixed: dict[str, Any], storage: str, seed: int,
           best: float, grid_epochs: int) -> dict[str, Any]:
    """One TPE + ASHA search; the epochs it spent until within 1 point of the grid's best."""
    space = {name: optuna.distributions.FloatDistribution(
                 min(values), max(values), log=name != "weight_decay")
             for name, values in GRID.items()}
    searcher = OptunaSearch(space, metric=METRIC, mode="max",
                            sampler=optuna.samplers.TPESampler(seed=seed))
    asha = ASHAScheduler(time_attr="epoch", max_t=args.epochs, grace_period=1,
                         reduction_factor=3)
    found = reports(run(fixed, storage, f"tpe-asha-{seed}", search_alg=searcher, scheduler=asha,
                        num_samples=args.samples, max_concurrent_trials=args.concurrent))
    return spent("TPE+ASHA", seed, found, best, grid_epochs)


def population(args: argparse.Namespace, fixed: dict[str, Any], storage: str, seed: int,
               best: float, grid_epochs: int) -> dict[str, Any]:
    """One PBT search over the same ranges: the epochs it spent until within 1 point."""
    random.seed(seed)  # PBT's explore step draws from Python's own generator
    ranges = {name: (ray.tune.uniform if name == "weight_decay" else ray.tune.loguniform)(
                  min(values), max(values)) for name, values in GRID.items()}
    # The product's scheduler class: Tune's PBT without decisions at the last epoch and
    # without pausing trials for turns (``flyp_ray.search.pbt.population``).
    pbt = flyp_pbt.population(PopulationBasedTraining, args.epochs, synch=False)(
        time_attr="epoch", perturbation_interval=1, hyperparam_mutations=ranges)
    found = reports(run({**fixed, **ranges, "pbt": True}, storage, f"pbt-{seed}",
                        scheduler=pbt, num_samples=args.pbt_population,
                        search_alg=BasicVariantGenerator(random_state=seed)))
    return spent("PBT", seed, found, best, grid_epochs)


def spent(name: str, seed: int, found: list[tuple[float, float]], best: float,
          grid_epochs: int) -> dict[str, Any]:
    """A search's epochs in all and until its first report within 1 point of ``best``."""
    reached = next((i + 1 for i, (_, acc) in enumerate(found) if acc >= best - 0.01), None)
    out = {"seed": seed, "search_best": max(acc for _, acc in found),
           "search_epochs_total": len(found), "search_epochs_to_within_1pt": reached,
           "fraction": None if reached is None else reached / grid_epochs}
    if reached is None:
        print(f"seed {seed}: {name} never came within 1 point of the grid's best "
              f"(best {out['search_best']:.4f}, {len(found)} epochs)", flush=True)
    else:
        print(f"seed {seed}: {name} best {out['search_best']:.4f}, {len(found)} epochs in all; "
              f"within 1 point after {reached} epochs = {100 * reached / grid_epochs:.0f}% of "
              f"the grid's", flush=True)
    return out


if __name__ == "__main__":
    main()
