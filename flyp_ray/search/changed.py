"""``tune-all --changed``: search only the data sets whose data or training config moved since
their champion was made.

A data set is searched when its registered model has no champion yet, when the champion's
``data_digest`` differs from the data's digest now, or when its ``config_digest`` differs from
the config's (:mod:`flyp_ray.tracking.lineage` says which settings count), or when either side
cannot be told. The others are reported as unchanged with their champion's version and start
nothing: no Ray, no trial, no share of a ``--budget``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from flyp_ray.config import Config
from flyp_ray.tracking import lineage

log = logging.getLogger(__name__)


def select(cfgs: Sequence[Config]) -> list[dict[str, Any]]:
    """Per config: ``{"changed": why}`` when it is to be searched, else its summary as an
    unchanged data set (``unchanged: true``, the champion's version and digests)."""
    selected: list[dict[str, Any]] = []
    for cfg in cfgs:
        since = lineage.since_champion(cfg)
        reason = since.reason()
        if reason is not None:
            log.info("%s: searching: %s", cfg.source, reason)
            selected.append({"changed": reason})
            continue
        assert since.champion is not None and since.name is not None  # reason() says so
        log.info("%s: unchanged since %s version %s (data %s, config %s): not searched",
                 cfg.source, since.name, since.champion.version, since.data_digest,
                 since.config_digest)
        unchanged: dict[str, Any] = {
            "config": cfg.source, "dataset": cfg.dataset.name, "unchanged": True,
            "best_trial_id": None,
            "registered_model": {"name": since.name, "version": str(since.champion.version)},
            "data_digest": since.data_digest, "config_digest": since.config_digest}
        selected.append(unchanged)
    return selected


def to_search(cfgs: Sequence[Config], selected: Sequence[dict[str, Any]]) -> list[Config]:
    """The configs :func:`select` did not find unchanged, in order."""
    return [cfg for cfg, s in zip(cfgs, selected, strict=True) if not s.get("unchanged")]


def merge(selected: Sequence[dict[str, Any]],
          searched: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per config, in order: the unchanged as selected, the searched as their
    searches ended (with why they were searched)."""
    ran = iter(searched)
    return [s if s.get("unchanged") else {**next(ran), **s} for s in selected]
