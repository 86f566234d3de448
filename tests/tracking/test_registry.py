"""The classifier as an MLflow model: pyfunc and pytorch loading, registry, ``flyp-ray eval``.

Real MLflow (sqlite in a temporary folder), the tiny open_clip model and a checkpoint written
with :func:`flyp_ray.finetune.checkpoint.save`, as training writes it. No Ray: nothing here trains.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import Model
from PIL import Image

from flyp_ray import cli, config
from flyp_ray.data import synthetic
from flyp_ray.data.load import load_data
from flyp_ray.tracking import registry, runs
from tests.support.configs import tiny_config, write_config
from tests.support.models import write_checkpoint

NAME = "flyp-test"
SPLITS = ("id_val", "id_test", "ood_val", "ood_test")
METRICS = ("acc", "macro_f1", "worst_group_acc", "loss")


@dataclasses.dataclass(frozen=True)
class Logged:
    cfg: config.Config
    config_path: Path
    checkpoint: Path
    runs: list[str]
    versions: list[tuple[str, str] | None]


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """Two runs of one checkpoint, each logged and registered: versions 1 and 2."""
    tmp = tmp_path_factory.mktemp("registry")
    raw = tiny_config(tmp, dataset={"subsample": 32}, tracking={"registered_model": NAME})
    path = write_config(tmp / "synthetic.yaml", raw)
    cfg = config.load(path)
    ckpt = write_checkpoint(cfg, tmp / "checkpoint")
    run_ids = [runs.start_run(cfg, f"run-{i}", {runs.KIND_TAG: "train"}) for i in range(2)]
    versions = [registry.log_and_register(cfg, run, ckpt, {"id_val/acc": 0.25 * (i + 1)})
                for i, run in enumerate(run_ids)]
    return Logged(cfg, path, ckpt, run_ids, versions)


def image_batch(cfg: config.Config, classifier: registry.Classifier, n: int) -> torch.Tensor:
    """``n`` preprocessed ID validation images, as the model's input."""
    data = load_data(cfg.dataset, classifier.preprocess, classifier.preprocess, cfg.source)
    split = data.splits["id_val"].dataset
    return torch.stack([split[i][0] for i in range(n)])


def test_logged_model_predicts_with_pyfunc_and_pytorch(logged: Logged) -> None:
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" not in os.environ  # MLflow's pickle check is on
    uri = f"runs:/{logged.runs[0]}/model"
    expected_model = registry.from_checkpoint(logged.cfg, logged.checkpoint)
    images = image_batch(logged.cfg, expected_model, 5)  # not the batch size of the export
    with torch.no_grad():
        expected = expected_model.module(images).numpy()

    # pyfunc: images in (here PNG bytes of the same pictures), class names out
    pictures = [synthetic_picture(logged.cfg, i) for i in range(5)]
    pyfunc = mlflow.pyfunc.load_model(uri)
    answer = pyfunc.predict(pd.DataFrame({"image": [png(p) for p in pictures]}))
    probs = np.array([[row[c] for c in synthetic.CLASSNAMES] for row in answer["probabilities"]])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert list(answer["label"]) == [synthetic.CLASSNAMES[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(answer["probability"], expected.max(axis=1), atol=1e-5)
    assert pyfunc.metadata.metadata["classnames"] == list(synthetic.CLASSNAMES)
    assert pyfunc.metadata.signature.inputs.input_names() == ["image"]

    # pytorch: the module, preprocessed tensors in, probabilities out
    module = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        np.testing.assert_allclose(module(images).numpy(), expected, atol=1e-5)


def synthetic_picture(cfg: config.Config, index: int) -> Image.Image:
    """The ID validation picture that :func:`image_batch` preprocesses as item ``index``."""
    data = load_data(cfg.dataset, lambda image: image, lambda image: image, cfg.source)
    picture: Image.Image = data.splits["id_val"].dataset[index][0]
    return picture


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def test_logged_model_holds_no_pickle(logged: Logged) -> None:
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{logged.runs[0]}/model"))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    weights = [f for f in files if f.endswith((".pt2", ".pt", ".pth", ".pkl", ".bin"))]
    assert weights == ["artifacts/classifier/data/model.pt2"], files
    flavors = Model.load(str(local)).flavors
    pyfunc = flavors["python_function"]
    # "models from code": the pyfunc is this source file, run at load time, not a pickle
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in pyfunc
    code = local / Path(pyfunc["model_code_path"]).name
    assert code.read_text() == registry.IMAGE_MODEL_CODE.read_text()
    assert flavors["pytorch"]["model_data"] == "artifacts/classifier/data"
    graph = local / "artifacts" / "classifier"
    assert (graph / registry.EXTRA_FILES / registry.OPEN_CLIP_CONFIG).is_file()


def test_classifier_matches_the_checkpoint_weights(logged: Logged) -> None:
    loaded = registry.load_classifier(f"models:/{NAME}/1", logged.cfg)
    fresh = registry.from_checkpoint(logged.cfg, logged.checkpoint)
    for key, value in fresh.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value, msg=key)
    assert float(loaded.module.logit_scale) == pytest.approx(2.5)
    assert loaded.classnames == list(synthetic.CLASSNAMES)


def test_registering_makes_a_challenger_never_a_champion(logged: Logged) -> None:
    # Only the promotion decision moves `champion` (tests/tracking/test_promotion.py).
    assert logged.versions == [(NAME, "1"), (NAME, "2")]
    mlflow_client = MlflowClient(logged.cfg.tracking.uri)
    challenger = mlflow_client.get_model_version_by_alias(NAME, registry.CHALLENGER)
    assert str(challenger.version) == "2"
    assert challenger.run_id == logged.runs[1]
    assert challenger.tags == {"dataset": "synthetic", "metric": "id_val/acc",
                               "metric_value": "0.5"}
    assert mlflow_client.get_registered_model(NAME).aliases == {registry.CHALLENGER: 2}


def test_log_model_failure_returns_none(logged: Logged, caplog: pytest.LogCaptureFixture) -> None:
    assert registry.log_model(logged.cfg, "0" * 32, logged.checkpoint) is None
    assert "could not log the model" in caplog.text


def run_eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = cli.main(["eval", *argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 else None, captured.err


def test_eval_command_on_registry_run_and_checkpoint(
        logged: Logged, capsys: pytest.CaptureFixture[str]) -> None:
    results = {}
    for uri in (f"models:/{NAME}@{registry.CHALLENGER}", f"runs:/{logged.runs[0]}/model",
                str(logged.checkpoint)):
        code, out, err = run_eval(capsys, "--model", uri, str(logged.config_path))
        assert code == 0, err
        assert out["model"] == uri
        assert set(out["metrics"]) == {f"{s}/{m}" for s in SPLITS for m in METRICS}
        results[uri] = out["metrics"]
    first, *others = results.values()
    for other in others:
        assert other == pytest.approx(first, abs=1e-5)


@pytest.mark.parametrize("uri", ["models:/no-such-model/1", "models:/flyp-test@no-such-alias",
                                 "runs:/0123456789abcdef0123456789abcdef/model",
                                 "/nonexistent/model.pt"])
def test_eval_bad_uri_exits_2(logged: Logged, capsys: pytest.CaptureFixture[str],
                              uri: str) -> None:
    code, _, err = run_eval(capsys, "--model", uri, str(logged.config_path))
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flyp-ray: error: --model") and uri in last, last
