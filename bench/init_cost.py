"""What ``flyp-ray init`` and the data digest cost on an ImageFolder tree of 100,000 small files,
and where the time goes.

Writes ``--dir`` (default /tmp/flyp-ray-bench-100k, reused when it is already there) as
``train/``, ``val/`` and ``test/`` with ``--classes`` class folders each, ``--files`` small PNGs
in all (80% train, 10% val, 10% test), then times, ``--repeats`` times and interleaved:

- ``imports``: ``python -c "import flyp_ray.init"`` in a fresh process;
- ``listing``: the ImageFolder loader's listing (one ``scandir`` per folder, names packed);
- ``decode sample``: the images ``validate`` and ``init`` decode (8 a split);
- ``stat + hash``: the digest's part past the listing (one ``stat`` per file, SHA-256);
- ``digest``: ``data_digest`` in all (listing, stats, hash), what a run's driver pays;
- ``init``: ``python -m flyp_ray init DIR`` end to end in a fresh process (imports, the
  machine's GPUs, the listing, the decode sample, the YAML).

The first repeat of each is reported apart: it may find the page cache cold (the tree was just
written, so mostly warm); medians are of the rest. The digest is checked to be the same on
every repeat.

    python bench/init_cost.py                    # 100,000 files, 3 repeats
    python bench/init_cost.py --files 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, median, spread  # noqa: E402

from flyp_ray.config import DatasetConfig  # noqa: E402
from flyp_ray.data import load  # noqa: E402
from flyp_ray.data.digest import data_digest, split_digest  # noqa: E402

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def write_tree(root: Path, files: int, classes: int) -> Path:
    """``root/<split>/<class>/<i>.png``: a few distinct 16 px PNGs, written as bytes."""
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == f"{files} {classes}":
        return root
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    for split, share in SPLITS.items():
        per_class = round(files * share / classes)
        for c in range(classes):
            folder = root / split / f"class_{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i:06d}.png").write_bytes(blobs[(c + i) % len(blobs)])
    marker.write_text(f"{files} {classes}")
    return root


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def fresh_process(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True)
    return time.perf_counter() - start


def stat_and_hash(cfg: DatasetConfig) -> float:
    """The digest past the listing: every split's stats and hash."""
    loaded = load.load_sources(cfg, "bench")
    root = str(Path(str(cfg.root))) + os.sep
    start = time.perf_counter()
    for name, src in loaded.sources.items():
        split_digest(name, src, loaded.classnames, None, root)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/flyp-ray-bench-100k")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir)
    written, _ = timed(lambda: write_tree(root, args.files, args.classes))
    cfg = DatasetConfig(name="imagefolder", root=str(root))
    count = sum(1 for _ in root.rglob("*.png"))
    print(f"{machine()}\n{count} files under {root} (written or found in {written:.1f} s)")
    parts: dict[str, Callable[[], float]] = {
        "imports": lambda: fresh_process(["-c", "import flyp_ray.init"]),
        "listing": lambda: timed(lambda: load.load_sources(cfg, "bench"))[0],
        "decode sample": lambda: timed(lambda: load.decode_sample(
            load.load_sources(cfg, "bench"), None))[0] - timed(
            lambda: load.load_sources(cfg, "bench"))[0],
        "stat + hash": lambda: stat_and_hash(cfg),
        "digest": lambda: timed(lambda: data_digest(cfg, "bench"))[0],
        "init": lambda: fresh_process(["-m", "flyp_ray", "init", str(root)]),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    digests = set()
    for _ in range(args.repeats):
        for name, fn in parts.items():
            times[name].append(fn())
        digests.add(data_digest(cfg, "bench").digest)
    assert len(digests) == 1, f"the digest moved between repeats: {digests}"
    result = {}
    for name, values in times.items():
        rest = values[1:] or values
        result[name] = {"first_s": round(values[0], 3), "median_s": round(median(rest), 3)}
        print(f"{name:14s} first {values[0]:7.2f} s, then {median(rest):7.2f} s "
              f"({spread(rest)}, {len(rest)} runs)")
    per_file = 1e6 * result["stat + hash"]["median_s"] / count
    print(f"stat + hash: {per_file:.1f} us a file; digest {digests.pop()}, the same every time")
    print(json.dumps({"files": count, "machine": machine(), "seconds": result,
                      "stat_hash_us_per_file": round(per_file, 2)}))


if __name__ == "__main__":
    main()
