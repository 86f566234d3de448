"""The search space: ``search.space`` as Optuna distributions, an Optuna sampler, OptunaSearch.

Every dimension names a TrainConfig field, so a sampled point goes straight into
:func:`flyp_ray.config.with_train`. Ranges and choices are checked against TrainConfig's own rules
here, before Ray starts, so that a trial never fails on a value the space itself allowed.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from ray.tune.search.optuna import OptunaSearch

from flyp_ray.config import Config, ParamSpec, SearchConfig, objectives, with_train
from flyp_ray.errors import ConfigError

log = logging.getLogger(__name__)

Point = dict[str, Any]
MAX_CORNERS = 4096  # a larger space has its ends checked one dimension at a time only


def distribution(name: str, spec: ParamSpec, source: str) -> BaseDistribution:
    """One ``search.space`` entry as an Optuna distribution; a bad combination is a ConfigError."""
    key = f"search.space.{name}"
    if spec.type == "categorical":
        return _categorical(spec, source, key)
    if spec.low is None or spec.high is None:
        raise ConfigError(source, key,
                          f"needs low and high, got low={spec.low!r} high={spec.high!r}")
    if spec.log and spec.step is not None:
        raise ConfigError(source, f"{key}.step",
                          f"cannot be combined with log: true, got {spec.step!r}")
    try:
        if spec.type == "int":
            step = 1 if spec.step is None else _whole(spec.step, source, f"{key}.step")
            return IntDistribution(_whole(spec.low, source, f"{key}.low"),
                                   _whole(spec.high, source, f"{key}.high"), log=spec.log,
                                   step=step)
        return FloatDistribution(float(spec.low), float(spec.high), log=spec.log, step=spec.step)
    except ValueError as err:  # Optuna's own range checks, e.g. low > high or step <= 0
        raise ConfigError(source, key, f"{err} (got {_spec_text(spec)})") from None


def _categorical(spec: ParamSpec, source: str, key: str) -> CategoricalDistribution:
    if not spec.choices:
        raise ConfigError(source, f"{key}.choices", f"needs a non-empty list, got {spec.choices!r}")
    for i, choice in enumerate(spec.choices):
        # Optuna stores choices as they are: only plain scalars survive its storage and pickling.
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise ConfigError(source, f"{key}.choices[{i}]",
                              f"must be a number, string, true/false or null, got {choice!r}")
    return CategoricalDistribution(list(spec.choices))


def _whole(value: float, source: str, key: str) -> int:
    if not float(value).is_integer():
        raise ConfigError(source, key, f"must be a whole number, got {value!r}")
    return int(value)


def _spec_text(spec: ParamSpec) -> str:
    parts = [f"low={spec.low!r}", f"high={spec.high!r}"]
    if spec.log:
        parts.append("log=true")
    if spec.step is not None:
        parts.append(f"step={spec.step!r}")
    return " ".join(parts)


def distributions(cfg: Config) -> dict[str, BaseDistribution]:
    """All of ``search.space`` as Optuna distributions, each end and choice checked as a value,
    then every corner of the space as a whole."""
    space = {name: distribution(name, spec, cfg.source) for name, spec in cfg.search.space.items()}
    for name, dist in space.items():
        for label, value in _probes(dist):
            _check_value(cfg, name, label, value)
    _check_corners(cfg, space)
    return space


def _check_corners(cfg: Config, space: Mapping[str, BaseDistribution]) -> None:
    """Ends that pass alone may clash together: a temperature under the clamp that a searched
    ``recipe: clip`` brings, a ``min_lr`` above a low ``lr``. Every combination of ends and
    choices (up to MAX_CORNERS of them) must be a TrainConfig that the range checks accept."""
    probes = {name: [value for _, value in _probes(dist)] for name, dist in space.items()}
    if len(probes) < 2 or math.prod(len(v) for v in probes.values()) > MAX_CORNERS:
        return
    for combo in itertools.product(*probes.values()):
        point = dict(zip(probes, combo, strict=True))
        try:
            with_train(cfg, **point)
        except ConfigError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(cfg.source, "search.space",
                              f"the corner {where} is refused: {err.key}: {err.problem}") from None


def _probes(dist: BaseDistribution) -> list[tuple[str, Any]]:
    """The values that must be valid TrainConfig values for every sample to be valid."""
    if isinstance(dist, CategoricalDistribution):
        return [(f"choices[{i}]", c) for i, c in enumerate(dist.choices)]
    assert isinstance(dist, (FloatDistribution, IntDistribution))  # the three kinds built above
    return [("low", dist.low), ("high", dist.high)]


def _check_value(cfg: Config, name: str, label: str, value: Any) -> None:
    try:
        with_train(cfg, **{name: value})
    except ConfigError as err:
        raise ConfigError(cfg.source, f"search.space.{name}.{label}",
                          f"{err.problem} (as train.{name})") from None


def sampler(search: SearchConfig, source: str) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``search.sampler``, seeded with ``search.seed``."""
    seed = search.seed
    multi = isinstance(search.metric, list) and len(search.metric) > 1
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if multi:
        raise ConfigError(source, "search.sampler", "cmaes optimises one metric; use tpe, nsga2 "
                                                    f"or gp for {len(search.metric)} metrics")
    # Optuna imports cmaes lazily, at the first sample: check here so a search does not start.
    if importlib.util.find_spec("cmaes") is None:
        raise ConfigError(source, "search.sampler", "cmaes needs the 'cmaes' package "
                                                    "(pip install cmaes)")
    return optuna.samplers.CmaEsSampler(seed=seed)


def fitting_points(space: Mapping[str, BaseDistribution], points: Sequence[Mapping[str, Any]],
                   fallback: Mapping[str, Any]) -> list[Point]:
    """The points (restricted to the space's keys) that lie inside the space, without repeats.

    A key the point lacks takes its value from ``fallback`` (the config's fixed train values),
    so that a best config from a search over other keys still warm-starts this one.
    """
    kept: list[Point] = []
    for raw in points:
        point = {name: raw.get(name, fallback.get(name)) for name in space}
        outside = [n for n, dist in space.items() if not _contains(dist, point[n])]
        if outside:
            log.info("warm start: skipping %s (%s outside the space)", point, ", ".join(outside))
        elif point not in kept:
            kept.append(point)
    return kept


def _contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if isinstance(dist, IntDistribution) and not float(value).is_integer():
        return False
    return bool(dist._contains(dist.to_internal_repr(value)))  # noqa: SLF001 - Optuna's own test


def searcher(cfg: Config, study_name: str, points: Sequence[Point] = ()) -> OptunaSearch:
    """Ray Tune's OptunaSearch over the space, with ``points`` enqueued as the first trials.

    ``study_name`` must be unique per search: with a persistent Optuna storage the default name
    would merge the trials of earlier searches into this one.
    """
    space = distributions(cfg)
    if not space:
        raise ConfigError(cfg.source, "search.space", "is empty: name at least one train field "
                                                      "to search (e.g. lr)")
    metrics, modes = objectives(cfg.search)
    single = len(metrics) == 1
    # Optuna logs "A new study created in memory" on stderr at INFO, for every searcher: noise
    # before a search (and before the one-line error of a bad one); Tune and MLflow report the
    # trials. Its warnings still show.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(space=space, metric=metrics[0] if single else metrics,
                        mode=modes[0] if single else modes,
                        points_to_evaluate=list(points) or None,
                        sampler=sampler(cfg.search, cfg.source), study_name=study_name)
