"""The share of a short trial's time spent evaluating, and what the evaluation options cut.

Runs the package's loop (``loop.train_epoch`` and ``loop.evaluate``, no Ray) on the built-in
synthetic data set (1,200 training and 4 x 300 evaluation images) and times training and
evaluation separately, the zero-shot head's rebuild included in evaluation. Variants:

- ``fp32``: every split every epoch (evaluation already runs under no_grad, and the head encodes
  its prompts in batches of 64 classes);
- ``bf16``: ``train.precision: bf16`` (autocast in the step, the head and the image encoder);
- ``eval_splits``: ``train.eval_splits: [id_val]``, all splits at the last epoch only;
- ``bf16+eval_splits``.

Variants run in turns, ``--repeats`` times; medians are reported. Times are CPU seconds of this
process (one thread by default), not wall-clock: on a machine shared with other work, wall time
measures the neighbours as much as the trial.

    python bench/eval_cost.py --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from _common import arch_path, machine, median, spread  # noqa: E402

from flyp_ray.config import DatasetConfig, ModelConfig, TrainConfig  # noqa: E402
from flyp_ray.data.load import load_data  # noqa: E402
from flyp_ray.finetune import loop  # noqa: E402
from flyp_ray.finetune.model import load_model, tiny_config_path  # noqa: E402
from flyp_ray.finetune.run import make_run  # noqa: E402

VARIANTS = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "eval_splits": {"eval_splits": ["id_val"]},
    "bf16+eval_splits": {"precision": "bf16", "eval_splits": ["id_val"]},
}


def trial(arch: str, variant: dict[str, object], args: argparse.Namespace) -> dict[str, float]:
    """Seconds spent training, evaluating and rebuilding the head over ``args.epochs`` epochs."""
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(arch=arch, pretrained=None))
    data = load_data(DatasetConfig(name="synthetic", subsample=args.subsample),
                     loaded.preprocess_train, loaded.preprocess_eval, "bench")
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=1e-3, warmup_steps=5,
                        eval_batch_size=args.eval_batch, **variant)  # type: ignore[arg-type]
    loader = DataLoader(data.splits["train"].dataset, batch_size=args.batch, shuffle=True,
                        drop_last=True)
    run = make_run(loaded.model, data, loaded.tokenizer, train, loader, torch.device("cpu"))
    spent = {"train": 0.0, "eval": 0.0}
    for epoch in range(1, args.epochs + 1):
        start = time.process_time()
        loop.train_epoch(run, epoch)
        middle = time.process_time()
        loop.evaluate(run, final=epoch == args.epochs)
        spent["train"] += middle - start
        spent["eval"] += time.process_time() - middle
    return spent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="flyp-tiny", help="flyp-tiny, flyp-tiny-vit, or an arch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--subsample", type=int, default=None, help="images per split")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    arch = args.arch
    arch = str(tiny_config_path(vit=arch.endswith("vit"))) if arch.startswith("flyp-tiny") \
        else arch_path(arch)
    shares: dict[str, list[float]] = {k: [] for k in VARIANTS}
    totals: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for i in range(args.repeats):
        for name, variant in VARIANTS.items():
            spent = trial(arch, variant, args)
            total = spent["train"] + spent["eval"]
            shares[name].append(spent["eval"] / total)
            totals[name].append(total)
            print(f"repeat {i} {name}: train {spent['train']:.1f} CPU-s, "
                  f"eval {spent['eval']:.1f} CPU-s, "
                  f"eval share {100 * shares[name][-1]:.0f}%", flush=True)
    out = {"arch": args.arch, "epochs": args.epochs,
           "eval_share": {k: median(v) for k, v in shares.items()},
           "trial_seconds": {k: median(v) for k, v in totals.items()},
           "noise": {k: spread(v) for k, v in totals.items()}, "machine": machine()}
    for name in VARIANTS:
        print(f"{name:>18}: eval {100 * out['eval_share'][name]:.0f}% of "
              f"{out['trial_seconds'][name]:.1f} CPU-s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
