"""What ``flyp-ray train`` costs around the work itself: per epoch, and once per run.

The same work two ways, side by side in one run:

- **bare**: a plain open_clip loop in a fresh Python process: the model, ``ClipLoss``, AdamW,
  the synthetic images through a DataLoader, and after every epoch the zero-shot head rebuilt
  from the text tower (open_clip's ``build_zero_shot_classifier``) and the four evaluation
  splits classified with it. No Ray, no MLflow, no checkpoint.
- **train**: the real command, ``python -m flyp_ray train CONFIG``, on the same model config,
  images, batch, epochs and evaluation, with one Ray Train worker given the same CPUs (and GPU).
  Its data path is the config's default: the synthetic set cached in memory after the first
  epoch (``dataset.cache: auto``); ``--set dataset.cache=none`` gives it the bare loop's, which
  draws and transforms every image again each epoch, and leaves Ray's share of the difference.

Each repeat runs both, in alternating order, so that a machine shared with other work slows both
alike. Per epoch: the steady-state epoch is the median gap between the ends of consecutive
epochs after the first (``train``: the MLflow timestamps of its ``epoch`` metric; ``bare``: its
own clock), so train, evaluation, checkpoint and reporting are all inside it. Fixed cost: the
command's wall time less ``epochs`` steady-state epochs (start-up, the first epoch's warm-up,
the model logged at the end, shutdown). The worker's own start-up line (``start-up: ...``) is
printed for the train runs where it appears. Wall time on a shared machine measures the
neighbours too, so the CPU seconds of the training process per steady-state epoch are printed
beside it (the bare loop's own; the Ray Train worker's, read from /proc every 0.1 s): the work
the training process does, but not what other processes do or what it waits for.

``--search-trials N`` measures a trial's fixed cost inside a search as well: ``flyp-ray tune``
with N trials one after another (no early stopping), each of ``--epochs`` epochs. The gap
between the first epochs of consecutive trials, less ``epochs`` steady-state epochs, is what one
trial costs beyond its epochs (the end of one trial, the start of the next: the trial process,
its MLflow run, the Train worker group, model and data).

    python bench/epoch_overhead.py                        # tiny ResNet CLIP, CPU, batch 64
    python bench/epoch_overhead.py --device cuda --repeats 3
    python bench/epoch_overhead.py --repeats 0 --search-trials 4 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BARE = "bare"
TRAIN = "train"


# --- the bare loop (runs in a child process: --child) ----------------------------------------


def bare_child(args: argparse.Namespace) -> None:
    """The plain open_clip loop; prints one JSON line with its epoch end times.

    Nothing of flyp-ray's data path is used: the synthetic generator's PIL images go through
    open_clip's own ``preprocess_train`` / ``preprocess_val`` in a Dataset written here, so that
    a cost flyp-ray's loading adds shows up as a difference instead of being on both sides.
    """
    started = time.time()
    import open_clip
    import torch
    from torch.utils.data import DataLoader

    from flyp_ray.data import synthetic  # the images' generator only: a pure function of an index
    from flyp_ray.finetune.model import resolve_arch

    torch.set_num_threads(args.cpus)
    torch.manual_seed(0)
    device = torch.device(args.device)
    name = resolve_arch(args.arch)
    model, pre_train, pre_eval = open_clip.create_model_and_transforms(name, pretrained=None,
                                                                       output_dict=True)
    model.to(device)
    tokenizer = open_clip.get_tokenizer(name)
    classnames = list(synthetic.CLASSNAMES)
    splits = {split: Shapes(split, pre_train if split == "train" else pre_eval, args.subsample)
              for split in synthetic.SPLIT_SIZES}
    tokens = tokenizer([t.format(c) for c in classnames for t in TEMPLATES])
    tokens = tokens.view(len(classnames), len(TEMPLATES), -1)
    loader = DataLoader(splits["train"], batch_size=args.batch, shuffle=True,
                        drop_last=True, pin_memory=device.type == "cuda")
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ends, cpu_ends, train_s, eval_s, wait_s = [], [], [], [], []
    ready = time.time()
    for epoch in range(args.epochs):
        begin = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(epoch)
        waited, asked = 0.0, time.perf_counter()
        for images, labels in loader:
            waited += time.perf_counter() - asked
            choice = torch.randint(len(TEMPLATES), (labels.shape[0],), generator=generator)
            texts = tokens[labels, choice].to(device, non_blocking=True)
            out = model(images.to(device, non_blocking=True), texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            asked = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        middle = time.perf_counter()
        model.eval()
        with torch.no_grad():
            head = build_head(open_clip, model, tokenizer, classnames, list(TEMPLATES), device)
            for split_name, split in splits.items():
                if split_name != "train":
                    evaluate_split(model, head, split, args.eval_batch, device)
        ends.append(time.time())
        cpu_ends.append(time.process_time())
        train_s.append(middle - begin)
        eval_s.append(time.perf_counter() - middle)
        wait_s.append(waited)
    print(json.dumps({"started": started, "ready": ready, "ends": ends, "cpu_ends": cpu_ends,
                      "train_s": train_s, "eval_s": eval_s, "wait_s": wait_s,
                      "exited": time.time()}))


# The synthetic set's prompt templates (flyp_ray/data/prompts.py), written out: same text work.
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} shape.", "a picture of a {}.")


class Shapes:
    """One synthetic split as ``(transform(image), label)`` items, the first ``limit`` images.

    flyp-ray subsamples a random subset instead; with ``--subsample`` the two see different
    images of the same count and size, which costs the same.
    """

    def __init__(self, split: str, transform: Any, limit: int | None) -> None:
        from flyp_ray.data import synthetic

        self.split, self.transform, self.synthetic = split, transform, synthetic
        size = synthetic.SPLIT_SIZES[split]
        count = size if limit is None else min(limit, size)
        self.labels = [synthetic.draw(split, i).label for i in range(count)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.synthetic.image(self.split, index)), self.labels[index]


def build_head(open_clip: Any, model: Any, tokenizer: Any, classnames: list[str],
               templates: list[str], device: Any) -> Any:
    return open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                                num_classes_per_batch=64, device=device)


def evaluate_split(model: Any, head: Any, dataset: Any, batch: int, device: Any) -> float:
    """Accuracy of the zero-shot head on one split."""
    import torch
    from torch.utils.data import DataLoader

    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch):
        features = model.encode_image(images.to(device), normalize=True)
        predicted = torch.argmax(features @ head, dim=1).cpu()
        correct += int((predicted == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


# --- the two variants, measured from outside ----------------------------------------------


def child_env(cpus: int) -> dict[str, str]:
    env = dict(os.environ)
    path = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # RAY_ADDRESS=local: a Ray of its own, never a `ray start` cluster found on the machine.
    env.update({"OMP_NUM_THREADS": str(cpus), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ADDRESS": "local", "PYTHONPATH": path})
    return env


def timed(argv: list[str], cpus: int, cwd: Path | None, watch: bool = False
          ) -> tuple[subprocess.CompletedProcess[str], float, float, list[tuple[float, float]]]:
    """Run a command: its wall seconds, the CPU seconds of the processes it waited for (a lower
    bound: a process that no one waits for, such as a daemon, is not counted) and, with
    ``watch``, (time, CPU seconds so far) of its Ray Train worker process every 0.1 s."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, env=child_env(cpus), cwd=cwd, stdout=out, stderr=err,
                                text=True)
        worker: int | None = None
        while proc.poll() is None:
            if watch:
                worker = worker if worker is not None else train_worker(proc.pid)
                cpu = process_cpu(worker) if worker is not None else None
                if cpu is not None:
                    samples.append((time.time(), cpu))
            time.sleep(0.1)
        wall = time.time() - start
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done, wall, cpu_s, samples


def train_worker(root: int) -> int | None:
    """The first ``ray::RayTrainWorker`` process below ``root``, if one runs yet."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    below, todo = [], [root]
    while todo:
        parent = todo.pop()
        children = [c for c, p in parents.items() if p == parent]
        below += children
        todo += children
    for pid in below:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                return pid
        except OSError:
            continue
    return None


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_at(samples: list[tuple[float, float]], moments: list[float]) -> list[float]:
    """The CPU reading at (just before) each moment."""
    return [max((c for t, c in samples if t <= moment), default=0.0) for moment in moments]


def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--arch", args.arch,
            "--epochs", str(args.epochs), "--batch", str(args.batch), "--cpus", str(args.cpus),
            "--eval-batch", str(args.eval_batch), "--device", args.device]
    if args.subsample:
        argv += ["--subsample", str(args.subsample)]
    done, wall, cpu, _ = timed(argv, args.cpus, None)
    if done.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    evaluating, training = sum(out["eval_s"][1:]), sum(out["train_s"][1:])
    share = evaluating / (training + evaluating)
    return {**summarise(out["ends"], wall, args.epochs, eval_share=share), "cpu_s": cpu,
            "epoch_cpu_s": steady(out["cpu_ends"]),
            "data_wait": sum(out["wait_s"][1:]) / training}


def train_config(args: argparse.Namespace, folder: Path, trials: int = 0) -> Path:
    import yaml

    gpu = args.device == "cuda"
    raw: dict[str, Any] = {
        "dataset": {"name": "synthetic", **({"subsample": args.subsample} if args.subsample
                                            else {})},
        "model": {"arch": args.arch, "pretrained": None},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 1.0e-3,
                  "warmup_steps": 5, "eval_batch_size": args.eval_batch},
        "resources": {"workers": 1, "cpus_per_worker": args.cpus,
                      "gpus_per_worker": 1 if gpu else 0, "max_failures": 0},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "overhead"},
        "storage": str(folder / "results"),
    }
    if trials:
        raw["search"] = {"num_samples": trials, "max_concurrent_trials": 1,
                         "scheduler": {"type": "none"},
                         "space": {"lr": {"type": "float", "low": 5.0e-4, "high": 2.0e-3}}}
    path = folder / "overhead.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_train(args: argparse.Namespace, index: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="epoch-overhead-") as tmp:
        folder = Path(tmp)
        config = train_config(args, folder)
        argv = [sys.executable, "-m", "flyp_ray", "train", str(config), "--name", f"r{index}"]
        argv += [item for extra in args.set for item in ("--set", extra)]
        done, wall, cpu, samples = timed(argv, args.cpus, folder, watch=True)
        if done.returncode != 0:
            raise SystemExit(f"flyp-ray train failed:\n{done.stderr[-3000:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        history = client.get_metric_history(out["mlflow_run_id"], "epoch")
        ends = [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
        startup = re.findall(r"start-up: [^\n]*", done.stderr)
        summary = summarise(ends, wall, args.epochs)
        summary["data_wait"] = steady_data_wait(client, out["mlflow_run_id"])
        summary.update(startup=startup[-1] if startup else None, cpu_s=cpu,
                       epoch_cpu_s=steady(cpu_at(samples, ends)))
        return summary


def steady_data_wait(client: Any, run_id: str) -> float | None:
    """The worker's share of training time spent waiting for batches after the first epoch,
    from its ``perf/`` readings in MLflow (a terminal gets one progress line a minute, often
    the first epoch's, which fills a cache)."""
    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    epochs, waits = history("perf/epoch"), history("perf/data_wait")
    steady = [waits[step] for step, epoch in epochs.items() if epoch > 1 and step in waits]
    return statistics.median(steady) if steady else None


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    """``flyp-ray tune`` with ``--search-trials`` trials in a row: a trial's fixed cost."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="epoch-overhead-") as tmp:
        folder = Path(tmp)
        config = train_config(args, folder, trials=args.search_trials)
        argv = [sys.executable, "-m", "flyp_ray", "tune", str(config)]
        argv += [item for extra in args.set for item in ("--set", extra)]
        done, wall, _, _ = timed(argv, args.cpus, folder)
        if done.returncode != 0:
            raise SystemExit(f"flyp-ray tune failed:\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("overhead")
        assert experiment is not None
        trials = client.search_runs(
            [experiment.experiment_id],
            f"tags.`mlflow.parentRunId` = '{summary['mlflow_parent_run_id']}'")
        ends = sorted(sorted(m.timestamp / 1000 for m in
                             client.get_metric_history(run.info.run_id, "epoch"))
                      for run in trials)
        startup = re.findall(r"start-up: [^\n]*", done.stderr)
    if len(ends) != args.search_trials or any(len(e) != args.epochs for e in ends):
        raise SystemExit(f"expected {args.search_trials} trials of {args.epochs} epochs")
    epoch = statistics.median(b - a for e in ends for a, b in zip(e, e[1:], strict=False))
    periods = [b[0] - a[0] for a, b in zip(ends, ends[1:], strict=False)]
    fixed = [p - args.epochs * epoch for p in periods]
    return {"epoch_s": epoch, "trial_fixed_s": fixed, "wall_s": wall,
            "search_fixed_s": wall - args.search_trials * args.epochs * epoch,
            "startup": startup}


def steady(readings: list[float]) -> float:
    """The median increase between consecutive readings after the first epoch's."""
    return statistics.median(b - a for a, b in zip(readings[1:], readings[2:], strict=False))


def summarise(ends: list[float], wall: float, epochs: int,
              eval_share: float | None = None) -> dict[str, Any]:
    """Steady-state epoch (median gap after the first epoch) and the fixed cost around it."""
    if len(ends) != epochs or epochs < 3:
        raise SystemExit(f"expected {epochs} epoch ends (>= 3), got {len(ends)}")
    gaps = [b - a for a, b in zip(ends[1:], ends[2:], strict=False)]
    epoch = statistics.median(gaps)
    return {"epoch_s": epoch, "gaps": gaps, "wall_s": wall, "fixed_s": wall - epochs * epoch,
            "eval_share": eval_share}


# --- output --------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    mid = median(values)
    if len(values) < 2 or mid == 0:
        return "n/a"
    return f"{100 * (min(values) / mid - 1):+.1f}%..{100 * (max(values) / mid - 1):+.1f}%"


def machine(args: argparse.Namespace) -> str:
    load = os.getloadavg()[0]
    if args.device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)}, load avg {load:.1f}"
    return f"{os.cpu_count()}-core CPU, {args.cpus} CPU(s) per variant, load avg {load:.1f}"


def compare(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Ratio of the steady-state epochs, fixed costs, and their lines."""
    pairs = list(zip(results[BARE], results[TRAIN], strict=True))
    ratios = [t["epoch_s"] / b["epoch_s"] for b, t in pairs]
    cpu_ratios = [t["epoch_cpu_s"] / b["epoch_cpu_s"] for b, t in pairs]
    out: dict[str, Any] = {"ratio_per_repeat": ratios, "ratio_median": median(ratios),
                           "cpu_ratio_per_repeat": cpu_ratios,
                           "cpu_ratio_median": median(cpu_ratios)}
    for variant, rows in results.items():
        epochs = [r["epoch_s"] for r in rows]
        fixed = [r["fixed_s"] for r in rows]
        out[variant] = {"epoch_s": median(epochs), "epoch_noise": spread(epochs),
                        "fixed_s": median(fixed), "fixed_noise": spread(fixed),
                        "wall_s": median([r["wall_s"] for r in rows]),
                        "cpu_s": median([r["cpu_s"] for r in rows]),
                        "epoch_cpu_s": median([r["epoch_cpu_s"] for r in rows])}
    shares = [r["eval_share"] for r in results[BARE] if r["eval_share"] is not None]
    out[BARE]["eval_share"] = median(shares) if shares else None
    b, t = out[BARE], out[TRAIN]
    print(f"steady-state epoch: bare {b['epoch_s']:.2f} s ({b['epoch_noise']}), train "
          f"{t['epoch_s']:.2f} s ({t['epoch_noise']}); train/bare {out['ratio_median']:.3f} "
          f"(median of per-repeat ratios {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"training process CPU per steady-state epoch: bare {b['epoch_cpu_s']:.2f} s, train "
          f"{t['epoch_cpu_s']:.2f} s; train/bare {out['cpu_ratio_median']:.3f} (per repeat "
          f"{', '.join(f'{r:.3f}' for r in cpu_ratios)})")
    print(f"fixed cost: bare {b['fixed_s']:.1f} s ({b['fixed_noise']}), train "
          f"{t['fixed_s']:.1f} s ({t['fixed_noise']}); evaluation is "
          f"{100 * (b['eval_share'] or 0):.0f}% of a bare epoch")
    return out


def waited(result: dict[str, Any]) -> str:
    """The share of training time spent waiting for the loader (the train run's: the last
    progress line its worker printed)."""
    share = result.get("data_wait")
    return f", data wait {100 * share:.0f}%" if share is not None else ""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="flyp-tiny",
                   help="flyp-tiny, flyp-tiny-vit, an open_clip name or a model-config JSON")
    p.add_argument("--epochs", type=int, default=5, help="per run; >= 3")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--subsample", type=int, default=None,
                   help="images per split (default: the whole synthetic set, 1200 + 4 x 300)")
    p.add_argument("--cpus", type=int, default=1, help="torch threads = the Ray worker's CPUs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="bare/train pairs, interleaved")
    p.add_argument("--search-trials", type=int, default=0,
                   help="also time a search of this many trials in a row (>= 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the train run only (e.g. dataset.cache=disk)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arch in ("flyp-tiny", "flyp-tiny-vit"):
        sys.path.insert(0, str(REPO))
        from flyp_ray.finetune.model import tiny_config_path

        args.arch = str(tiny_config_path(vit=args.arch.endswith("vit")))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse(argv)
    if args.child:
        bare_child(args)
        return None
    print(f"machine: {machine(args)}; {args.epochs} epochs, batch {args.batch}, "
          f"{Path(args.arch).stem}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {BARE: [], TRAIN: []}
    for i in range(args.repeats):
        order = (BARE, TRAIN) if i % 2 == 0 else (TRAIN, BARE)
        for variant in order:
            result = run_bare(args) if variant == BARE else run_train(args, i)
            results[variant].append(result)
            gaps = ", ".join(f"{g:.2f}" for g in result["gaps"])
            print(f"repeat {i} {variant:>5}: epoch {result['epoch_s']:.2f} s (gaps {gaps}), "
                  f"wall {result['wall_s']:.1f} s, fixed {result['fixed_s']:.1f} s, "
                  f"CPU {result['cpu_s']:.1f} s, training process CPU per epoch "
                  f"{result['epoch_cpu_s']:.2f} s{waited(result)}", flush=True)
            if result.get("startup"):
                print(f"  {result['startup']}", flush=True)
    out: dict[str, Any] = {"machine": machine(args), "arch": Path(args.arch).stem,
                           "epochs": args.epochs, "batch": args.batch, "device": args.device}
    if args.repeats:
        out.update(compare(results))
    if args.search_trials >= 2:
        search = run_search(args)
        out["search"] = {"epoch_s": search["epoch_s"], "wall_s": search["wall_s"],
                         "trial_fixed_s": median(search["trial_fixed_s"]),
                         "trial_fixed_noise": spread(search["trial_fixed_s"]),
                         "search_fixed_s": search["search_fixed_s"]}
        for line in search["startup"]:
            print(f"  {line}")
        print(f"search of {args.search_trials} trials x {args.epochs} epochs: epoch "
              f"{search['epoch_s']:.2f} s, fixed cost per trial "
              f"{', '.join(f'{f:.1f}' for f in search['trial_fixed_s'])} s (median "
              f"{out['search']['trial_fixed_s']:.1f} s), whole search {search['wall_s']:.1f} s "
              f"of which {search['search_fixed_s']:.1f} s not epochs")
    print(f"load avg at the end: {os.getloadavg()[0]:.1f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
