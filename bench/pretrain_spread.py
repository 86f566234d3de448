"""How far the demo's zero-shot start moves: the same pre-training with other thread counts and
other seeds, each followed by the demo's zero-shot evaluation.

``flyp-ray demo`` pre-trains the tiny model on this machine's CPU (``flyp_ray.finetune.pretrain``)
and every later figure of the demo starts from it. Two questions:

- is the pre-training bit for bit the same when run again, and with another thread count
  (float sums reduce in another order)? Printed: a digest of the weights per run;
- how much does the zero-shot accuracy move between pre-trainings that differ only in such
  details? A seed is the cheap stand-in: printed per seed, with the spread over seeds.

    python bench/pretrain_spread.py                          # threads 1 and 2, seeds 0-3
    python bench/pretrain_spread.py --threads 1 --seeds 0 --repeat 2   # seed 0 three times
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import machine  # noqa: E402

from flyp_ray import demo  # noqa: E402
from flyp_ray.finetune import pretrain  # noqa: E402

SPLITS = ("id_val/acc", "id_test/acc", "ood_val/acc", "ood_test/acc")


def digest(state: dict[str, torch.Tensor]) -> str:
    """A short hash of every weight's bytes: equal only for bit-identical models."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def one(seed: int, threads: int, folder: Path) -> dict[str, Any]:
    """Pre-train with ``seed`` on ``threads`` threads, then the demo's zero-shot evaluation."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            model = pretrain.train(steps=pretrain.DEFAULT_STEPS, seed=seed)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    path = folder / f"pretrained-{seed}-{threads}.pt"
    torch.save(model.state_dict(), path)
    metrics = demo.zero_shot_metrics(demo.demo_config(folder, path))
    return {"seed": seed, "threads": threads, "seconds": round(seconds, 1),
            "weights": digest(model.state_dict()), **{k: metrics[k] for k in SPLITS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of seed 0 again on the first thread count")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # seed 0 (the demo's own pre-training) on every thread count and again, then the
        # other seeds on the first thread count
        first = args.threads[0]
        plan = ([(0, t) for t in args.threads] + [(0, first)] * args.repeat
                + [(s, first) for s in args.seeds if s != 0])
        for seed, threads in plan:
            row = one(seed, threads, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    seeds = {r["seed"]: r for r in rows if r["threads"] == args.threads[0]}  # one per seed
    spread = {k: {"mean": statistics.mean(r[k] for r in seeds.values()),
                  "std": statistics.stdev(r[k] for r in seeds.values()) if len(seeds) > 1
                  else 0.0,
                  "range": max(r[k] for r in seeds.values()) - min(r[k] for r in seeds.values())}
              for k in SPLITS}
    print(json.dumps({"machine": machine(), "over_seeds": spread}, indent=1))


if __name__ == "__main__":
    main()
