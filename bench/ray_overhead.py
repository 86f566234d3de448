"""The same FLYP step, data and batch in one plain process and inside one Ray Train worker.

Prints the steady-state throughput of each and their ratio (target: Ray within 2% of plain).
The two are measured in turns (plain, Ray, plain, Ray, ...) so that a machine shared with other
work slows both alike; the medians are compared. Ray's start-up (a TorchTrainer's worker group)
is reported separately: it is paid once per trial, not per step, beside the floor under it:
a ``TorchTrainer.fit()`` whose worker only reports (Ray Train's own processes and set-up), and
``--tune-trials N`` such runs as the trials of a Tune search, one at a time (a trial's floor).

    python bench/ray_overhead.py                       # tiny ViT, CPU, 2 threads
    python bench/ray_overhead.py --arch ViT-B-16 --precision bf16 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.tune  # noqa: E402
import torch  # noqa: E402
from _common import build_step, machine, median, spread, time_steps, worker_path  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from flyp_ray.distributed.cluster import runtime_env  # noqa: E402
from flyp_ray.finetune.model import tiny_config_path  # noqa: E402


def measure(config: dict[str, Any]) -> dict[str, float]:
    """Build the step, warm up, and time ``steps`` steps: pairs per second."""
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    step = build_step(config["arch"], batch=config["batch"], image_size=None,
                      precision=config["precision"], device=device)
    for _ in range(config["warmup"]):
        step()
    # CPU seconds of this process (all its threads) besides wall seconds: on a machine shared
    # with other work, wall time mostly measures the neighbours; CPU time measures the step.
    cpu = time.process_time()
    seconds = time_steps(step, config["steps"], device)
    cpu_per_step = (time.process_time() - cpu) / config["steps"]
    del step
    if device.type == "cuda":  # the driver's cached blocks would crowd the Ray worker's GPU
        torch.cuda.empty_cache()
    return {"pairs_per_s": config["batch"] / seconds,
            "pairs_per_cpu_s": config["batch"] / cpu_per_step}


def ray_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker function: the same measurement, reported through Ray."""
    metrics = measure(config)
    # Train V2 hands back only metrics that came with a checkpoint: attach an empty one.
    with tempfile.TemporaryDirectory() as folder:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def report_only(_config: dict[str, Any]) -> None:
    """A worker that does nothing but report: what is left of a run is Ray Train's own."""
    ray.train.report({"done": 1.0})


def fit_seconds(worker: Any, config: dict[str, Any], storage: str, name: str
                ) -> tuple[Any, float]:
    """One TorchTrainer run of ``worker`` with one worker: (its result, seconds fit() took)."""
    resources = {"CPU": float(config["threads"])}
    if config["device"] == "cuda":
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=config["device"] == "cuda",
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage))
    start = time.perf_counter()
    result = trainer.fit()
    return result, time.perf_counter() - start


def tune_floor(config: dict[str, Any], storage: str, trials: int) -> float:
    """Seconds per trial of a Tune search whose trials each fit a report-only TorchTrainer."""
    one_cpu = {**config, "threads": 1}  # beside the trial's own sliver of a CPU

    def trial(_params: dict[str, Any]) -> None:
        fit_seconds(report_only, one_cpu, storage, f"trial-{ray.tune.get_context().get_trial_id()}")

    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trial, {"CPU": 0.01}),
        tune_config=ray.tune.TuneConfig(num_samples=trials, max_concurrent_trials=1),
        run_config=ray.tune.RunConfig(name="floor", storage_path=storage, verbose=0))
    start = time.perf_counter()
    tuner.fit()
    return (time.perf_counter() - start) / trials


def in_ray(config: dict[str, Any], storage: str, index: int) -> tuple[dict[str, float], float]:
    """One TorchTrainer run with one worker: (its measurement, seconds fit() took)."""
    result, seconds = fit_seconds(ray_worker, config, storage, f"overhead-{index}")
    return {k: float(result.metrics[k]) for k in ("pairs_per_s", "pairs_per_cpu_s")}, seconds


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="flyp-tiny-vit")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="plain/Ray pairs, interleaved")
    p.add_argument("--threads", type=int, default=2, help="torch threads = Ray worker CPUs")
    p.add_argument("--tune-trials", type=int, default=0,
                   help="also time a Tune search of this many report-only trials")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    arch = args.arch
    if arch in ("flyp-tiny", "flyp-tiny-vit"):
        arch = str(tiny_config_path(vit=arch.endswith("vit")))
    config = {"arch": arch, "batch": args.batch, "precision": args.precision,
              "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
              "device": args.device}
    # The product's Ray settings (its health-check interval, no preemption watcher here).
    env = runtime_env({"PYTHONPATH": worker_path(HERE)}, local=True)
    ray.init(num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False, runtime_env=env)
    plain: dict[str, list[float]] = {"pairs_per_s": [], "pairs_per_cpu_s": []}
    in_worker: dict[str, list[float]] = {"pairs_per_s": [], "pairs_per_cpu_s": []}
    startup, floor = [], []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(args.repeats):
            for key, value in measure(config).items():
                plain[key].append(value)
            metrics, wall = in_ray(config, storage, i)
            for key, value in metrics.items():
                in_worker[key].append(value)
            startup.append(wall)
            floor.append(fit_seconds(report_only, config, storage, f"floor-{i}")[1])
            print(f"repeat {i}: plain {plain['pairs_per_s'][-1]:.1f} pairs/s "
                  f"({plain['pairs_per_cpu_s'][-1]:.1f} per CPU-s), Ray "
                  f"{metrics['pairs_per_s']:.1f} ({metrics['pairs_per_cpu_s']:.1f})", flush=True)
        per_trial = tune_floor(config, storage, args.tune_trials) if args.tune_trials else None
    ray.shutdown()
    out: dict[str, Any] = {"arch": args.arch, "batch": args.batch, "precision": args.precision,
                           "ray_fit_seconds": median(startup),
                           "report_only_fit_seconds": median(floor),
                           "report_only_tune_trial_seconds": per_trial, "machine": machine()}
    for key in ("pairs_per_s", "pairs_per_cpu_s"):
        p, r = plain[key], in_worker[key]
        out[key] = {"plain_median": median(p), "ray_median": median(r),
                    "plain_best": max(p), "ray_best": max(r), "plain_noise": spread(p),
                    "ray_noise": spread(r), "ratio_of_medians": median(r) / median(p),
                    "ratio_of_bests": max(r) / max(p)}
        o = out[key]
        print(f"{key}: plain median {o['plain_median']:.1f} ({o['plain_noise']}), Ray "
              f"{o['ray_median']:.1f} ({o['ray_noise']}); ray/plain {o['ratio_of_medians']:.3f} "
              f"(medians), {o['ratio_of_bests']:.3f} (bests)")
    print(f"a TorchTrainer.fit() with this work took {out['ray_fit_seconds']:.1f} s; one whose "
          f"worker only reports {out['report_only_fit_seconds']:.1f} s ({spread(floor)})")
    if per_trial is not None:
        print(f"a Tune trial that fits such a run: {per_trial:.1f} s each, "
              f"{args.tune_trials} in a row")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
