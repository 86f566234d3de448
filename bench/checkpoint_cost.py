"""How long an epoch's checkpoint holds up training: before (written, then copied) and now.

Builds an open_clip model with its AdamW state (one step on a small random batch), then times,
in turns, ``--repeats`` times:

- **before**: what a worker did on its training thread at each epoch's report until now: the
  epoch's metrics to MLflow (sqlite), the model and optimizer state written to a temporary
  folder (``checkpoint.save``), then copied into the run's storage as Ray's synchronous upload
  does (``pyarrow.fs.copy_files``);
- **now, blocking**: the host copy of the state (``checkpoint.on_host``), the one part left on
  the training thread, into the previous epoch's buffers after the first (repeat 0 allocates);
- **now, in the background**: writing that copy straight into storage (``checkpoint.write``),
  which Ray's asynchronous upload runs in its own thread while training goes on.

Storage is a local folder (``--storage``, default a temporary one): on a shared file system or
an object store the copy, and the background write, take longer; the blocking part does not.

    python bench/checkpoint_cost.py                       # the tiny model
    python bench/checkpoint_cost.py --arch ViT-B-16        # 150 M parameters: 1.8 GB of state
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import pyarrow.fs
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import arch_path, machine, median, spread  # noqa: E402

from flyp_ray.config import TrainConfig, from_dict  # noqa: E402
from flyp_ray.finetune import checkpoint  # noqa: E402
from flyp_ray.finetune.model import resolve_arch, tiny_config_path  # noqa: E402
from flyp_ray.finetune.optim import build_state  # noqa: E402
from flyp_ray.tracking import runs  # noqa: E402


def trained(arch: str, device: torch.device) -> tuple[torch.nn.Module, checkpoint.TrainingState]:
    """The model after one AdamW step, so that the optimizer holds its two moments."""
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_arch(arch), pretrained=None, output_dict=True)
    model.to(device)
    state = build_state(model, TrainConfig(lr=1e-5, warmup_steps=0), 10, device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    out = model(torch.randn(2, 3, size, size, device=device),
                torch.randint(0, 100, (2, model.context_length), device=device))
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    state.optimizer.step()
    return model, state


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="flyp-tiny", help="flyp-tiny, flyp-tiny-vit or an arch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--storage", default=None, help="the run's storage folder (default: temp)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(argv)
    arch = args.arch
    arch = (str(tiny_config_path(vit=arch.endswith("vit"))) if arch.startswith("flyp-tiny")
            else arch_path(arch))
    device = torch.device(args.device)
    model, state = trained(arch, device)
    metrics = {f"split{i}/acc": 0.5 for i in range(20)}
    times: dict[str, list[float]] = {"before": [], "now_blocking": [], "now_background": []}
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(args.storage or tmp) / "storage"
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        cfg = from_dict({"dataset": {"name": "synthetic"},
                         "model": {"arch": arch, "pretrained": None},
                         "tracking": {"uri": uri, "experiment": "bench"}}, "bench")
        run_id = runs.start_run(cfg, "bench", {})
        fs = pyarrow.fs.LocalFileSystem()
        saved: checkpoint.Contents | None = None
        for i in range(args.repeats):
            epoch = i + 1
            sync(device)
            start = time.perf_counter()
            runs.log_metrics(uri, run_id, metrics, step=epoch)
            with tempfile.TemporaryDirectory(dir=tmp) as local:
                checkpoint.save(Path(local), model, state, epoch, metrics)
                target = f"{storage}/before_{epoch:04d}"
                fs.create_dir(target)
                pyarrow.fs.copy_files(local, target, source_filesystem=fs,
                                      destination_filesystem=fs)
            times["before"].append(time.perf_counter() - start)

            sync(device)
            start = time.perf_counter()
            saved = checkpoint.on_host(checkpoint.contents(model, state, epoch, metrics),
                                       reuse=saved)  # as the worker does: its last buffers
            times["now_blocking"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.write(saved, f"{storage}/now_{epoch:04d}", fs)
            runs.log_metrics(uri, run_id, metrics, step=epoch + 1000)
            times["now_background"].append(time.perf_counter() - start)
            shutil.rmtree(storage)
            print(f"repeat {i}: before {times['before'][-1]:.3f} s, now "
                  f"{times['now_blocking'][-1]:.3f} s blocking + "
                  f"{times['now_background'][-1]:.3f} s in the background", flush=True)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(t.numel() * t.element_size() for s in state.optimizer.state.values()
                  for t in s.values() if isinstance(t, torch.Tensor))
    out = {"arch": args.arch, "state_bytes": size + moments, "machine": machine(),
           **{k: median(v) for k, v in times.items()},
           "noise": {k: spread(v) for k, v in times.items()}}
    print(f"{args.arch}: {(size + moments) / 1e6:.0f} MB of state; training waits "
          f"{out['before']:.3f} s ({out['noise']['before']}) before, {out['now_blocking']:.3f} s "
          f"({out['noise']['now_blocking']}) now; the write itself "
          f"{out['now_background']:.3f} s in the background")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
