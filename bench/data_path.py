"""Images per second per CPU core through the loader, without and with the decode-once cache.

Writes a csv data set of JPEGs (the synthetic shapes drawn at ``--source-size`` px) into a
temporary folder, then reads its train split through ``flyp_ray.data.load_data`` with open_clip's
train transform at ``--image-size``: JPEG decode, random resized crop, ToTensor, normalise, in one
process on one thread (one core). The cached path (``dataset.cache: memory`` / ``disk``) is timed
on a warm pass, and separately with its per-batch device step (crop, flip, normalise) run on the
CPU, the worst case; on a GPU that step is a few kernels. Passes alternate (uncached, memory,
disk, ...) and medians are reported.

    python bench/data_path.py                       # 1,000 JPEGs of 256 px, 224 px crops
    python bench/data_path.py --images 2000 --step-rate 3200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import pandas as pd
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, median, spread  # noqa: E402

from flyp_ray.config import DatasetConfig  # noqa: E402
from flyp_ray.data import base, synthetic  # noqa: E402
from flyp_ray.data.load import load_data  # noqa: E402


def write_folder(root: Path, count: int, size: int) -> Path:
    """``count`` JPEGs of ``size`` x ``size`` in the csv layout, all in the train split."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(count):
        path = f"images/{i:05d}.jpg"
        synthetic.image("train", i, size=size).save(root / path, quality=90)
        rows.append({"filepath": path, "label": synthetic.draw("train", i).label, "split": "train"})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    (root / "classnames.txt").write_text("\n".join(synthetic.CLASSNAMES) + "\n")
    return root


def images_per_s(split: base.Split, batch: int, prepare: bool) -> float:
    """Images per CPU-second of one pass over ``split`` in this process (one thread: one core).

    CPU time, not wall time: on a machine shared with other work it still measures the work of
    this loader. With ``prepare``, the cache's device step runs on the CPU too.
    """
    start = time.process_time()
    count = 0
    for images, _, _ in DataLoader(split.dataset, batch_size=batch, shuffle=True, num_workers=0):
        if prepare and split.prepare is not None:
            images = split.prepare(images)
        count += images.shape[0]
    return count / (time.process_time() - start)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--source-size", type=int, default=256, help="side of the written JPEGs")
    p.add_argument("--image-size", type=int, default=224, help="the model's input size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-rate", type=float, default=3200.0,
                   help="pairs/s the training step consumes (default: the H200 ViT-B-16 target)")
    p.add_argument("--loader-workers", type=int, default=7,
                   help="loader processes of a worker (default 7: the shipped GPU configs give "
                        "a worker 8 CPUs, loader_workers -1 takes all but one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(argv)
    torch.set_num_threads(1)  # per-core figures
    train_t = open_clip.image_transform(args.image_size, is_train=True)
    eval_t = open_clip.image_transform(args.image_size, is_train=False)
    rates: dict[str, list[float]] = {"uncached": [], "memory": [], "memory+prepare": [],
                                     "disk": [], "fill": []}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = write_folder(Path(tmp) / "jpegs", args.images, args.source_size)
        print(f"wrote {args.images} JPEGs of {args.source_size} px in "
              f"{time.perf_counter() - start:.1f} s", flush=True)

        def load(cache: str) -> base.Split:
            cfg = DatasetConfig(name="csv", root=str(root),  # type: ignore[arg-type]
                                classnames=str(root / "classnames.txt"), cache=cache,
                                cache_dir=str(Path(tmp) / "cache"))
            return load_data(cfg, train_t, eval_t, "bench").splits["train"]

        memory, disk = load("memory"), load("disk")
        rates["fill"].append(images_per_s(memory, args.batch, prepare=False))  # first pass decodes
        images_per_s(disk, args.batch, prepare=False)
        plain = load("none")
        for i in range(args.repeats):
            rates["uncached"].append(images_per_s(plain, args.batch, prepare=False))
            rates["memory"].append(images_per_s(memory, args.batch, prepare=False))
            rates["memory+prepare"].append(images_per_s(memory, args.batch, prepare=True))
            rates["disk"].append(images_per_s(disk, args.batch, prepare=False))
            print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()
                                              if k != "fill"), flush=True)
    med = {k: median(v) for k, v in rates.items()}
    out = {"images": args.images, "source_size": args.source_size, "image_size": args.image_size,
           "images_per_s_per_core": med, "noise": {k: spread(v) for k, v in rates.items()},
           "speedup_memory": med["memory"] / med["uncached"],
           "speedup_memory_with_cpu_prepare": med["memory+prepare"] / med["uncached"],
           "speedup_disk": med["disk"] / med["uncached"],
           "step_rate": args.step_rate,
           "cores_to_feed_uncached": args.step_rate / med["uncached"],
           "cores_to_feed_memory": args.step_rate / med["memory"],
           "machine": machine()}
    print(f"per core: uncached {med['uncached']:.0f} img/s "
          f"(first, filling pass {med['fill']:.0f}); "
          f"cache memory {med['memory']:.0f} img/s ({out['speedup_memory']:.1f}x), "
          f"disk {med['disk']:.0f} img/s ({out['speedup_disk']:.1f}x), "
          f"memory + crop/normalise on the CPU {med['memory+prepare']:.0f} img/s "
          f"({out['speedup_memory_with_cpu_prepare']:.1f}x)")
    print(f"feeding {args.step_rate:.0f} pairs/s takes {out['cores_to_feed_uncached']:.1f} cores "
          f"uncached, {out['cores_to_feed_memory']:.2f} with the cache")
    # What a worker's loader processes deliver, at the per-core rates above (each process has a
    # core of its own: the worker holds that many CPUs). Target: >= 2x the step's rate.
    n = args.loader_workers
    out["loader_workers"] = n
    out["delivered_over_consumed"] = {k: n * med[k] / args.step_rate
                                      for k in ("fill", "uncached", "disk")}
    ratio = out["delivered_over_consumed"]
    verdict = "meets" if ratio["disk"] >= 2 else "misses"
    print(f"{n} loader processes deliver {ratio['disk']:.1f}x the step's {args.step_rate:.0f} "
          f"pairs/s from the disk cache after the first epoch ({verdict} the 2x target); "
          f"{ratio['fill']:.1f}x in the epoch that fills it, {ratio['uncached']:.1f}x uncached")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
