"""The names of the metrics a run reports, known before it runs.

A search metric, the metric that selects a run's best epoch and ``train.eval_splits`` are names
that must match what the loop reports; a misspelt one would otherwise surface as Tune's error
after the first trial has trained. This module derives the names from the same facts the loop
acts on (method, splits, WiSE-FT, repeats); ``tests/finetune/test_methods.py`` holds it to the
reports of real runs.

A search metric must be in *every* report (Tune checks each result of a trial for it); other
names, such as WiSE-FT's per-alpha sweep, arrive with the last epoch only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from flyp_ray.config import TrainConfig
from flyp_ray.data.base import SplitFacts
from flyp_ray.finetune import wiseft

# {split}/official/<name>: WILDS' own metrics, whose names WILDS decides; they stand in the
# name sets as this pattern.
OFFICIAL = "/official/*"


@dataclasses.dataclass(frozen=True)
class Reported:
    """Metric names of a run's reports."""

    every: frozenset[str]  # in every report: what a search or selection metric may name
    some: frozenset[str]  # in at least one report (the last epoch's has them all)

    def in_every(self, name: str) -> bool:
        return pattern(name) in self.every

    def in_some(self, name: str) -> bool:
        return pattern(name) in self.some


def pattern(name: str) -> str:
    """``id_val/official/acc_avg`` -> ``id_val/official/*``: how the sets hold WILDS' names."""
    head, sep, tail = name.partition(OFFICIAL[:-1])
    if not sep or not tail:
        return name
    return f"{head}{OFFICIAL}" + ("_std" if tail.endswith("_std") else "")


def split_names(name: str, facts: SplitFacts) -> set[str]:
    """``{split}/acc``, ``macro_f1``, ``loss`` and, with groups, ``worst_group_acc``."""
    names = {"acc", "macro_f1", "loss"} | ({"worst_group_acc"} if facts.grouped else set())
    official = {f"{name}{OFFICIAL}"} if facts.official else set()
    return {f"{name}/{n}" for n in names} | official


def evaluation(splits: Mapping[str, SplitFacts], wanted: Iterable[str] | None) -> set[str]:
    """What evaluating ``wanted`` (None: every split but train) reports, OOD averages included."""
    chosen = [s for s in splits if s != "train" and (wanted is None or s in set(wanted))]
    names: set[str] = set()
    for split in chosen:
        names |= split_names(split, splits[split])
    ood_sets = [s for s in chosen if s.startswith("ood_test/")]
    if ood_sets:  # ood_test/<name>: the average over the sets of what they all report
        shared = set.intersection(*({n.removeprefix(f"{s}/") for n in split_names(s, splits[s])}
                                    for s in ood_sets))
        names |= {f"ood_test/{n}" for n in shared}
    return names


def _wiseft_final(train: TrainConfig, evaluated: set[str]) -> set[str]:
    assert train.wiseft_alphas is not None
    names = {f"wiseft/{wiseft.name(a)}/{n}" for a in train.wiseft_alphas for n in evaluated}
    if wiseft.SELECT in evaluated:  # the best alpha is chosen on id_val/acc
        names |= {f"wiseft/best/{n}" for n in evaluated} | {"wiseft/best/alpha"}
    return names


def epoch_reports(train: TrainConfig, splits: Mapping[str, SplitFacts]) -> list[set[str]]:
    """The names of each report of one training (one draw), first epoch first."""
    final = evaluation(splits, None)
    if train.wiseft_alphas and train.method != "zeroshot":
        final |= _wiseft_final(train, evaluation(splits, None))
    if train.method == "zeroshot":
        return [{"epoch"} | evaluation(splits, None)]
    if train.method == "lp":
        return [{"epoch", "lp/l2"} | final]
    trained = {"epoch", "train/loss", "train/lr"} | ({"train/temperature"}
                                                    if train.method == "flyp" else set())
    interim = evaluation(splits, train.eval_splits)
    if train.wiseft_alphas:
        interim |= {f"wiseft/best/{n}" for n in interim} | {"wiseft/best/alpha"}
    reports = [trained | (final if epoch == train.epochs else interim)
               for epoch in range(1, train.epochs + 1)]
    if train.method == "lpft":
        reports[0] = reports[0] | {"lp/l2"}
    return reports


def reported(train: TrainConfig, splits: Mapping[str, SplitFacts]) -> Reported:
    """The metric names a run of ``train`` on a data set with ``splits`` reports to Ray."""
    reports = epoch_reports(train, splits)
    if train.repeats > 1:  # each epoch's mean over the draws, and their std
        reports = [r | {f"{n}_std" for n in r if n != "epoch"} | {"repeats"} for r in reports]
    return Reported(every=frozenset(set.intersection(*reports)),
                    some=frozenset(set.union(*reports)))
