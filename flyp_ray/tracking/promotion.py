"""Champion and challenger: a search's model becomes ``champion`` only when it is better.

A search registers its model as a new version with the alias ``challenger``
(:mod:`flyp_ray.tracking.registry`). :func:`promote` then decides, one decision per registered
model at a time (:mod:`flyp_ray.tracking.lock`), against whatever is champion at that moment:

- the first version of a name becomes champion (``first``);
- otherwise both models are measured on the *same* evaluation: each registered model evaluated
  on the current data's splits by :func:`registry.evaluate_model` (the champion's own numbers
  were measured on older data); with a re-check the challenger's values are its means over the
  seeds, its model's evaluation filling in what the seeds did not report;
- the challenger is ``promoted`` when its search metric beats the champion's by more than
  ``tracking.promotion.min_delta`` and no metric of ``tracking.promotion.guard`` is worse than
  the champion's by more than its allowance; else it is ``kept`` (champion unchanged).

Promoted: ``champion`` moves to it and the old champion gets ``previous``. Kept: it keeps
``challenger`` (the newest version not promoted). ``tracking.promotion.policy`` (``--promote``)
``always`` promotes without comparing, ``never`` keeps without comparing. The decision is written
on the challenger's version as ``promotion.*`` tags and in one log line, and returned for
summary.json.

A search metric that a model's evaluation does not report (``train/lr``, a WiSE-FT mix) is
compared on the values recorded at registration (``recheck.mean.<metric>`` or
``metric_value``), and the reason says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
from collections.abc import Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException
from mlflow.tracking import MlflowClient

from flyp_ray.config import SPLITS, Config, did_you_mean, objectives
from flyp_ray.data.base import SplitFacts
from flyp_ray.errors import ConfigError
from flyp_ray.finetune import reports
from flyp_ray.tracking import lock, registry, runs

log = logging.getLogger(__name__)

CHAMPION = registry.CHAMPION
CHALLENGER = registry.CHALLENGER
PREVIOUS = "previous"  # the champion a promotion replaced: one alias move away from a rollback
TAG = "promotion."  # the decision's tags on the challenger's version
FIRST, PROMOTED, KEPT = "first", "promoted", "kept"
EVAL_SPLITS = tuple(s for s in SPLITS if s != "train")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What :func:`promote` decided, and on what."""

    decision: str  # first | promoted | kept
    challenger_version: str
    champion_version: str | None  # the champion it was compared with (None: there was none)
    metric: str  # the search metric
    champion_values: dict[str, float]  # compared metrics: the champion's, this evaluation
    challenger_values: dict[str, float]
    why: str
    policy: str

    def summary(self) -> dict[str, object]:
        """summary.json's ``promotion``."""
        return {"decision": self.decision, "champion_version": self.champion_version,
                "challenger_version": self.challenger_version, "metric": self.metric,
                "champion_value": self.champion_values.get(self.metric),
                "challenger_value": self.challenger_values.get(self.metric),
                "why": self.why}

    def tags(self, cfg: Config) -> dict[str, str]:
        """The ``promotion.*`` tags of the challenger's version."""
        p = cfg.tracking.promotion
        tags = {f"{TAG}decision": self.decision, f"{TAG}policy": self.policy,
                f"{TAG}compared_with": self.champion_version or "",
                f"{TAG}metric": self.metric, f"{TAG}why": self.why[:5000],
                f"{TAG}min_delta": str(p.min_delta),
                f"{TAG}guard": json.dumps(p.guard, sort_keys=True),
                f"{TAG}decided_at": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds")}
        for side, values in (("champion", self.champion_values),
                             ("challenger", self.challenger_values)):
            tags.update({f"{TAG}{side}.{m}": str(v) for m, v in values.items()})
        return tags


# --- the rule --------------------------------------------------------------------------------


def greater_is_better(cfg: Config, metric: str) -> bool:
    """A search metric goes the search's way; any other metric is better higher, but a loss."""
    metrics, modes = objectives(cfg.search)
    if metric in metrics:
        return modes[metrics.index(metric)] == "max"
    return not metric.rpartition("/")[2].endswith("loss")


def compared_metrics(cfg: Config) -> list[str]:
    """The search metric (the first objective), then the guarded metrics."""
    return [objectives(cfg.search)[0][0], *cfg.tracking.promotion.guard]


def thresholds(cfg: Config, champion: Mapping[str, float]) -> dict[str, MetricThreshold]:
    """MLflow's thresholds for a challenger against ``champion``'s values.

    ``MetricThreshold``'s own comparison with a baseline (``min_absolute_change``) takes only a
    positive margin that the candidate must reach or pass: it cannot say "better by more than
    0" (the default ``min_delta``) or "worse by at most 0.01" (a guard). Both are value
    thresholds computed from the champion's values instead: the search metric's bar is the
    float just past ``champion + min_delta`` (so that a tie is not a win), a guard's floor is
    ``champion - allowance`` (which the challenger may reach).
    """
    p = cfg.tracking.promotion
    metric = compared_metrics(cfg)[0]
    out = {}
    if metric in champion:
        up = greater_is_better(cfg, metric)
        bar = float(champion[metric]) + (p.min_delta if up else -p.min_delta)
        out[metric] = MetricThreshold(threshold=math.nextafter(bar, math.inf if up else -math.inf),
                                      greater_is_better=up)
    for name, allowed in p.guard.items():
        if name in champion:
            up = greater_is_better(cfg, name)
            floor = float(champion[name]) + (-allowed if up else allowed)
            out[name] = MetricThreshold(threshold=floor, greater_is_better=up)
    return out


def compare(cfg: Config, champion: Mapping[str, float],
            challenger: Mapping[str, float]) -> tuple[bool, str]:
    """(promote?, why), judged by ``mlflow.validate_evaluation_results``.

    A metric the champion lacks is not compared (a guard on a split the old model never saw);
    one the challenger lacks fails (MLflow: missing from the candidate's result).
    """
    metric = compared_metrics(cfg)[0]
    if metric not in champion:
        return False, f"the champion has no {metric} on this evaluation: nothing to beat it on"
    checks = thresholds(cfg, champion)
    try:
        mlflow.validate_evaluation_results(checks, EvaluationResult(dict(challenger), {}, ""))
    except ModelValidationFailedException as err:
        failed = [m for m in checks if f"Metric {m} " in err.message
                  or f"metric {m} was missing" in err.message]
        return False, _why(cfg, champion, challenger, failed or list(checks))
    return True, _why(cfg, champion, challenger, list(checks))


def _why(cfg: Config, champion: Mapping[str, float], challenger: Mapping[str, float],
         checked: list[str]) -> str:
    """Each check in words: the failed ones when it is kept, all of them when promoted."""
    p = cfg.tracking.promotion
    parts = []
    for m in checked:
        if m not in challenger:
            parts.append(f"{m} missing from the challenger's evaluation")
            continue
        ours, theirs = challenger[m], champion[m]
        if m == compared_metrics(cfg)[0]:
            verb = "beats" if _beats(cfg, m, ours, theirs) else "does not beat"
            parts.append(f"{m} {ours:.6g} {verb} the champion's {theirs:.6g} by more than "
                         f"min_delta {p.min_delta:g}")
        else:
            worse = theirs - ours if greater_is_better(cfg, m) else ours - theirs
            within = "within" if worse <= p.guard[m] else "more than"
            parts.append(f"{m} {ours:.6g} against the champion's {theirs:.6g}: worse by "
                         f"{max(worse, 0.0):.6g}, {within} its allowance {p.guard[m]:g}")
    return "; ".join(parts)


def _beats(cfg: Config, metric: str, ours: float, theirs: float) -> bool:
    delta = cfg.tracking.promotion.min_delta
    return ours > theirs + delta if greater_is_better(cfg, metric) else ours < theirs - delta


def check_guard(cfg: Config, splits: Mapping[str, SplitFacts]) -> None:
    """Each guarded metric is one that a model's evaluation on this data set reports."""
    names = reports.evaluation(splits, None)
    for metric in cfg.tracking.promotion.guard:
        if reports.pattern(metric) not in names:
            near = did_you_mean(metric, sorted(names))
            raise ConfigError(cfg.source, f"tracking.promotion.guard.{metric}",
                              f"{metric!r} is not a metric of a model's evaluation on "
                              f"{cfg.dataset.name}{near} (it reports "
                              f"{', '.join(sorted(n for n in names if n.endswith('/acc')))}, ...)")


# --- measuring -------------------------------------------------------------------------------


def measure(cfg: Config, name: str, version: str,
            known: Mapping[str, float] | None = None) -> dict[str, float]:
    """The compared metrics of registered ``version``: ``known`` values first (a re-check's
    means), then its evaluation on the current data, then what its tags recorded."""
    wanted = compared_metrics(cfg)
    values = {m: float(known[m]) for m in wanted if known and m in known}
    if any(m not in values for m in wanted):
        evaluated = registry.evaluate_model(cfg, f"models:/{name}/{version}")
        values.update({m: evaluated[m] for m in wanted if m in evaluated and m not in values})
    if any(m not in values for m in wanted):
        tags = runs.client(cfg.tracking.uri).get_model_version(name, version).tags
        values.update({m: v for m, v in recorded(tags).items() if m in wanted and m not in values})
    return values


def recorded(tags: Mapping[str, str]) -> dict[str, float]:
    """The metric values a version's registration recorded: a re-check's means, or the
    search's value of its metric."""
    out = {k.removeprefix("recheck.mean."): float(v) for k, v in tags.items()
           if k.startswith("recheck.mean.")}
    if "metric" in tags and "metric_value" in tags:
        out.setdefault(tags["metric"], float(tags["metric_value"]))
    return out


# --- deciding --------------------------------------------------------------------------------


def decide(cfg: Config, version: str,
           challenger_values: Mapping[str, float] | None = None) -> dict[str, object]:
    """:func:`promote`, for a search that is done: summary.json's ``promotion``, never raising.

    A decision that could not be made (the registry unreachable, the lock's wait given up)
    leaves the champion where it was: ``kept``, and ``why`` says what stopped it. The version
    stays registered as a challenger; ``--promote always`` or a later search can decide.
    """
    try:
        return promote(cfg, version, challenger_values).summary()
    except Exception as err:  # noqa: BLE001 - the search is done: its summary is written anyway
        why = f"no decision: {type(err).__name__}: {_first_line(err)}"
        log.error("promotion of %s version %s: %s", cfg.tracking.registered_model, version, why)
        return {"decision": KEPT, "champion_version": None, "challenger_version": version,
                "metric": compared_metrics(cfg)[0], "champion_value": None,
                "challenger_value": None, "why": why}


def promote(cfg: Config, version: str,
            challenger_values: Mapping[str, float] | None = None) -> Decision:
    """Decide whether ``version`` of ``tracking.registered_model`` becomes its champion.

    ``challenger_values``: the re-check's means over seeds, which stand for the challenger where
    they have a compared metric. Under the model's lock: reads the champion, compares, moves
    the aliases, tags the version. Raises on a failure of MLflow or of the lock; nothing has
    moved then.
    """
    name = cfg.tracking.registered_model
    if not name:
        raise ValueError("promote() needs tracking.registered_model")
    client = runs.client(cfg.tracking.uri)
    policy = cfg.tracking.promotion.policy
    metric = compared_metrics(cfg)[0]
    challenger: dict[str, float] = {}
    if policy == "if-better":  # outside the lock: this version's numbers do not change
        challenger = _measured_or_empty(cfg, name, version, challenger_values)
    purpose = f"version {version} of {name}, from {cfg.source}"
    with lock.hold(client, name, purpose) as ticket:
        current = _alias_version(client, name, CHAMPION)
        if policy == "never":  # not even a first champion: the alias is someone else's to set
            decision = Decision(KEPT, version, current, metric, {}, {},
                                "--promote never (tracking.promotion.policy): not compared",
                                policy)
        elif current is None:
            decision = Decision(FIRST, version, None, metric, {}, challenger,
                                f"the first version of {name}: no champion to beat", policy)
        else:
            decision = _decide(cfg, name, version, current, challenger, policy)
        ticket.check()  # a stalled holder whose lease ran out must not move anything
        _move_aliases(client, name, decision)
        _set_tags(client, name, version, decision.tags(cfg))
    log.info("promotion of %s version %s: %s (%s)", name, version, decision.decision,
             decision.why)
    return decision


def _decide(cfg: Config, name: str, version: str, current: str, challenger: dict[str, float],
            policy: str) -> Decision:
    metric = compared_metrics(cfg)[0]
    if policy == "always":
        return Decision(PROMOTED, version, current, metric, {}, challenger,
                        "--promote always (tracking.promotion.policy): not compared", policy)
    if not challenger:
        return Decision(KEPT, version, current, metric, {}, {},
                        "the challenger could not be evaluated (see the log)", policy)
    try:
        champion = measure(cfg, name, current)
    except Exception as err:  # noqa: BLE001 - an unreadable champion keeps it, said why
        return Decision(KEPT, version, current, metric, {}, challenger,
                        f"the champion (version {current}) could not be evaluated on the current "
                        f"data: {_first_line(err)}; `--promote always` replaces it", policy)
    better, why = compare(cfg, champion, challenger)
    if not _evaluated(metric):
        why += f" ({metric} is not reported by a model's evaluation: the values recorded at " \
               f"registration were compared)"
    return Decision(PROMOTED if better else KEPT, version, current, metric, champion, challenger,
                    why, policy)


def _measured_or_empty(cfg: Config, name: str, version: str,
                       known: Mapping[str, float] | None) -> dict[str, float]:
    try:
        return measure(cfg, name, version, known)
    except Exception as err:  # noqa: BLE001 - the search's model stays registered, kept
        log.error("could not evaluate version %s of %s: %s", version, name, _first_line(err))
        return {}


def _evaluated(metric: str) -> bool:
    """Whether a model's evaluation reports ``metric`` (a metric of an evaluation split)."""
    return metric.partition("/")[0] in EVAL_SPLITS


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:  # no such alias (yet)
        return None


def _move_aliases(client: MlflowClient, name: str, decision: Decision) -> None:
    version = decision.challenger_version
    if decision.decision == KEPT:
        newest = _alias_version(client, name, CHALLENGER)
        if newest is None or int(newest) < int(version):
            client.set_registered_model_alias(name, CHALLENGER, version)
        return
    old = decision.champion_version
    client.set_registered_model_alias(name, CHAMPION, version)
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
        client.set_model_version_tag(name, old, f"{TAG}replaced_by", version)
    if _alias_version(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)


def _set_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _first_line(err: BaseException) -> str:
    lines = str(getattr(err, "message", err)).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__
