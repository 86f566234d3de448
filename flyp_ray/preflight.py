"""Everything a command can check before Ray starts, in one place.

``flyp-ray validate`` runs all of it; ``train``, ``tune``, ``tune-all``, ``compare`` and ``eval``
run the parts they need through the same functions, so a config is refused with the same line
whichever command refused it, and nothing validate passes fails later on something it could
have known: the data set's layout, splits and class sizes, the model, its checkpoint or
whether its pretrained weights are cached or reachable, the metric names the run will report,
the tracking URI, the storage, the search space and scheduler (for a config that searches), and
whether the cluster the command would run on can hold a worker group, asked without starting
Ray here (``distributed/capacity.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import get_args

from flyp_ray.config import (
    BudgetConfig,
    Config,
    DatasetName,
    ModelConfig,
    cache_kind,
    check_budget,
    did_you_mean,
    objectives,
    planned_epochs,
    trial_rate,
)
from flyp_ray.data.base import DataFacts
from flyp_ray.errors import ConfigError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = get_args(DatasetName)


@dataclasses.dataclass(frozen=True)
class Checked:
    """What the checks found: lines describing the config's parts, and warnings."""

    lines: list[str]
    warnings: list[str]
    facts: DataFacts


def check(cfg: Config, *, search: bool = True, resume: bool = False) -> Checked:
    """Every check of ``cfg`` before Ray starts here; raises the first BadInput found.

    ``search`` adds the search's own checks (space, sampler, scheduler; ``resume``: a search
    to resume exists), which ``tune``, ``tune-all`` and ``compare --tune`` make, and
    ``validate`` for a config that :func:`searches`.
    """
    facts, lines = _check_parts(cfg)
    check_run(cfg, facts)
    if search:
        check_search(cfg, resume=resume)
    return Checked(lines, warnings(cfg, facts) + check_resources(cfg), facts)


def searches(cfg: Config) -> bool:
    """Whether ``cfg`` is fit for a search: its ``search.space`` names a field to search.

    A config without one is a train config; its ``search.metric`` and ``mode`` still select
    the epoch that ``train`` keeps.
    """
    return bool(cfg.search.space)


def fit_for(cfg: Config) -> str:
    """The commands ``cfg`` is fit for, as ``validate`` says it."""
    if searches(cfg):
        return "fit for: train, tune, tune-all, compare --tune, eval"
    return "fit for: train, eval, compare (tune needs search.space)"


def check_resources(cfg: Config) -> list[str]:
    """The worker group against the cluster the command will run on (nothing is started)."""
    from flyp_ray.distributed import capacity

    return capacity.check(cfg)


def check_searches(cfgs: Sequence[Config], budget_hours: float | None) -> list[Config]:
    """``tune-all``: every config checked before any search starts, and a budget shared.

    ``budget_hours`` is split over the data sets in proportion to the work of one trial of
    each (training images x epochs x the trial's hourly rate); each share is then checked as a
    config's own budget would be. Returns the configs with their shares.
    """
    from flyp_ray.search import budget

    checked = [check(cfg) for cfg in cfgs]
    for c in checked:
        report(c)
    if budget_hours is None:
        return list(cfgs)
    work = [training_images(cfg, c.facts) * planned_epochs(cfg.train) * trial_rate(cfg)
            for cfg, c in zip(cfgs, checked, strict=True)]
    shared = []
    for cfg, share in zip(cfgs, budget.split(budget_hours, work), strict=True):
        search = dataclasses.replace(cfg.search, budget=BudgetConfig(worker_hours=share))
        shared.append(dataclasses.replace(cfg, search=search))
        check_budget(shared[-1])
        log.info("%s: %.3g of the %g worker-hours", cfg.source, share, budget_hours)
    return shared


def check_methods(cfg: Config, methods: Sequence[str], *, search: bool) -> Checked:
    """``compare``: the config's parts once, then each method's run (and search) as it runs."""
    from flyp_ray.search import compare

    facts, lines = _check_parts(cfg)
    found: list[str] = check_resources(cfg)  # every method runs the config's worker group
    for method in methods:
        method_cfg = compare.method_config(cfg, method)
        check_run(method_cfg, facts)
        if search and method in compare.SEARCHED:
            check_search(method_cfg)
        found += [w for w in warnings(method_cfg, facts) if w not in found]
    return Checked(lines, found, facts)


def check_eval(cfg: Config) -> None:
    """``eval``: the data set it evaluates on and the tracking URI that resolves the model."""
    from flyp_ray.data.load import inspect_data
    from flyp_ray.tracking import runs

    inspect_data(cfg.dataset, cfg.source)
    runs.check_uri(cfg.tracking.uri, cfg.source)


def _check_parts(cfg: Config) -> tuple[DataFacts, list[str]]:
    """The data set, the model, the tracking URI and registered model, the storage."""
    from flyp_ray.data.load import inspect_data
    from flyp_ray.finetune import checkpoint
    from flyp_ray.finetune.model import check_model
    from flyp_ray.tracking import registry, runs

    facts = inspect_data(cfg.dataset, cfg.source)
    model = check_model(cfg.model, cfg.source)
    runs.check_uri(cfg.tracking.uri, cfg.source)
    registry.check_registered_model(cfg)
    checkpoint.check_storage(cfg.storage, cfg.source)
    return facts, [f"{cfg.source}: config ok", facts.line, model]


def check_search(cfg: Config, *, resume: bool = False) -> None:
    """The search's space, sampler and scheduler (and, to resume, the search's folder)."""
    from flyp_ray.search import tune

    if not searches(cfg):
        raise ConfigError(cfg.source, "search.space", "is empty, so a search has nothing to "
                                                      "search: name at least one train field "
                                                      "(e.g. lr: {type: float, low: 1.0e-6, "
                                                      "high: 1.0e-4, log: true}); train runs "
                                                      "this config as it is")
    tune.check(cfg, resume=resume)


def check_run(cfg: Config, facts: DataFacts) -> None:
    """What one run of ``cfg`` on the data set of ``facts`` needs: names and sizes."""
    if not facts.splits:  # still to be downloaded: nothing more is known
        return
    check_eval_splits(cfg, facts)
    check_metrics(cfg, facts)
    check_training_set(cfg, facts)
    if cfg.tracking.promotion.guard:
        from flyp_ray.tracking import promotion

        promotion.check_guard(cfg, facts.splits)


def check_eval_splits(cfg: Config, facts: DataFacts) -> None:
    """``train.eval_splits`` names splits the data set has."""
    have = [s for s in facts.splits if s != "train"]
    for split in cfg.train.eval_splits or []:
        if split not in have:
            raise ConfigError(cfg.source, "train.eval_splits", f"{split!r} is not a split of "
                              f"{cfg.dataset.name}{did_you_mean(split, have)} (it has "
                              f"{', '.join(have)}), got {cfg.train.eval_splits}")


def check_metrics(cfg: Config, facts: DataFacts) -> None:
    """Each of ``search.metric`` is reported by every report of the run.

    Tune checks every result of a trial for the search metric, and the first one also selects
    the epoch a ``train`` run keeps: a name that is missing, or there only at the last epoch,
    would fail the run after its first epoch.
    """
    from flyp_ray.finetune.reports import reported

    names = reported(cfg.train, facts.splits)
    metrics, _ = objectives(cfg.search)
    for metric in metrics:
        if names.in_every(metric):
            continue
        if names.in_some(metric):
            problem = (f"{metric!r} is reported after the last epoch only, but a search needs "
                       f"it from every epoch{did_you_mean(metric, sorted(names.every))}")
        else:
            problem = (f"{metric!r} is not a metric of this run"
                       f"{did_you_mean(metric, sorted(names.some))} (it reports "
                       f"{_example(sorted(names.every), metric)}, ...)")
        raise ConfigError(cfg.source, "search.metric", problem)


def _example(names: Sequence[str], near: str) -> str:
    """A few of ``names``, those most like ``near`` first."""
    head = near.rpartition("/")[0]
    alike = [n for n in names if n.startswith(head)] if head else []
    return ", ".join((alike or list(names))[:4])


def training_images(cfg: Config, facts: DataFacts) -> int:
    """The images one epoch trains on: the training split, or its few-shot draw."""
    if cfg.train.k_shot is not None:
        return cfg.train.k_shot * len(facts.train_per_class)
    return sum(facts.train_per_class.values())


def check_training_set(cfg: Config, facts: DataFacts) -> None:
    """A few-shot draw the classes can give, and a batch an epoch can fill at least once."""
    train, src = cfg.train, cfg.source
    if train.method in ("zeroshot", "lp"):  # no training batches: nothing to fill
        return
    if "train" not in facts.splits:
        raise ConfigError(src, "dataset.name", f"{cfg.dataset.name} has no train split to "
                                               f"finetune on (train.method {train.method})")
    if train.k_shot is not None:
        label, fewest = min(facts.train_per_class.items(), key=lambda lc: lc[1])
        if train.k_shot > fewest:
            raise ConfigError(src, "train.k_shot", f"{train.k_shot} images per class asked, but "
                                                   f"class {label} has {fewest} training images")
    images = training_images(cfg, facts)
    if train.batch_size > images:
        # Batches are dropped when short (every worker must take the same steps): an epoch
        # with fewer images than one batch would take no step at all.
        raise ConfigError(src, "train.batch_size", f"{train.batch_size} is more than the "
                                                   f"{images} training images: an epoch would "
                                                   f"take no step")


def warnings(cfg: Config, facts: DataFacts) -> list[str]:
    """What is allowed but most likely not meant."""
    found = []
    train = cfg.train
    if facts.splits and train.method not in ("zeroshot", "lp"):
        steps = train.epochs * (training_images(cfg, facts) // train.batch_size)
        if train.warmup_steps > steps > 0:  # the factor reaches 1 at step warmup_steps
            found.append(f"{cfg.source}: train.warmup_steps: {train.warmup_steps} of the run's "
                         f"{steps} optimizer steps: the learning rate never reaches train.lr")
    templates = cfg.dataset.templates
    if isinstance(templates, str) and templates != cfg.dataset.name and templates in DATASETS:
        found.append(f"{cfg.source}: dataset.templates: {templates!r} are another data set's "
                     f"prompts, for dataset {cfg.dataset.name} (copied from its config?)")
    found += data_path_warnings(cfg)
    found += cache_space_warnings(cfg, facts)
    return found


def data_path_warnings(cfg: Config) -> list[str]:
    """A GPU run whose images are decoded in the training process, or again every epoch.

    One CPU core decodes and resizes about 300 images a second (docs/PERFORMANCE.md), a tenth
    of what one GPU's step takes in: decoding in the training process, or every epoch, leaves
    the GPU waiting for data most of the time.
    """
    from flyp_ray.finetune.run import loader_workers

    d, r, src = cfg.dataset, cfg.resources, cfg.source
    if r.gpus_per_worker <= 0:
        return []
    found = []
    if loader_workers(cfg) == 0:
        fix = ("set dataset.loader_workers: -1 (one per CPU of the worker but one)"
               if d.loader_workers == 0 else
               f"give the worker more CPUs than resources.cpus_per_worker: {r.cpus_per_worker:g}")
        found.append(f"{src}: dataset.loader_workers: {d.loader_workers} with GPUs: the training "
                     f"process decodes every image itself while the GPU waits; {fix}")
    if cache_kind(d) == "none":
        found.append(f"{src}: dataset.cache: {d.cache} with GPUs: every epoch decodes every image "
                     f"again (about 300 images/s per core); set dataset.cache: disk")
    return found


def image_size(model: ModelConfig) -> int | None:
    """The side of the model's square input in pixels, from its open_clip config (None if the
    config is not local, e.g. a hub model, or its input is not square)."""
    import open_clip

    from flyp_ray.errors import ModelError
    from flyp_ray.finetune.model import resolve_arch

    try:
        config = open_clip.get_model_config(resolve_arch(model.arch))
    except ModelError:
        return None
    size = (config or {}).get("vision_cfg", {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    return size if isinstance(size, int) else None


def cache_space_warnings(cfg: Config, facts: DataFacts) -> list[str]:
    """A disk cache that the free space under ``dataset.cache_dir`` cannot hold.

    The cache stores every image of every split as uint8 pixels at the model's resolution
    (3 x 224 x 224 bytes, 150 KB, for a ViT-B/16); a disk that fills up mid-epoch would stop the
    run. Space the cache folder already takes counts as free: a filled cache is reused.
    """
    import shutil
    from pathlib import Path

    from flyp_ray.data import cache

    d = cfg.dataset
    size = image_size(cfg.model) if cache_kind(d) == "disk" and facts.splits else None
    if size is None:
        return []
    needed = sum(s.size for s in facts.splits.values()) * (3 * size * size + 1)
    folder = Path(d.cache_dir).expanduser() if d.cache_dir else cache.default_dir()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    used = sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file()) \
        if folder.is_dir() else 0
    free = shutil.disk_usage(existing).free + used
    if needed <= free:
        return []
    return [f"{cfg.source}: dataset.cache_dir: the disk cache needs about {needed / 1e9:.1f} GB "
            f"({size} px) under {folder}, where {free / 1e9:.1f} GB are free; set "
            f"dataset.cache_dir to a larger node-local disk"]


def report(checked: Checked) -> None:
    """Log the warnings of a command that goes on to run."""
    for warning in checked.warnings:
        log.warning("%s", warning)
