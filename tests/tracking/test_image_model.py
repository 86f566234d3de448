"""The logged model takes images: the pyfunc, loaded in this process.

One registered model and its PNG/JPEG files for the session (``served_images`` in conftest);
the labels must be what ``flyp-ray eval``'s code predicts for the same files. Both servers of
the model (``mlflow models serve`` and ``flyp-ray serve``) are tested in tests/serve.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image

from flyp_ray import cli
from flyp_ray.tracking import image_model
from tests.support.models import ImageSet, check_answer

# --- in this process -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def registry_of_the_model(served_images: ImageSet) -> Iterator[None]:
    """``models:/`` URIs resolve against MLflow's process-wide tracking URI: other tests move it."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(served_images.tracking_uri)
    yield
    mlflow.set_tracking_uri(before)



def test_pyfunc_takes_bytes_and_base64_and_answers_eval_labels(served_images: ImageSet) -> None:
    images = served_images
    assert len(set(images.labels)) >= 3  # the labels tell the images apart: a real check
    pyfunc = mlflow.pyfunc.load_model(images.uri)
    raw = [path.read_bytes() for path in images.files]
    # Raw bytes, base64, base64 as a data URI and wrapped at 76 characters like `base64`
    b64 = [base64.b64encode(data).decode() for data in raw]
    column: list[Any] = [raw[0], b64[1], f"data:image/png;base64,{b64[2]}",
                         base64.encodebytes(raw[3]).decode(), *raw[4:]]
    answer = pyfunc.predict(pd.DataFrame({"image": column}))
    assert list(answer.columns) == list(image_model.OUTPUTS)
    check_answer(answer.to_dict(orient="records"), images, list(range(len(raw))))
    one = pyfunc.predict(pd.DataFrame({"image": [raw[5]]}))  # a batch of one image
    check_answer(one.to_dict(orient="records"), images, [5])


def test_pyfunc_bad_rows_are_an_error_naming_them(served_images: ImageSet) -> None:
    pyfunc = mlflow.pyfunc.load_model(served_images.uri)
    png = served_images.files[0].read_bytes()
    column: list[Any] = [png, b"", b"not an image", "not base64!", png[: len(png) // 2]]
    with pytest.raises(MlflowException) as caught:
        pyfunc.predict(pd.DataFrame({"image": column}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    message = caught.value.message
    for row in (1, 2, 3, 4):
        assert f"row {row}:" in message, message
    assert "row 0:" not in message
    with pytest.raises(MlflowException, match="no rows"):
        pyfunc.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))


def test_signature_and_input_example_say_it_takes_images(served_images: ImageSet) -> None:
    local = Path(mlflow.artifacts.download_artifacts(served_images.uri))
    model = Model.load(str(local))
    assert model.signature is not None
    assert model.signature.inputs.input_names() == ["image"]
    assert model.signature.outputs.input_names() == list(image_model.OUTPUTS)
    assert "JPEG or PNG" in model.metadata["input"]
    serving = json.loads((local / "serving_input_example.json").read_text())
    (row,) = serving["dataframe_split"]["data"]
    example = Image.open(io.BytesIO(base64.b64decode(row[0])))
    assert example.format == "PNG" and example.size == (32, 32)  # the tiny model's input size


def test_flyp_ray_eval_agrees_with_the_labels(served_images: ImageSet,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # The files' labels in the csv data set are the eval path's predictions (tests/support):
    # the command itself must then score every file right.
    code = cli.main(["eval", "--model", served_images.uri, str(served_images.config_path)])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    assert json.loads(out)["metrics"]["id_val/acc"] == 1.0
