"""The promotion decision on real registered models: real MLflow (sqlite), the tiny open_clip
model, the real evaluation code on a csv data set. No Ray: nothing here trains.

Two models are logged once: ``good``, whose head is the image features of six pictures (each
picture its own class), and ``plain``, a randomly initialised FLYP checkpoint. The data set's
labels are made from what ``flyp-ray eval``'s code predicts: on ``id_val`` the labels are
``good``'s predictions (``good`` scores 1.0 there), on ``ood_test`` ``plain``'s (``plain``
scores 1.0 there). So ``good`` beats ``plain`` in distribution and loses out of it, by margins
the test reads back from the same evaluation. Each test registers versions of these two under a
name of its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from flyp_ray import cli, config
from flyp_ray.data import synthetic
from flyp_ray.tracking import promotion, registry, runs
from tests.support.configs import tiny_config, write_config
from tests.support.models import eval_probabilities, write_checkpoint, write_prototype_checkpoint

N_IMAGES = len(synthetic.CLASSNAMES)


@dataclasses.dataclass(frozen=True)
class Models:
    cfg: config.Config  # registered_model unset: each test names its own
    uris: dict[str, str]  # good | plain -> runs:/<run>/model
    scores: dict[str, dict[str, float]]  # the evaluation code's metrics of each


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    tmp = tmp_path_factory.mktemp("promotion")
    root = tmp / "images"
    root.mkdir()
    pictures = [synthetic.image("id_val", i, size=48) for i in range(N_IMAGES)]
    files = []
    for i, picture in enumerate(pictures):
        files.append(root / f"image{i}.png")
        picture.save(files[-1])
    (tmp / "classnames.txt").write_text("\n".join(synthetic.CLASSNAMES) + "\n")
    write_labels(root, files, [0] * N_IMAGES, [0] * N_IMAGES)
    raw = tiny_config(tmp, dataset={"name": "csv", "root": str(root),
                                    "classnames": str(tmp / "classnames.txt")})
    raw["dataset"].pop("subsample")
    cfg = config.load(write_config(tmp / "images.yaml", raw))
    checkpoints = {"good": write_prototype_checkpoint(cfg, tmp / "good", pictures),
                   "plain": write_checkpoint(cfg, tmp / "plain")}
    uris = {}
    for which, ckpt in checkpoints.items():
        run_id = runs.start_run(cfg, which, {runs.KIND_TAG: "train"})
        uris[which] = registry.log_model(cfg, run_id, ckpt) or ""
        assert uris[which], which
    predicted = {w: eval_probabilities(cfg, u).argmax(axis=1).tolist() for w, u in uris.items()}
    assert predicted["good"] != predicted["plain"]  # else no model is better than the other
    write_labels(root, files, predicted["good"], predicted["plain"])
    scores = {w: registry.evaluate_model(cfg, u) for w, u in uris.items()}
    assert scores["good"]["id_val/acc"] == 1.0 > scores["plain"]["id_val/acc"]
    assert scores["plain"]["ood_test/acc"] == 1.0 > scores["good"]["ood_test/acc"]
    return Models(cfg, uris, scores)


def write_labels(root: Path, files: list[Path], id_labels: list[int],
                 ood_labels: list[int]) -> None:
    rows = [f"{f.name},{label},id_val" for f, label in zip(files, id_labels, strict=True)]
    rows += [f"{f.name},{label},ood_test" for f, label in zip(files, ood_labels, strict=True)]
    (root / "metadata.csv").write_text("filepath,label,split\n" + "\n".join(rows) + "\n")


def named(models: Models, name: str, **promotion_settings: Any) -> config.Config:
    """The models' config with its own registered model and promotion settings."""
    tracking = dataclasses.replace(
        models.cfg.tracking, registered_model=name,
        promotion=config.PromotionConfig(**promotion_settings))
    return dataclasses.replace(models.cfg, tracking=tracking)


def register(cfg: config.Config, models: Models, which: str) -> str:
    """A new version of ``which`` under the config's name; its version number."""
    _, version = registry.register(cfg, models.uris[which], {})
    return version


def aliases(cfg: config.Config) -> dict[str, str]:
    name = str(cfg.tracking.registered_model)
    found = MlflowClient(cfg.tracking.uri).get_registered_model(name).aliases
    return {alias: str(version) for alias, version in found.items()}


def version_tags(cfg: config.Config, version: str) -> dict[str, str]:
    name = str(cfg.tracking.registered_model)
    return dict(MlflowClient(cfg.tracking.uri).get_model_version(name, version).tags)


def test_first_version_is_champion_and_a_worse_challenger_is_kept(models: Models) -> None:
    cfg = named(models, "first-then-worse")
    good = register(cfg, models, "good")
    first = promotion.promote(cfg, good)
    assert first.decision == "first" and first.champion_version is None
    assert aliases(cfg) == {"champion": good}

    plain = register(cfg, models, "plain")
    assert aliases(cfg) == {"champion": good, "challenger": plain}
    kept = promotion.promote(cfg, plain)

    assert kept.decision == "kept"
    assert aliases(cfg) == {"champion": good, "challenger": plain}
    tags = version_tags(cfg, plain)
    assert tags["promotion.decision"] == "kept"
    assert tags["promotion.compared_with"] == good
    assert tags["promotion.metric"] == "id_val/acc"
    # Both models measured on this evaluation: the evaluation code's numbers, as recorded.
    assert float(tags["promotion.champion.id_val/acc"]) == models.scores["good"]["id_val/acc"]
    assert float(tags["promotion.challenger.id_val/acc"]) == models.scores["plain"]["id_val/acc"]
    assert "id_val/acc" in tags["promotion.why"]
    assert kept.summary() == {
        "decision": "kept", "champion_version": good, "challenger_version": plain,
        "metric": "id_val/acc", "champion_value": models.scores["good"]["id_val/acc"],
        "challenger_value": models.scores["plain"]["id_val/acc"], "why": kept.why}


def test_a_better_challenger_moves_champion_and_the_old_one_is_previous(models: Models) -> None:
    cfg = named(models, "better")
    plain = register(cfg, models, "plain")
    assert promotion.promote(cfg, plain).decision == "first"
    good = register(cfg, models, "good")

    decision = promotion.promote(cfg, good)

    assert decision.decision == "promoted", decision.why
    assert decision.why.startswith("id_val/acc 1 beats the champion's")
    assert aliases(cfg) == {"champion": good, "previous": plain}  # no challenger left
    assert decision.champion_values["id_val/acc"] == models.scores["plain"]["id_val/acc"]
    assert decision.challenger_values["id_val/acc"] == 1.0
    assert version_tags(cfg, plain)["promotion.replaced_by"] == good
    assert version_tags(cfg, good)["promotion.decision"] == "promoted"


def good_after_plain(cfg: config.Config, models: Models) -> tuple[str, str, promotion.Decision]:
    """``plain`` registered and made champion, then ``good`` registered and decided on: the
    better model in distribution as the challenger of the worse (checked here)."""
    plain = register(cfg, models, "plain")
    promotion.promote(cfg, plain)
    good = register(cfg, models, "good")
    decision = promotion.promote(cfg, good)
    assert decision.challenger_values["id_val/acc"] > decision.champion_values["id_val/acc"]
    return plain, good, decision


def test_a_min_delta_it_cannot_reach_keeps_the_champion(models: Models) -> None:
    # Accuracy cannot rise by more than 1.0: the better model cannot win this.
    cfg = named(models, "unreachable", min_delta=1.0)
    plain, good, decision = good_after_plain(cfg, models)

    assert decision.decision == "kept"
    assert aliases(cfg) == {"champion": plain, "challenger": good}
    assert "id_val/acc 1 does not beat the champion's" in decision.why
    assert "by more than min_delta 1" in decision.why


def test_a_guarded_ood_drop_keeps_the_champion(models: Models) -> None:
    cfg = named(models, "guarded", guard={"ood_test/acc": 0.01})
    plain, good, decision = good_after_plain(cfg, models)

    # Better in distribution (the test above promotes it), but it loses OOD accuracy.
    assert decision.decision == "kept"
    drop = decision.champion_values["ood_test/acc"] - decision.challenger_values["ood_test/acc"]
    assert drop > 0.01
    assert f"worse by {drop:.6g}, more than its allowance 0.01" in decision.why
    assert "id_val/acc" not in decision.why  # only the check that failed
    assert aliases(cfg)["champion"] == plain
    tags = version_tags(cfg, good)
    assert float(tags["promotion.challenger.ood_test/acc"]) == models.scores["good"]["ood_test/acc"]
    assert tags["promotion.guard"] == '{"ood_test/acc": 0.01}'


def test_policy_never_and_always_do_not_compare(models: Models) -> None:
    never = named(models, "policies", policy="never")
    plain = register(never, models, "plain")
    assert promotion.promote(never, plain).decision == "kept"  # not even the first
    assert aliases(never) == {"challenger": plain}
    good = register(never, models, "good")
    always = named(models, "policies", policy="always")
    assert promotion.promote(always, good).decision == "first"
    worse = register(always, models, "plain")

    decision = promotion.promote(always, worse)

    assert decision.decision == "promoted" and decision.champion_values == {}
    assert aliases(always) == {"champion": worse, "previous": good}
    assert "--promote always" in decision.why


def test_a_rechecks_mean_stands_for_the_challenger(models: Models) -> None:
    cfg = named(models, "recheck")
    plain = register(cfg, models, "plain")
    promotion.promote(cfg, plain)
    good = register(cfg, models, "good")

    # Its own model scores 1.0; the mean over its seeds says 0.0: the mean decides.
    decision = promotion.promote(cfg, good, {"id_val/acc": 0.0, "id_val/loss": 9.0})

    assert decision.decision == "kept"
    assert decision.challenger_values == {"id_val/acc": 0.0}
    assert version_tags(cfg, good)["promotion.challenger.id_val/acc"] == "0.0"


def test_a_metric_no_evaluation_reports_is_compared_as_recorded(models: Models) -> None:
    base = named(models, "recorded")
    cfg = dataclasses.replace(base, search=dataclasses.replace(
        base.search, metric="train/lr", mode="max"))
    _, first = registry.register(cfg, models.uris["plain"], {"train/lr": 0.01})
    promotion.promote(cfg, first)
    _, second = registry.register(cfg, models.uris["good"], {"train/lr": 0.001})

    decision = promotion.promote(cfg, second)

    assert decision.decision == "kept"
    assert (decision.champion_values, decision.challenger_values) == (
        {"train/lr": 0.01}, {"train/lr": 0.001})
    assert "recorded at registration" in decision.why


def test_a_decision_that_cannot_be_made_keeps_the_champion(
        models: Models, caplog: pytest.LogCaptureFixture) -> None:
    cfg = named(models, "undecided", policy="always")  # no evaluation: straight to the lock
    plain = register(cfg, models, "plain")
    promotion.promote(cfg, plain)
    gone = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, uri=f"sqlite:///{Path(cfg.storage) / 'no-such-folder' / 'mlflow.db'}"))

    summary = promotion.decide(gone, "2")

    assert summary["decision"] == "kept" and str(summary["why"]).startswith("no decision:")
    assert aliases(cfg) == {"champion": plain}
    mlflow.set_tracking_uri(cfg.tracking.uri)


@pytest.mark.parametrize("command", ["tune", "tune-all", "compare"])
def test_promote_on_the_command_line_is_the_policy_of_that_run(tmp_path: Path,
                                                               command: str) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    assert config.load(path).tracking.promotion.policy == "if-better"
    args = cli.parser().parse_args([command, str(path), "--promote", "never"])
    assert config.load(path, cli.overrides(args)).tracking.promotion.policy == "never"
