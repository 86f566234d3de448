"""The config: one YAML per data set, loaded strictly into frozen dataclasses.

A locked config turns every unknown key, wrong type or out-of-range value into a
:class:`ConfigError` that names the file, the dotted key and the value, before Ray starts.
``TrainConfig`` is flat on purpose: its field names are the search keys, the ``--set`` keys and
the MLflow param names, so no mapping layer sits between them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from flyp_ray.errors import ConfigError

Method = Literal["zeroshot", "lp", "ce", "lpft", "flyp"]
Precision = Literal["fp32", "bf16", "fp16"]
SameClass = Literal["negative", "mask", "positive"]
DatasetName = Literal[
    "iwildcam", "fmow", "camelyon17", "csv", "synthetic",
    # torchvision-backed transfer and few-shot sets (flyp_ray/data/transfer.py)
    "caltech101", "stanford_cars", "flowers102", "pcam", "rendered_sst2",
    "imagenet",  # ILSVRC-2012 with its shifts as OOD test sets (flyp_ray/data/imagenet.py)
    "imagefolder", "huggingface",  # a user's own: root/<split>/<class>/, a datasets DatasetDict
]
# ImageNet's distribution shifts, each evaluated as the split ``ood_test/<name>``.
OodSet = Literal["imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet"]
OOD_SETS: tuple[str, ...] = get_args(OodSet)
ParamType = Literal["float", "int", "categorical"]
SchedulerType = Literal["none", "asha", "hyperband", "pbt", "pb2"]
POPULATION = ("pbt", "pb2")  # schedulers whose trials continue from each other's checkpoints
SamplerType = Literal["tpe", "random", "cmaes", "nsga2", "gp"]
Mode = Literal["max", "min"]
CacheKind = Literal["none", "memory", "disk"]
CacheSetting = Literal["auto", "none", "memory", "disk"]  # auto: see cache_kind
Recipe = Literal["flyp", "clip"]
Policy = Literal["if-better", "always", "never"]

SPLITS = ("train", "id_val", "id_test", "ood_val", "ood_test")
# Methods that train an image tower with a linear head (cross-entropy), not CLIP's two towers.
CLASSIFIER_METHODS = ("ce", "lp", "lpft")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one trial's training depends on; each field is searchable."""

    method: Method = "flyp"  # flyp | ce | lp | lpft | zeroshot: all share one loop
    epochs: int = 10  # an epoch is one pass over the training images
    batch_size: int = 256  # global batch over all workers of a trial
    lr: float = 1.0e-5  # peak learning rate, reached after warm-up
    weight_decay: float = 0.1  # AdamW's decoupled decay; on which parameters: decay_gains_biases
    temperature: float | None = None  # None keeps the pretrained logit scale; else 1/logit_scale
    learn_temperature: bool = True  # CLIP learns its temperature; FLYP keeps doing so
    warmup_steps: int = 500  # linear warm-up in optimizer steps
    min_lr: float = 0.0  # floor of the cosine schedule (the reference adds it: docs/FIDELITY.md)
    # The optimisation recipe (docs/FIDELITY.md). Each null field below takes its value from
    # RECIPES[recipe]: "flyp" is the FLYP reference's (torch's AdamW defaults, decay on every
    # parameter, no clamp), "clip" open_clip's pre-training recipe. Set a field to override it.
    recipe: Recipe = "flyp"
    adam_beta1: float | None = None  # flyp 0.9, clip 0.9
    adam_beta2: float | None = None  # flyp 0.999, clip 0.98
    adam_eps: float | None = None  # flyp 1e-8, clip 1e-6
    decay_gains_biases: bool | None = None  # decay 1-d params, biases, logit scale too? flyp yes
    max_logit_scale: float | None = None  # clamp exp(logit_scale) after each step: clip 100
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    precision: Precision = "fp32"  # autocast dtype; fp16 also scales the loss
    seed: int = 0  # seeds torch, numpy, Python, the sampler and the prompt draw
    same_class: SameClass = "negative"  # same-class pairs in a batch: FLYP treats them as negatives
    local_loss: bool = False  # each worker scores only its own rows (faster, same gradients)
    eval_batch_size: int = 256  # per worker, for evaluation and the zero-shot head
    # Speed options (docs/PERFORMANCE.md); each keeps the loss the same, tests/test_speed_options.
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more FLOPs
    compile: bool = False  # torch.compile the model in place; off until measured on the target
    eval_splits: list[str] | None = None  # None: all splits every epoch; else these, all at the end
    log_every_steps: int = 50  # throughput and loss every N optimizer steps (log, MLflow perf/)
    # Baselines, WiSE-FT and few-shot (docs in README's "Methods"):
    lp_l2: list[float] = dataclasses.field(  # lp/lpft: L2 pull towards the zero-shot head,
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])  # chosen on id_val
    wiseft_alphas: list[float] | None = None  # WiSE-FT: evaluate these mixes after the run
    k_shot: int | None = None  # train on K images per class, drawn with the seed
    repeats: int = 1  # few-shot: train on this many draws; report their mean and std


# The two optimisation recipes, by the TrainConfig fields they fill when those are null.
# flyp: the FLYP reference (locuslab/FLYP src/models/flyp_loss.py: torch.optim.AdamW(params,
#   lr, weight_decay=wd) over every trainable parameter; the logit scale is learned, unclamped).
# clip: open_clip's pre-training (open_clip_train/main.py and train.py: betas 0.9/0.98, eps 1e-6
#   for ViTs, no decay on gains, biases and the logit scale, which is clamped at 100).
# One named preset, not five fields to copy: `--set recipe=clip` switches the whole recipe, and a
# field set (or searched) on its own still wins. The table lives here rather than beside the
# optimizer because the range checks (a temperature the clamp would undo) and the MLflow params
# (the values a run actually used, via ``resolve_recipe``) need it, and both sit below finetune/.
RECIPES: dict[str, dict[str, Any]] = {
    "flyp": {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
             "decay_gains_biases": True, "max_logit_scale": None},
    "clip": {"adam_beta1": 0.9, "adam_beta2": 0.98, "adam_eps": 1e-6,
             "decay_gains_biases": False, "max_logit_scale": 100.0},
}
RECIPE_FIELDS = tuple(RECIPES["flyp"])

# A temperature under 0.001 (a logit scale over 1000) makes the softmax over cosine similarities
# a hard max, so the loss teaches through the hardest negative only; over 10 (a scale under 0.1)
# it is nearly uniform. Without a clamp (the FLYP default) a learned scale may pass CLIP's 100,
# so the bounds are not tied to that cap; with a clamp the temperature must be one it allows.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 10.0


def resolve_recipe(train: TrainConfig) -> TrainConfig:
    """``train`` with each null recipe field filled from ``RECIPES[train.recipe]``.

    What the optimizer and the clamp use, and what MLflow records. Resolving twice changes
    nothing: a resolved config run again is the same run.
    """
    preset = RECIPES[train.recipe]
    filled = {name: preset[name] for name in RECIPE_FIELDS if getattr(train, name) is None}
    return dataclasses.replace(train, **filled) if filled else train


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Where the images are and how their classes are worded."""

    name: DatasetName = "synthetic"
    root: str | None = None  # WILDS root_dir, a data set's folder, or a Hugging Face hub name
    templates: str | list[str] | None = None  # a built-in set name or strings with "{}"
    classnames: str | None = None  # a file with one class name per line, overriding built-ins
    metadata: str = "metadata.csv"  # csv data sets: filepath,label,split[,group], relative to root
    download: bool = False  # WILDS and Hugging Face hub names only; never on unless asked
    subsample: int | None = None  # at most this many images per split (quick runs, tests)
    loader_workers: int = 0  # DataLoader worker processes per Ray worker; -1: its CPUs less one
    # decode each image once into uint8 at model resolution; auto: memory for the built-in
    # synthetic set, none for a data set of files (cache_kind)
    cache: CacheSetting = "auto"
    cache_dir: str | None = None  # disk cache: a folder on the node's local disk; None: temp dir
    # imagenet only: the shift sets to evaluate, each as split ood_test/<name> (docs/DATASETS.md)
    ood_sets: list[OodSet] | None = None
    ood_root: str | None = None  # the folder holding them under their usual names; None: root/..
    # huggingface only: the columns of the image and the label; None: found by their features
    image_column: str | None = None
    label_column: str | None = None


def cache_kind(dataset: DatasetConfig) -> CacheKind:
    """The decode-once cache a run of ``dataset`` uses: ``dataset.cache``, ``auto`` resolved.

    The synthetic images are drawn in the training process: with open_clip's PIL transforms an
    image costs 0.9 ms, every epoch, against the tiny model's 2.3 ms step on it (two CPU
    threads), for pixels that never change. Cached, later epochs copy them
    (docs/PERFORMANCE.md, "The default config's data path"). A data set of files stays
    uncached unless asked: a memory cache holds all of it in every worker process, and on CPUs
    the per-batch crop at full resolution costs what decoding does.
    """
    if dataset.cache != "auto":
        return dataset.cache
    return "memory" if dataset.name == "synthetic" else "none"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """An open_clip model: a registered name or a model-config JSON, and its weights."""

    arch: str = "ViT-B-16"  # open_clip name, or a path to an open_clip model-config JSON
    pretrained: str | None = "openai"  # open_clip tag, checkpoint file, hf-hub:org/name, or null


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    """The Ray Train worker group of one trial."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0  # fractional CPUs are fine on a small machine
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up

    @property
    def hourly_rate(self) -> float:
        """What an hour of one trial costs a budget: its GPUs, or its workers if they have none."""
        return self.workers * (self.gpus_per_worker if self.gpus_per_worker > 0 else 1.0)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One dimension of a search space, in Optuna's terms."""

    type: ParamType
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping of trials (ASHA, HyperBand) or population-based training (PBT, PB2),
    with ``epoch`` as the time attribute."""

    type: SchedulerType = "asha"
    grace_period: int = 1
    reduction_factor: int = 3
    perturbation_interval: int = 1  # pbt/pb2: epochs between two exploit/explore decisions
    quantile_fraction: float = 0.25  # pbt/pb2: the bottom share copies the top share
    # pbt/pb2: decide only when every trial has reached the interval (Tune's synchronous PBT),
    # at the price of restarting each trial's Train run at every decision
    synch: bool = False


@dataclasses.dataclass(frozen=True)
class RecheckConfig:
    """After the search, train the ``top_k`` best configs again with ``seeds`` new seeds each."""

    top_k: int = 3
    seeds: int = 2


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """What a search may spend: GPU-hours when workers have GPUs, else worker-hours."""

    worker_hours: float


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The Ray Tune + Optuna search over TrainConfig fields."""

    metric: str | list[str] = "id_val/acc"  # FLYP selects on ID validation
    mode: Mode | list[Mode] = "max"
    num_samples: int = 8
    max_concurrent_trials: int = 1
    sampler: SamplerType = "tpe"
    seed: int = 0
    warm_start: bool = False  # enqueue the best configs found so far as first points
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    space: dict[str, ParamSpec] = dataclasses.field(default_factory=dict)
    recheck: RecheckConfig | None = None  # re-train the best configs with new seeds; champion
    budget: BudgetConfig | None = None  # stop starting trials once this much is spent


@dataclasses.dataclass(frozen=True)
class PromotionConfig:
    """When a search's registered model becomes ``champion`` (flyp_ray/tracking/promotion.py)."""

    policy: Policy = "if-better"  # --promote overrides it per command
    min_delta: float = 0.0  # the challenger must beat the champion's search metric by more
    guard: dict[str, float] = dataclasses.field(default_factory=dict)  # metric -> allowed drop


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where runs, metrics and models go."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "flyp-ray"
    registered_model: str | None = None
    promotion: PromotionConfig = dataclasses.field(default_factory=PromotionConfig)


@dataclasses.dataclass(frozen=True)
class Config:
    """One data set's whole config file."""

    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    storage: str = "~/flyp_ray_results"  # Ray storage_path: a shared folder or s3:// on a cluster
    source: str = "<config>"  # the file it came from, for messages; not a YAML key


# --- YAML ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A SafeLoader that reads ``1e-5`` as a float, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot: ``1e-5`` would arrive as a string and a
    later comparison would compare strings. Resolving it here fixes the config and ``--set``.
    """


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text with the number rules above; a syntax error names the file and line.

    A key given twice in one mapping is refused with both lines: YAML keeps the last one
    silently, and a config whose ``lr`` is set twice does not say which one a run used.
    """
    try:
        node = yaml.compose(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        if node is not None:
            _refuse_repeated_keys(node, source, "")
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(source, "", f"malformed YAML at {where}: {problem}") from None


def _refuse_repeated_keys(node: yaml.Node, source: str, path: str) -> None:
    """Walk the composed YAML and refuse a mapping that names a key twice."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(source, _join(path, key),
                                  f"given twice, at lines {seen[key]} and {line}: keep one")
            seen[key] = line
            _refuse_repeated_keys(value_node, source, _join(path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(item, source, f"{path}[{i}]")


# --- strict construction -------------------------------------------------------------------

T = TypeVar("T")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """Check ``value`` against a type hint, converting only where no meaning can be lost."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        given = [o for o in options if o is not type(None)]
        if len(given) == 1:  # X | None: X's own error, with its own key
            return _coerce(value, given[0], source, key)
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, source, key)
            except ConfigError as err:
                errors.append(err.problem)
        raise ConfigError(source, key, errors[-1] if len(errors) == 1 else _mismatch(value, hint))
    if origin is Literal:
        if value not in get_args(hint):
            allowed = " | ".join(str(a) for a in get_args(hint))
            raise ConfigError(source, key, f"must be one of {allowed}, got {value!r}")
        return value
    if origin in (list, Sequence):
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {_describe(value)}")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a mapping, got {_describe(value)}")
        _, item = get_args(hint)
        return {str(k): _coerce(v, item, source, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, key)  # type: ignore[arg-type]
    return _scalar(value, hint, source, key)


def _mismatch(value: Any, hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in get_args(hint)]
    wanted = " or ".join(n.replace("NoneType", "null") for n in names)
    return f"expected {wanted}, got {_describe(value)}"


def _scalar(value: Any, hint: Any, source: str, key: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint_text = " (write it without quotes)" if _looks_numeric(value) else ""
            raise ConfigError(source, key, f"expected a number, got {_describe(value)}{hint_text}")
        if not math.isfinite(value):
            raise ConfigError(source, key, f"must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r}")  # a bug in this module, not user input


def _looks_numeric(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def build(cls: type[T], raw: Any, source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix or "<top>", f"expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields or key == "source":
            known = sorted(fields - {"source"})
            raise ConfigError(source, _join(prefix, str(key)),
                              f"unknown key{did_you_mean(str(key), known)} "
                              f"(known: {', '.join(known)})")
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        no_default = (field.default is dataclasses.MISSING
                      and field.default_factory is dataclasses.MISSING)
        if no_default and field.name not in raw:
            raise ConfigError(source, _join(prefix, field.name), "is required, got nothing")
    values = {k: _coerce(v, hints[k], source, _join(prefix, k)) for k, v in raw.items()}
    return cls(**values)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``choices``, or nothing if none is near."""
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


# --- range checks --------------------------------------------------------------------------


def _check(ok: bool, source: str, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(source, key, f"{rule}, got {value!r}")


def check_train(train: TrainConfig, source: str, prefix: str = "train") -> None:
    """Range checks for a TrainConfig (types are already right)."""
    k = lambda name: _join(prefix, name)  # noqa: E731 - a local shorthand
    _check(train.epochs >= (0 if train.method == "zeroshot" else 1), source, k("epochs"),
           train.epochs, "must be >= 1")
    _check(train.batch_size >= 1, source, k("batch_size"), train.batch_size, "must be >= 1")
    _check(train.eval_batch_size >= 1, source, k("eval_batch_size"), train.eval_batch_size,
           "must be >= 1")
    _check(train.lr > 0, source, k("lr"), train.lr, "must be > 0")
    _check(train.weight_decay >= 0, source, k("weight_decay"), train.weight_decay, "must be >= 0")
    _check(train.warmup_steps >= 0, source, k("warmup_steps"), train.warmup_steps, "must be >= 0")
    _check(0 <= train.min_lr <= train.lr, source, k("min_lr"), train.min_lr,
           f"must be between 0 and lr ({train.lr})")
    _check_recipe(train, source, k)
    if train.temperature is not None:
        _check(MIN_TEMPERATURE <= train.temperature <= MAX_TEMPERATURE, source, k("temperature"),
               train.temperature, f"must be between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}")
        bound = resolve_recipe(train).max_logit_scale
        if bound is not None:  # the clamp would undo a lower temperature at the first step
            _check(train.temperature >= 1 / bound, source, k("temperature"), train.temperature,
                   f"must be >= {1 / bound:g} (1 / max_logit_scale {bound:g})")
    if train.grad_clip is not None:
        _check(train.grad_clip > 0, source, k("grad_clip"), train.grad_clip, "must be > 0")
    _check(bool(train.lp_l2) and all(v >= 0 for v in train.lp_l2), source, k("lp_l2"),
           train.lp_l2, "must be a non-empty list of numbers >= 0")
    if train.wiseft_alphas is not None:
        _check(bool(train.wiseft_alphas) and all(0 <= a <= 1 for a in train.wiseft_alphas),
               source, k("wiseft_alphas"), train.wiseft_alphas,
               "must be a non-empty list of numbers between 0 and 1")
    if train.k_shot is not None:
        _check(train.k_shot >= 1, source, k("k_shot"), train.k_shot, "must be >= 1")
    _check(train.repeats >= 1, source, k("repeats"), train.repeats, "must be >= 1")
    _check(train.log_every_steps >= 1, source, k("log_every_steps"), train.log_every_steps,
           "must be >= 1")
    if train.eval_splits is not None:
        # ood_test/<set>: one ImageNet shift set; _check_ood_sets checks it is one of the config's.
        allowed = SPLITS[1:] + tuple(f"ood_test/{s}" for s in OOD_SETS)
        _check(bool(train.eval_splits) and all(s in allowed for s in train.eval_splits), source,
               k("eval_splits"), train.eval_splits,
               f"must be a non-empty list of {', '.join(SPLITS[1:])}, ood_test/<ood set>")


def _check_recipe(train: TrainConfig, source: str, k: Callable[[str], str]) -> None:
    """The recipe fields a config sets itself (a null one takes the recipe's valid value)."""
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(train, name)
        if value is not None:
            _check(0 <= value < 1, source, k(name), value, "must be >= 0 and < 1")
    if train.adam_eps is not None:
        _check(train.adam_eps > 0, source, k("adam_eps"), train.adam_eps, "must be > 0")
    if train.max_logit_scale is not None:
        # The clamp keeps the log scale >= 0 too (as open_clip's does), so the bound is >= 1.
        _check(1 <= train.max_logit_scale <= 1 / MIN_TEMPERATURE, source, k("max_logit_scale"),
               train.max_logit_scale, f"must be between 1 and {1 / MIN_TEMPERATURE:g}, or null")


def _check_space(search: SearchConfig, source: str) -> None:
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, spec in search.space.items():
        key = f"search.space.{name}"
        if name not in train_fields:
            known = sorted(train_fields)
            raise ConfigError(source, key, f"not a train field{did_you_mean(name, known)} "
                                           f"(searchable: {', '.join(known)})")
        if spec.type == "categorical":
            _check(bool(spec.choices), source, f"{key}.choices", spec.choices,
                   "needs a non-empty list")
            continue
        _check(spec.low is not None and spec.high is not None, source, key,
               dataclasses.asdict(spec),
               "needs low and high")
        assert spec.low is not None and spec.high is not None  # for the type checker
        _check(spec.low < spec.high, source, f"{key}.low", spec.low,
               f"must be < high ({spec.high})")
        if spec.log:
            _check(spec.low > 0, source, f"{key}.low", spec.low, "must be > 0 with log: true")
        if spec.type == "int":
            for end in ("low", "high"):
                v = getattr(spec, end)
                _check(float(v).is_integer(), source, f"{key}.{end}", v, "must be a whole number")


def planned_epochs(train: TrainConfig) -> int:
    """The epochs a run reports up to: none for zero-shot, one fit for a linear probe."""
    return {"zeroshot": 0, "lp": 1}.get(train.method, train.epochs)


def objectives(search: SearchConfig) -> tuple[list[str], list[str]]:
    """The metrics and modes of the search as lists (one entry for a single objective)."""
    metrics = search.metric if isinstance(search.metric, list) else [search.metric]
    modes = search.mode if isinstance(search.mode, list) else [search.mode]
    return list(metrics), list(modes)


def best_first(items: Iterable[T], score: Callable[[T], float], mode: str) -> list[T]:
    """``items`` ordered best first by ``score`` under a search ``mode`` (``max`` or ``min``).

    The sort is stable: of equal scores the earlier item comes first.
    """
    return sorted(items, key=score, reverse=mode == "max")


def last_best(epochs: Iterable[T], score: Callable[[T], float], mode: str) -> T:
    """The best of a run's ``epochs`` (in order) by ``score``; of equal scores the last.

    Ray Train keeps the last of equally scored checkpoints (and :class:`wiseft.Best` the last
    of equal epochs' weights): choosing the same epoch everywhere makes a trial's end line, the
    summary and the kept checkpoint agree.
    """
    return best_first(reversed(list(epochs)), score, mode)[0]


# Metrics whose direction is never in doubt: a search that maximises a loss is a typo.
_BETTER = {"loss": "min", "acc": "max", "macro_f1": "max", "worst_group_acc": "max"}


def check_search(search: SearchConfig, source: str) -> None:
    """Range checks of the search section."""
    metrics, modes = objectives(search)
    _check(len(metrics) == len(modes), source, "search.mode", search.mode,
           f"needs one mode per metric ({len(metrics)})")
    for m, mode in zip(metrics, modes, strict=False):
        _check("/" in m, source, "search.metric", m, "must be a metric name like id_val/acc")
        better = _BETTER.get(m.rpartition("/")[2])
        _check(better is None or mode == better, source, "search.mode", search.mode,
               f"{mode} for {m}, where {'lower' if better == 'min' else 'higher'} is better: "
               f"use {better}")
    _check(search.num_samples >= 1, source, "search.num_samples", search.num_samples,
           "must be >= 1")
    _check(search.max_concurrent_trials >= 1, source, "search.max_concurrent_trials",
           search.max_concurrent_trials, "must be >= 1")
    _check(search.scheduler.grace_period >= 1, source, "search.scheduler.grace_period",
           search.scheduler.grace_period, "must be >= 1")
    _check(search.scheduler.reduction_factor >= 2, source, "search.scheduler.reduction_factor",
           search.scheduler.reduction_factor, "must be >= 2")
    _check(search.scheduler.perturbation_interval >= 1, source,
           "search.scheduler.perturbation_interval", search.scheduler.perturbation_interval,
           "must be >= 1 (epochs)")
    _check(0 < search.scheduler.quantile_fraction <= 0.5, source,
           "search.scheduler.quantile_fraction", search.scheduler.quantile_fraction,
           "must be in (0, 0.5]")
    _check(not search.scheduler.synch or search.scheduler.type in POPULATION, source,
           "search.scheduler.synch", search.scheduler.synch,
           f"only pbt and pb2 wait for the population; not {search.scheduler.type}")
    if search.recheck is not None:
        _check(search.recheck.top_k >= 1, source, "search.recheck.top_k", search.recheck.top_k,
               "must be >= 1")
        _check(search.recheck.top_k <= search.num_samples, source, "search.recheck.top_k",
               search.recheck.top_k, f"must be <= search.num_samples ({search.num_samples})")
        _check(search.recheck.seeds >= 1, source, "search.recheck.seeds", search.recheck.seeds,
               "must be >= 1")
    if search.budget is not None:
        _check(search.budget.worker_hours > 0, source, "search.budget.worker_hours",
               search.budget.worker_hours, "must be > 0")
    _check_space(search, source)


def _check_eval_splits(cfg: Config) -> None:
    """With ``eval_splits``, early epochs report only those: they must hold the search metric."""
    if cfg.train.eval_splits is None:
        return
    metrics = cfg.search.metric if isinstance(cfg.search.metric, list) else [cfg.search.metric]
    for metric in metrics:
        for split in _metric_splits(metric, cfg.dataset.ood_sets or []):
            _check(split in cfg.train.eval_splits, cfg.source, "train.eval_splits",
                   cfg.train.eval_splits, f"must include {split} (search.metric is {metric})")


def _metric_splits(metric: str, ood_sets: Sequence[str]) -> list[str]:
    """The eval splits a metric is computed from (none for ``train/...``).

    With OOD sets, ``ood_test/<set>/acc`` comes from split ``ood_test/<set>`` and the average
    ``ood_test/acc`` from all of them.
    """
    head, _, rest = metric.partition("/")
    if head == "wiseft":  # wiseft/{alpha or best}/{split}/{name}
        return _metric_splits(rest.partition("/")[2], ood_sets)
    if head == "train":
        return []
    if head == "ood_test" and ood_sets:
        name = rest.split("/", 1)[0]
        return [f"ood_test/{name}"] if name in ood_sets else [f"ood_test/{s}" for s in ood_sets]
    return [head]


def _check_ood_sets(cfg: Config) -> None:
    """``dataset.ood_sets`` belongs to imagenet, names each set once, and fixes its splits."""
    d, src = cfg.dataset, cfg.source
    sets = d.ood_sets or []
    if d.ood_sets is not None:
        _check(d.name == "imagenet", src, "dataset.ood_sets", d.ood_sets,
               f"is for dataset imagenet only (dataset.name is {d.name})")
        repeated = sorted({s for s in sets if sets.count(s) > 1})
        _check(not repeated, src, "dataset.ood_sets", d.ood_sets,
               f"names {', '.join(repeated)} twice")
    _check(d.ood_root is None or bool(sets), src, "dataset.ood_root", d.ood_root,
           "is only read with dataset.ood_sets")
    named = [s for s in cfg.train.eval_splits or [] if s.startswith("ood_test/")]
    for split in named:
        _check(split.removeprefix("ood_test/") in sets, src, "train.eval_splits",
               cfg.train.eval_splits, f"names {split} but dataset.ood_sets is {d.ood_sets}")
    if d.name == "imagenet" and cfg.train.eval_splits is not None:
        # ImageNet has no single ood_val/ood_test split: its OOD splits are ood_test/<set>.
        allowed = ["id_val", "id_test"] + [f"ood_test/{s}" for s in sets]
        _check(all(s in allowed for s in cfg.train.eval_splits), src, "train.eval_splits",
               cfg.train.eval_splits, f"must name splits of this data set ({', '.join(allowed)})")


def check(cfg: Config) -> Config:
    """All range checks; returns ``cfg`` so that calls chain."""
    src = cfg.source
    check_train(cfg.train, src)
    r = cfg.resources
    _check(r.workers >= 1, src, "resources.workers", r.workers, "must be >= 1")
    _check(r.cpus_per_worker > 0, src, "resources.cpus_per_worker", r.cpus_per_worker,
           "must be > 0")
    _check(r.gpus_per_worker >= 0, src, "resources.gpus_per_worker", r.gpus_per_worker,
           "must be >= 0")
    _check(r.max_failures >= -1, src, "resources.max_failures", r.max_failures,
           "must be >= 0 (or -1 for no limit)")
    check_batch(cfg.train, r.workers, src)
    _check(bool(cfg.storage.strip()), src, "storage", cfg.storage,
           "must be a folder or a URI (s3://..., gs://..., file://...), not empty")
    _check(bool(cfg.tracking.uri.strip()), src, "tracking.uri", cfg.tracking.uri,
           "must be sqlite:///<file>, a database URI or http(s)://<server>, not empty")
    _check(bool(cfg.tracking.experiment.strip()), src, "tracking.experiment",
           cfg.tracking.experiment, "must name an MLflow experiment, not be empty")
    name = cfg.tracking.registered_model
    _check(name is None or bool(name.strip()), src, "tracking.registered_model", name,
           "must name a registered model, or be null for none")
    _check(cfg.dataset.name == "synthetic" or cfg.dataset.root is not None, src, "dataset.root",
           None, f"is required for dataset {cfg.dataset.name}")
    if cfg.dataset.subsample is not None:
        _check(cfg.dataset.subsample >= 1, src, "dataset.subsample", cfg.dataset.subsample,
               "must be >= 1")
    _check(cfg.dataset.loader_workers >= -1, src, "dataset.loader_workers",
           cfg.dataset.loader_workers, "must be >= 0, or -1 for one per CPU of the worker but one")
    _check_ood_sets(cfg)
    _check_eval_splits(cfg)
    check_search(cfg.search, src)
    check_promotion(cfg)
    _check_batch_space(cfg)
    check_budget(cfg)
    return cfg


def check_promotion(cfg: Config) -> None:
    """Promotion margins are amounts, never negative; a guard is on another metric than the
    search's first (which ``min_delta`` already covers). Guard names are checked against what a
    model's evaluation reports in preflight, where the data set's splits are known."""
    p, src = cfg.tracking.promotion, cfg.source
    _check(p.min_delta >= 0, src, "tracking.promotion.min_delta", p.min_delta, "must be >= 0")
    for metric, allowed in p.guard.items():
        key = f"tracking.promotion.guard.{metric}"
        _check(allowed >= 0, src, key, allowed, "must be an allowed drop >= 0")
        _check(metric != objectives(cfg.search)[0][0], src, key, allowed,
               "guards the search metric itself: tracking.promotion.min_delta sets its margin")


def trial_rate(cfg: Config) -> float:
    """What an hour of one trial costs a budget: its workers' rate (:attr:`ResourcesConfig.
    hourly_rate`) times its few-shot draws, which train side by side, each with workers of its
    own. Where the cluster queues some draws this is an upper bound: a budget is never overrun."""
    return cfg.resources.hourly_rate * cfg.train.repeats


def check_budget(cfg: Config) -> None:
    """A budget must pay for at least a minute of one trial's workers: a trial's start-up alone
    (Ray's worker group, the model, the data) takes about that long."""
    if cfg.search.budget is None:
        return
    hourly = trial_rate(cfg)
    minutes = 60 * cfg.search.budget.worker_hours / hourly
    unit = "GPU" if cfg.resources.gpus_per_worker > 0 else "worker"
    _check(minutes >= 1, cfg.source, "search.budget.worker_hours", cfg.search.budget.worker_hours,
           f"is {minutes:.2g} minutes of one trial's {hourly:g} {unit}(s), not enough for one "
           f"trial (its start-up alone takes about a minute)")


def check_batch(train: TrainConfig, workers: int, source: str) -> None:
    """The global batch must split evenly over the workers.

    Each worker takes ``batch_size // workers`` images a step: an uneven split would train on a
    smaller batch than the config (and the logged params) say.
    """
    _check(train.batch_size % workers == 0, source, "train.batch_size", train.batch_size,
           f"must split evenly over resources.workers ({workers}): use a multiple of {workers}")


def _check_batch_space(cfg: Config) -> None:
    """A searched batch size must only give values that split over the workers."""
    spec, workers = cfg.search.space.get("batch_size"), cfg.resources.workers
    if spec is None or spec.type != "int" or workers == 1:
        return  # categorical choices and the two ends are checked one by one as values
    step = spec.step or 1
    _check(step % workers == 0, cfg.source, "search.space.batch_size.step", spec.step,
           f"must be a multiple of resources.workers ({workers}) so that every sampled batch "
           f"splits evenly")


# --- loading and overrides -----------------------------------------------------------------


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a config file strictly, apply ``--set key=value`` overrides, and check it."""
    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, "", "config file not found") from None
    except OSError as err:
        raise ConfigError(source, "", f"cannot read config file ({err.strerror})") from None
    raw = parse_yaml(decode_utf8(data, source), source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "<top>", f"expected a mapping of sections, got {_describe(raw)}")
    raw = _resolve_paths(raw, path.parent)
    for item in overrides:
        raw = apply_override(raw, item, source)
    return from_dict(_absolute_sqlite(raw), source)


def decode_utf8(data: bytes, source: str, key: str = "", what: str = "") -> str:
    """``data`` as UTF-8 text, else a ConfigError naming the line and the byte that is not.

    An editor that saves Latin-1 (an accent in a comment) would otherwise end in a traceback.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise ConfigError(source, key, f"{f'{what} is ' if what else ''}not UTF-8: line {line}, "
                                       f"byte {column} is 0x{data[err.start]:02x} (save the file "
                                       f"as UTF-8)") from None


# What decides a run's result is never left to a default: a config names its data set and its
# model, weights included (null is a choice too: random initialisation).
REQUIRED = {
    "dataset.name": "one of " + " | ".join(get_args(DatasetName)),
    "model.arch": "an open_clip model name such as ViT-B-16, or a model-config JSON",
    "model.pretrained": "an open_clip tag such as openai, a checkpoint file, hf-hub:org/name, "
                        "or null for random weights",
}


def _require(raw: dict[str, Any], source: str) -> None:
    for key, what in REQUIRED.items():
        section, _, name = key.partition(".")
        values = raw.get(section)
        if values is None or (isinstance(values, dict) and name not in values):
            raise ConfigError(source, key, f"is required ({what}), got nothing")


def from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Build and check a Config from an already-parsed mapping."""
    _require(raw, source)
    cfg = build(Config, raw, source)
    return check(dataclasses.replace(cfg, source=source))


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make a model-config JSON path relative to the config file work from any directory."""
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("arch"), str):
        arch = model["arch"]
        if arch.endswith(".json") and not Path(arch).expanduser().is_absolute():
            candidate = base / arch
            if candidate.exists():
                model = {**model, "arch": str(candidate)}
                raw = {**raw, "model": model}
    return raw


def _absolute_sqlite(raw: dict[str, Any]) -> dict[str, Any]:
    """``sqlite:///mlflow.db`` as the absolute path MLflow gives it here, in this process's
    working folder.

    The config travels to Ray workers, whose working folder is Ray's own: left relative, a
    worker would log to (and create) another database there, and find none of its runs.
    """
    tracking = raw.get("tracking")
    if not isinstance(tracking, dict):
        return raw
    uri = tracking.get("uri")
    if not isinstance(uri, str) or not uri.startswith("sqlite:///"):
        return raw
    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    if path.is_absolute() or uri.removeprefix("sqlite:///") in ("", ":memory:"):
        return raw
    return {**raw, "tracking": {**tracking, "uri": f"sqlite:///{path.resolve()}"}}


_TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def apply_override(raw: dict[str, Any], item: str, source: str) -> dict[str, Any]:
    """Apply one ``key=value``: a bare TrainConfig field or a dotted path; the value is YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", item, "expected key=value")
    path = key.split(".")
    if len(path) == 1:
        if key not in _TRAIN_FIELDS and key != "storage":
            raise ConfigError("--set", key, f"unknown key (a train field or a dotted path), "
                                            f"value {text!r}")
        if key != "storage":
            path = ["train", key]
    value = parse_yaml(text, f"--set {key}") if text.strip() else None
    return _set_in(raw, path, value)


def _set_in(raw: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    out = dict(raw)
    head, *rest = path
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    out[head] = _set_in(inner if isinstance(inner, dict) else {}, rest, value)
    return out


def with_train(cfg: Config, **values: Any) -> Config:
    """A copy of ``cfg`` whose TrainConfig has ``values`` (a trial's sampled point), checked."""
    unknown = set(values) - _TRAIN_FIELDS
    if unknown:
        raise ConfigError(cfg.source, f"train.{sorted(unknown)[0]}", "not a train field")
    hints = typing.get_type_hints(TrainConfig)
    coerced = {k: _coerce(v, hints[k], cfg.source, f"train.{k}") for k, v in values.items()}
    train = dataclasses.replace(cfg.train, **coerced)
    check_train(train, cfg.source)
    check_batch(train, cfg.resources.workers, cfg.source)
    return dataclasses.replace(cfg, train=train)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (for YAML dumps, MLflow artifacts and Ray configs)."""
    out = dataclasses.asdict(cfg)
    out.pop("source")
    return out


def train_params(train: TrainConfig) -> dict[str, Any]:
    """The flat TrainConfig as MLflow params (None written as 'null'), recipe resolved: a run
    shows the betas, eps, decay rule and clamp it trained with, not the nulls that chose them."""
    resolved = dataclasses.asdict(resolve_recipe(train))
    return {k: ("null" if v is None else v) for k, v in resolved.items()}
