"""How fast, and in how many stderr lines, issue 21's four cases end: ``validate`` and ``train``.

The cases: a train-only config (no ``search`` section), ``gpus_per_worker: 1`` on a machine
without a GPU (``CUDA_VISIBLE_DEVICES=""`` hides any), ViT-B-16 ``openai`` weights neither
cached nor reachable (an empty ``HF_HUB_CACHE``; the hub as this machine reaches it), and a
Latin-1 comment in the config. Each command runs as a fresh ``python -m flyp_ray`` process, in
turns across the checkouts given (``--checkout DIR``, several: before and after a change), and
the median wall time of ``--repeats`` runs is printed with the exit code and stderr's line
count. The train-only config is good: ``tune`` is measured on it in place of ``train``.
``train`` may start Ray with a checkout that lets a case through: run it under the machine's
lock.

    flock /tmp/flyp-heavy.lock python bench/validate_refusals.py --checkout . --repeats 3
    python bench/validate_refusals.py --checkout /old/clone --checkout . --commands validate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TINY = "flyp_ray/finetune/model_configs/flyp-tiny.json"


def write_cases(folder: Path, checkout: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """The four configs (tiny model, synthetic data), with the environment each case needs."""
    base = {
        "dataset": {"name": "synthetic", "subsample": 64},
        "model": {"arch": str(checkout / TINY), "pretrained": None},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-3, "warmup_steps": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "max_failures": 0},
        "search": {"space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "bench"},
        "storage": str(folder / "results"),
    }
    cases: dict[str, tuple[Path, dict[str, str]]] = {}

    def write(name: str, raw: dict[str, object], env: dict[str, str] | None = None) -> Path:
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        cases[name] = (path, env or {})
        return path

    write("train-only", {k: v for k, v in base.items() if k != "search"})
    resources = {"workers": 1, "cpus_per_worker": 0.5, "max_failures": 0, "gpus_per_worker": 1}
    write("gpu", {**base, "resources": resources}, {"CUDA_VISIBLE_DEVICES": ""})
    (folder / "hub").mkdir(exist_ok=True)
    write("weights", {**base, "model": {"arch": "ViT-B-16", "pretrained": "openai"}},
          {"HF_HUB_CACHE": str(folder / "hub")})
    latin1 = write("latin1", base)
    latin1.write_bytes(b"# r\xe9glages\n" + latin1.read_bytes())
    return cases


def run(checkout: Path, command: str, path: Path, env: dict[str, str]) -> tuple[float, int, int]:
    """(seconds, exit code, stderr lines) of one fresh command."""
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE")}
    full.update(PYTHONPATH=str(checkout), RAY_TMPDIR=str(path.parent / "raytmp"), **env)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flyp_ray", command, str(path)], env=full,
                          cwd=path.parent, capture_output=True, text=True, timeout=1800)
    return time.monotonic() - start, done.returncode, len(done.stderr.strip().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", type=Path, required=True)
    parser.add_argument("--commands", default="validate,train")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-refusals-") as tmp:
        cases = {}
        for i, checkout in enumerate(checkouts):
            (Path(tmp) / str(i)).mkdir()
            cases[checkout] = write_cases(Path(tmp) / str(i), checkout)
        for case in cases[checkouts[0]]:
            for command in args.commands.split(","):
                if case == "train-only" and command == "train":
                    command = "tune"  # train runs it (it is good); tune must refuse it
                runs: dict[Path, list[tuple[float, int, int]]] = {c: [] for c in checkouts}
                for _ in range(args.repeats):
                    for checkout in checkouts:  # in turns: the shared machine slows all alike
                        path, env = cases[checkout][case]
                        runs[checkout].append(run(checkout, command, path, env))
                for checkout, measured in runs.items():
                    seconds = statistics.median(m[0] for m in measured)
                    codes = sorted({m[1] for m in measured})
                    lines = sorted({m[2] for m in measured})
                    row = {"case": case, "command": command, "checkout": str(checkout),
                           "median_s": round(seconds, 2), "exit": codes, "stderr_lines": lines}
                    print(f"{case:10s} {command:8s} {checkout}: {seconds:6.1f} s, exit {codes}, "
                          f"stderr lines {lines}", flush=True)
                    rows.append(row)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
