"""``flyp-ray init DATA``: a complete, commented config for a data set, ready to validate.

It finds what ``DATA`` holds (:mod:`flyp_ray.data.detect`: an ImageFolder, a ``save_to_disk``
dataset or a cached hub name, a WILDS or csv root), reads it as a run would, and decides the
rest:

- the model and optimisation: the FLYP reference's (ViT-B/16 with OpenAI's weights, AdamW with
  torch's defaults, lr 1e-5, the pretrained temperature learned);
- the schedule, sized to the training set: a batch of 256 where an epoch has eight of them,
  fewer otherwise; epochs for about :data:`TARGET_STEPS` optimizer steps (10 to 100); warm-up
  a tenth of the steps, 500 at most. A set whose median class has at most
  :data:`FEW_SHOT_IMAGES` training images gets the few-shot setting of the FLYP reference:
  20 epochs, no warm-up, and more seeds per re-check;
- the search: lr, weight decay and temperature around the reference's values, more trials for
  smaller sets (cheaper trials), ASHA, a re-check of the three best;
- resources from what the machine (or the cluster at ``RAY_ADDRESS``) has: one GPU per trial
  worker and as many trials at a time as there are GPUs, each fed as the shipped GPU configs are
  (``dataset.cache: disk``, ``loader_workers: -1``, bf16); on CPUs alone, fp32 and the CPUs
  shared between two trials at most;
- an MLflow experiment and registered model named after the data.

``--set`` overrides anything (``--set model.arch=ViT-L-14``) before the file is written, and the
result is checked as every command checks a config. What it could not decide is said on stderr.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flyp_ray import config as config_mod
from flyp_ray.data.detect import Found, detect
from flyp_ray.errors import BadInput

TARGET_STEPS = 5000  # optimizer steps a search's trial aims at, in 10 to 100 epochs
FEW_SHOT_IMAGES = 16  # training images of the median class at or under which a set is few-shot
FULL_BATCH = 256  # FLYP's batch for most sets
MIN_BATCHES = 8  # an epoch of fewer full batches gets a smaller batch
SHOWN_CLASSES = 20  # class names listed in the file's header
SECTIONS = ("dataset", "model", "train", "resources", "search", "tracking", "storage")


@dataclasses.dataclass(frozen=True)
class Machine:
    """What trials can run on."""

    where: str  # "this machine", or the Ray cluster's address
    gpus: int  # in all
    node_gpus: int  # on the node with the most
    node_cpus: int  # on that node
    cluster: bool  # several nodes may share the work (storage must be shared)


@dataclasses.dataclass
class Draft:
    """A config as ``init`` composes it: the mapping, a comment per key, and what to say."""

    raw: dict[str, Any]
    comments: dict[str, str]  # dotted key -> its comment
    header: list[str]
    found: list[str]  # what init found and decided
    undecided: list[str]  # what it could not decide


# --- what there is to run on ---------------------------------------------------------------


def machine() -> Machine:
    """The cluster at ``RAY_ADDRESS`` if one is set (joined and left), else this machine."""
    from flyp_ray.distributed import cluster

    address = cluster.check_address()
    if address:
        return _cluster_machine(address)
    import torch

    return Machine("this machine", torch.cuda.device_count(), torch.cuda.device_count(),
                   os.cpu_count() or 1, cluster=False)


def _cluster_machine(address: str) -> Machine:
    import ray

    from flyp_ray.distributed import cluster

    cluster.init_ray(address=address)
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    finally:
        cluster.shutdown_if_started()
    best = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
    return Machine(f"the Ray cluster at {address}", int(sum(r.get("GPU", 0) for r in nodes)),
                   int(best.get("GPU", 0)), int(best.get("CPU", 1)), cluster=len(nodes) > 1)


# --- deciding ------------------------------------------------------------------------------


def draft(found: Found, where: Machine, out: str = "CONFIG") -> Draft:
    """The config for ``found`` on ``where``, with its comments and what to tell the user;
    ``out`` is the file's name, for the commands its header shows."""
    d = Draft({}, {}, [], [found.facts.line], [])
    per_class = sorted(found.facts.train_per_class.values())
    images = sum(per_class)
    few_shot = bool(per_class) and statistics.median(per_class) <= FEW_SHOT_IMAGES
    _header(d, found, per_class, out)
    resources = _resources(d, where, images)
    _dataset(d, found, gpu=resources["gpus_per_worker"] > 0)
    _model(d)
    train = _train(d, found, images, few_shot, resources)
    _search(d, images, few_shot, train, resources, where)
    _tracking(d, found.name, where)
    _undecided(d, found)
    d.raw = {key: d.raw[key] for key in SECTIONS}
    return d


def _header(d: Draft, found: Found, per_class: list[int], out: str) -> None:
    facts, names = found.facts, list(found.facts.classnames)
    shown = ", ".join(names[:SHOWN_CLASSES]) + (f", ... ({len(names) - SHOWN_CLASSES} more)"
                                                 if len(names) > SHOWN_CLASSES else "")
    d.header += [f"{found.name}: {found.dataset['name']} data set, written by `flyp-ray init`.",
                 "",
                 f"  flyp-ray validate {out}",
                 f"  flyp-ray tune {out}",
                 "",
                 f"Classes ({len(names)}): {shown}",
                 "Splits: " + ", ".join(f"{n} {s.size}" for n, s in facts.splits.items())]
    if per_class:
        d.header.append(f"Training images per class: {per_class[0]} to {per_class[-1]} "
                        f"(median {statistics.median(per_class):g})")
    if any(s.grouped for s in facts.splits.values()):
        d.header.append("Groups: yes (worst_group_acc is reported)")
    d.found.append(f"{len(names)} classes, {sum(per_class)} training images "
                   f"({per_class[0] if per_class else 0} to {per_class[-1] if per_class else 0} "
                   f"a class)")


def _resources(d: Draft, where: Machine, images: int) -> dict[str, Any]:
    if where.gpus > 0:
        # ImageNet-sized sets take a node's GPUs per trial; smaller ones one GPU per trial,
        # trials side by side (a search gains more from parallel trials than from DDP).
        workers = min(where.node_gpus, 8) if images >= 500_000 else 1
        cpus = max(1, min(8, where.node_cpus // max(where.node_gpus, 1)))
        resources = {"workers": workers, "gpus_per_worker": 1, "cpus_per_worker": cpus}
        what = f"{where.gpus} GPU(s): {workers} GPU worker(s) per trial"
    else:
        cpus = 1 if where.node_cpus <= 4 else 4
        resources = {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": cpus}
        what = f"no GPU, {where.node_cpus} CPU(s): one CPU worker per trial (slow: a test run)"
    d.raw["resources"] = resources
    d.comments["resources"] = f"from {where.where}"
    d.found.append(f"{where.where}: {what}")
    return resources


def _dataset(d: Draft, found: Found, gpu: bool) -> None:
    section = dict(found.dataset)
    kind = section["name"]
    comments = {"name": _KIND_COMMENTS.get(kind, "a WILDS data set"),
                "root": "the data set's folder" if kind != "huggingface" or
                Path(section["root"]).is_absolute() else "a hub name, read from the local cache",
                "image_column": "found by its Image feature",
                "label_column": "found by its ClassLabel feature",
                "classnames": "one class name a line, label 0 first"}
    if kind in ("imagefolder", "huggingface", "csv"):
        section["templates"] = "simple"
        comments["templates"] = 'or a list: ["a photo of a {}, a pet."]'
    section["cache"] = "disk" if gpu else "none"
    comments["cache"] = ("decode each image once, on the node's disk" if gpu
                         else "decoded as it trains; disk with GPUs")
    section["loader_workers"] = -1
    comments["loader_workers"] = "loader processes: the worker's CPUs less one"
    d.raw["dataset"] = section
    d.comments.update({f"dataset.{k}": v for k, v in comments.items() if k in section})


_KIND_COMMENTS = {"imagefolder": "root/<split>/<class>/<image>",
                  "huggingface": "a datasets DatasetDict", "csv": "metadata.csv and class names"}


def _model(d: Draft) -> None:
    d.raw["model"] = {"arch": "ViT-B-16", "pretrained": "openai"}
    d.comments.update({"model": "the FLYP reference's",
                       "model.pretrained": "OpenAI's weights (open_clip fetches them once)"})


def _train(d: Draft, found: Found, images: int, few_shot: bool,
           resources: dict[str, Any]) -> dict[str, Any]:
    workers = resources["workers"]
    batch = _batch(images, workers, few_shot)
    steps = max(1, images // batch)
    epochs = 20 if few_shot else min(100, max(10, math.ceil(TARGET_STEPS / steps)))
    warmup = 0 if few_shot else min(500, epochs * steps // 10)
    train: dict[str, Any] = {
        "method": "flyp", "recipe": "flyp", "epochs": epochs, "batch_size": batch,
        "lr": 1.0e-5, "weight_decay": 0.1, "temperature": None, "learn_temperature": True,
        "warmup_steps": warmup, "precision": "bf16" if resources["gpus_per_worker"] else "fp32",
        "seed": 0}
    evaluated = [s for s in found.facts.splits if s != "train"]
    if len(evaluated) > 1:
        train["eval_splits"] = ["id_val"]
    d.raw["train"] = train
    regime = (f"few-shot-like: the median class has {FEW_SHOT_IMAGES} training images or fewer"
              if few_shot else f"{epochs} epochs of {steps} steps: about {TARGET_STEPS} in all")
    d.comments.update({
        "train": "the FLYP reference's recipe, sized to the training set",
        "train.recipe": "the reference's AdamW (docs/FIDELITY.md)",
        "train.epochs": "20, no warm-up: few-shot-like" if few_shot else
        f"{steps} steps an epoch", "train.batch_size": "global, over all workers",
        "train.temperature": "CLIP's learned temperature, unless searched",
        "train.warmup_steps": "a tenth of the run, 500 at most" if not few_shot else
        "none, as the reference's few-shot runs",
        "train.eval_splits": "before the last epoch (ASHA reads id_val)"})
    d.found.append(f"schedule: {regime}, batch {batch}")
    return train


def _batch(images: int, workers: int, few_shot: bool) -> int:
    """The largest power of two that gives an epoch :data:`MIN_BATCHES` batches (the whole
    set, for few-shot), at most 256, at least the workers, and no more than the images."""
    target = images if few_shot else images // MIN_BATCHES
    batch = min(FULL_BATCH, 2 ** int(math.log2(max(target, 1))))
    batch = max(batch, min(8, 2 ** int(math.log2(max(images, 1)))))
    return max(workers, batch - batch % workers)


def _search(d: Draft, images: int, few_shot: bool, train: dict[str, Any],
            resources: dict[str, Any], where: Machine) -> None:
    samples = 24 if images < 50_000 else 16 if images < 500_000 else 8
    slots = (where.gpus // resources["workers"] if resources["gpus_per_worker"]
             else max(1, min(2, where.node_cpus // resources["cpus_per_worker"])))
    seeds = 3 if few_shot or images < 5_000 else 2
    low_lr = 1.0e-7 if few_shot else 1.0e-6
    d.raw["search"] = {
        "metric": "id_val/acc", "mode": "max", "num_samples": samples,
        "max_concurrent_trials": max(1, min(slots, samples)), "sampler": "tpe",
        "scheduler": {"type": "asha", "grace_period": max(1, train["epochs"] // 10),
                      "reduction_factor": 3},
        "recheck": {"top_k": 3, "seeds": seeds},
        "space": {"lr": {"type": "float", "low": low_lr, "high": 1.0e-4, "log": True},
                  "weight_decay": {"type": "float", "low": 0.0, "high": 0.4},
                  "temperature": {"type": "float", "low": 0.002, "high": 0.05, "log": True}}}
    d.comments.update({
        "search.metric": "FLYP selects on ID validation",
        "search.num_samples": "trials: more for smaller sets",
        "search.max_concurrent_trials": "as many as fit at once",
        "search.recheck": f"the 3 best again, {seeds} new seeds; the best mean wins",
        "search.space.lr": "around the reference's 1e-5",
        "search.space.temperature": "centre 0.01: OpenAI CLIP's"})


def _tracking(d: Draft, name: str, where: Machine) -> None:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data"
    d.raw["tracking"] = {"uri": "sqlite:///mlflow.db", "experiment": f"flyp-{slug}",
                         "registered_model": f"flyp-{slug}"}
    d.raw["storage"] = "~/flyp_ray_results"
    d.comments.update({"tracking.uri": "on a cluster: the MLflow server",
                       "storage": "on a cluster: a folder every node mounts, or s3://"})
    if where.cluster:
        d.undecided.append("tracking.uri and storage: a local sqlite file and a home folder; "
                           "a cluster's nodes need an MLflow server and shared storage")


def _undecided(d: Draft, found: Found) -> None:
    kind = found.dataset["name"]
    if kind in ("imagefolder", "huggingface", "csv"):
        d.undecided.append("dataset.templates: the generic 'a photo of a {}.'; words of your "
                           "domain often do better (a list of strings with {})")
    if not any(s.startswith("ood") for s in found.facts.splits):
        d.undecided.append("no ood_val/ood_test split: robustness under a shift is not "
                           "measured (add such folders or splits)")
    coded = [n for n in found.facts.classnames if not re.search(r"[A-Za-z]{2}", n)
             or re.fullmatch(r"n\d{8}", n)]
    if coded:
        imagenet = (" (ImageNet's wnids: dataset.name: imagenet knows their names)"
                    if re.fullmatch(r"n\d{8}", coded[0]) else "")
        d.undecided.append(f"class names such as {coded[0]!r} are codes, and the prompts say "
                           f"them as they are: name the classes in a dataset.classnames "
                           f"file{imagenet}")
    d.undecided.append("model: ViT-B-16 with OpenAI's weights, the reference's; --set "
                       "model.arch=... for another open_clip model")


# --- writing -------------------------------------------------------------------------------


def render(raw: dict[str, Any], comments: dict[str, str], header: Sequence[str]) -> str:
    """The config as YAML with its comments: sections as blocks, small mappings inline."""
    lines = [f"# {h}".rstrip() for h in header]
    lines += _block(raw, comments, "", 0)
    return "\n".join(lines) + "\n"


def _block(values: dict[str, Any], comments: dict[str, str], prefix: str,
           depth: int) -> list[str]:
    lines = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        comment = comments.get(dotted)
        indent = "  " * depth
        if isinstance(value, dict) and value and (depth == 0 or key == "space"):
            lines.append(_comment(f"{indent}{key}:", comment))
            lines += _block(value, comments, f"{dotted}.", depth + 1)
        else:
            lines.append(_comment(f"{indent}{key}: {_flow(value)}", comment))
    return lines


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _comment(line: str, comment: str | None) -> str:
    return f"{line.ljust(34)}  # {comment}" if comment else line


def run_init(data: str, overrides: Sequence[str], out: str | None) -> tuple[str, Draft]:
    """The YAML for ``data`` (with ``overrides``), checked as a config; and what was decided."""
    source = out or "<init>"
    found = detect(data, source)
    if not found.facts.splits:
        raise BadInput(f"{data}: nothing to read yet (to be downloaded): fetch it first")
    d = draft(found, machine(), out or "CONFIG")
    for item in overrides:
        d.raw = config_mod.apply_override(d.raw, item, source)
    _refit(d.raw, _keys(overrides), sum(found.facts.train_per_class.values()))
    text = render(d.raw, d.comments, d.header)
    cfg = config_mod.from_dict(config_mod.parse_yaml(text, source), source)
    _check_runs(cfg, found)
    _check_weights(cfg, d)
    return text, d


def _check_weights(cfg: config_mod.Config, d: Draft) -> None:
    """Say so when the model's weights are neither cached nor reachable from here.

    The file is written all the same (the reference's model is what a FLYP user wants, and the
    weights may be provided before the first run), but ``validate`` would refuse it as it is.
    """
    from flyp_ray.finetune.model import check_model

    try:
        check_model(cfg.model, cfg.source)
    except BadInput as err:
        d.undecided.append(f"{err} (validate refuses the file until then)")


def _keys(overrides: Sequence[str]) -> set[str]:
    """The dotted keys that ``--set`` items name (a bare train field as ``train.<field>``)."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    return {k if "." in k or k == "storage" else f"train.{k}" for k in keys}


def _refit(raw: dict[str, Any], given: set[str], images: int) -> None:
    """Settings derived from others, derived again from the overridden values (``--set
    epochs=2`` gets a warm-up and an ASHA grace period that fit two epochs), unless given."""
    train, search = raw.get("train", {}), raw.get("search", {})
    if not isinstance(train, dict) or not isinstance(search, dict):
        return  # a section replaced whole: the config check says what is wrong with it
    epochs, batch = train.get("epochs"), train.get("batch_size")
    if isinstance(epochs, int) and isinstance(batch, int) and batch > 0:
        if "train.warmup_steps" not in given and train.get("warmup_steps"):
            train["warmup_steps"] = min(500, epochs * max(1, images // batch) // 10)
        scheduler = search.get("scheduler")
        if isinstance(scheduler, dict) and "search.scheduler.grace_period" not in given:
            scheduler["grace_period"] = max(1, epochs // 10)
    samples, recheck = search.get("num_samples"), search.get("recheck")
    if isinstance(samples, int) and samples >= 1:
        if "search.max_concurrent_trials" not in given:
            search["max_concurrent_trials"] = min(search.get("max_concurrent_trials", 1), samples)
        if isinstance(recheck, dict) and "search.recheck.top_k" not in given:
            recheck["top_k"] = min(recheck.get("top_k", 1), samples)


def _check_runs(cfg: config_mod.Config, found: Found) -> None:
    """What a run of the written config needs of the data (its sizes and metric names)."""
    from flyp_ray import preflight

    preflight.check_run(cfg, found.facts)
