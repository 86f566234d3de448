"""Re-checks: the best configs of a search, trained again with new seeds, crown the champion.

The best of N noisy trials is biased upwards: on a few hundred validation images one trial's
accuracy moves by points between seeds. With ``search.recheck: {top_k: K, seeds: S}``, the K
configs best on the search metric are trained again with S new seeds each, as Ray Train runs
side by side (at most ``search.max_concurrent_trials`` at a time; Ray queues what does not fit).
The champion is the config best on the *mean* over its new seeds; its model is the seed best on
the search metric. Each run is an MLflow run nested under the search's
(``flyp_ray.kind=recheck``, tagged with the config's trial id and the seed).

Runs are named after the trial and the seed, so a re-check interrupted with its search resumes
with ``--resume``: finished seeds are read back, unfinished ones continue from their checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flyp_ray.config import Config, best_first, objectives, with_train
from flyp_ray.distributed import draws, side_by_side, trainer
from flyp_ray.errors import first_line
from flyp_ray.tracking import runs

if TYPE_CHECKING:
    from flyp_ray.data.digest import DataDigest

log = logging.getLogger(__name__)

KIND = "recheck"  # flyp_ray.kind of a re-check run
SEED_TAG = "flyp_ray.seed"
FOLDER = "recheck"  # the re-checks' Ray Train runs, inside the search's folder

Record = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Seeded:
    """One re-check run: a config of the search, with a new seed."""

    trial_id: str
    params: dict[str, Any]
    seed: int

    @property
    def name(self) -> str:
        return f"recheck-{self.trial_id}-seed{self.seed}"


def top_records(cfg: Config, records: Sequence[Record], k: int) -> list[Record]:
    """The ``k`` trials best on the search metric (those that reported it), best first."""
    metric, mode = trainer.selection(cfg)
    scored = [r for r in records if metric in r["metrics"]]
    return best_first(scored, lambda r: r["metrics"][metric], mode)[:k]


def plan(cfg: Config, records: Sequence[Record]) -> list[Seeded]:
    """The runs of the re-check: each of the top configs with seeds it was not trained with."""
    assert cfg.search.recheck is not None
    runs_: list[Seeded] = []
    for record in top_records(cfg, records, cfg.search.recheck.top_k):
        params = dict(record["params"])
        first = int(params.get("seed", cfg.train.seed))
        runs_ += [Seeded(record["trial_id"], params, first + i)
                  for i in range(1, cfg.search.recheck.seeds + 1)]
    return runs_


def seed_config(cfg: Config, seeded: Seeded, storage: str) -> Config:
    """The config of one re-check run: the trial's values with the new seed."""
    return dataclasses.replace(with_train(cfg, **{**seeded.params, "seed": seeded.seed}),
                               storage=storage)


def seed_tags(seeded: Seeded) -> dict[str, str]:
    return {runs.KIND_TAG: KIND, runs.TRIAL_TAG: seeded.trial_id, SEED_TAG: str(seeded.seed)}


def train_seeded(cfg: Config, seeded: Seeded, parent_run_id: str, storage: str,
                 data: DataDigest | None = None) -> dict[str, Any]:
    """One re-check run (a Ray task): its selected epoch's metrics, or the error that ended it.
    ``data``, the search's data digest, becomes the run's dataset inputs."""
    seed_cfg, tags = seed_config(cfg, seeded, storage), seed_tags(seeded)
    started = time.monotonic()
    try:
        # Only the champion's model is logged (by the search, once the means are known).
        outcome = draws.train(seed_cfg, name=seeded.name, parent_run_id=parent_run_id,
                              tags=tags, log_model=False, data=data)
    except Exception as err:  # noqa: BLE001 - one failed seed must not cost the others
        log.error("re-check %s failed: %s", seeded.name, first_line(err))
        return {"error": first_line(err), "seconds": time.monotonic() - started}
    return {"metrics": outcome.metrics, "mlflow_run_id": outcome.mlflow_run_id,
            "checkpoint": outcome.checkpoint, "seconds": time.monotonic() - started}


def run_all(cfg: Config, planned: Sequence[Seeded], parent_run_id: str,
            storage: str, data: DataDigest | None = None) -> list[dict[str, Any]]:
    """Every planned run, at most ``max_concurrent_trials`` at a time; results in plan order."""
    done = finished_before(cfg, planned, parent_run_id, storage)
    jobs = [(cfg, seeded, parent_run_id, storage, data) for seeded in planned]
    return side_by_side.run_all(
        train_seeded, jobs, cfg.search.max_concurrent_trials, done=done,
        ended=lambda index, result: log.info("%s", ended(cfg, planned[index], result)))


def ended(cfg: Config, seeded: Seeded, result: Mapping[str, Any]) -> str:
    """The line a finished re-check run prints: its selected epoch's objectives, or why not."""
    if "metrics" not in result:
        return f"re-check {seeded.name} failed: {result.get('error', 'no result')}"
    metrics = result["metrics"]
    values = ", ".join(f"{m} {metrics[m]:.3f}" for m in objectives(cfg.search)[0] if m in metrics)
    return f"re-check {seeded.name} done: {values} (epoch {int(metrics.get('epoch', 0))})"


def finished_before(cfg: Config, planned: Sequence[Seeded], parent_run_id: str,
                    storage: str) -> dict[int, dict[str, Any]]:
    """The planned runs that finished before (a resumed re-check), read from storage and MLflow
    in this process: they need no task, and are not trained again."""
    done = {}
    for index, seeded in enumerate(planned):
        outcome = trainer.finished(seed_config(cfg, seeded, storage), seeded.name,
                                   parent_run_id, seed_tags(seeded))
        if outcome is not None:
            seconds = (runs.duration_s(cfg.tracking.uri, outcome.mlflow_run_id)
                       if outcome.mlflow_run_id else 0.0)
            done[index] = {"metrics": outcome.metrics, "mlflow_run_id": outcome.mlflow_run_id,
                           "checkpoint": outcome.checkpoint, "seconds": seconds}
    return done


def summarise(cfg: Config, planned: Sequence[Seeded],
              results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per config: its seeds, the mean and standard deviation of every metric over the seeds
    that finished, and each seed's run. Configs in the order of the plan (best trial first)."""
    by_trial: dict[str, list[tuple[Seeded, Mapping[str, Any]]]] = {}
    for seeded, result in zip(planned, results, strict=True):
        by_trial.setdefault(seeded.trial_id, []).append((seeded, result))
    out = []
    for trial_id, pairs in by_trial.items():
        finished = [r["metrics"] for _, r in pairs if "metrics" in r]
        mean, std = draws.mean_std(finished)
        out.append({
            "trial_id": trial_id,
            "config": pairs[0][0].params,
            "seeds": [s.seed for s, _ in pairs],
            "mean": mean,
            "std": std,
            "runs": [_run_entry(cfg, s, r) for s, r in pairs],
        })
    return out


def _run_entry(cfg: Config, seeded: Seeded, result: Mapping[str, Any]) -> dict[str, Any]:
    """A seed's run in the summary: where it is, and its values of the search's objectives."""
    entry: dict[str, Any] = {"seed": seeded.seed, **{k: v for k, v in result.items()
                                                      if k != "metrics"}}
    if "metrics" in result:
        entry["metrics"] = {m: result["metrics"][m] for m in objectives(cfg.search)[0]
                            if m in result["metrics"]}
    return entry


def champion(cfg: Config, rechecked: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The re-checked config best on the mean of the search metric."""
    metric, mode = trainer.selection(cfg)
    scored = [r for r in rechecked if metric in r["mean"]]
    return best_first(scored, lambda r: r["mean"][metric], mode)[0] if scored else None


def best_seed(cfg: Config, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The champion config's run best on the search metric: the model that is registered."""
    metric, mode = trainer.selection(cfg)
    finished = [r for r in config["runs"] if metric in r.get("metrics", {})]
    return best_first(finished, lambda r: r["metrics"][metric], mode)[0]


def recheck(cfg: Config, records: Sequence[Record], parent_run_id: str,
            search_path: str, data: DataDigest | None = None) -> list[dict[str, Any]]:
    """Run the re-check of a search's ``records``; its per-config summary, best trial first."""
    planned = plan(cfg, records)
    log.info("re-check: %d config(s) x %d seed(s)", len(planned) // max(1, _seeds(cfg)),
             _seeds(cfg))
    results = run_all(cfg, planned, parent_run_id, f"{search_path}/{FOLDER}", data)
    return summarise(cfg, planned, results)


def _seeds(cfg: Config) -> int:
    return cfg.search.recheck.seeds if cfg.search.recheck is not None else 0
