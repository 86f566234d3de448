"""The logged classifier as a pyfunc that takes images: MLflow's "models from code" file.

MLflow copies this file into the model folder and runs it when the model is loaded (it ends
with ``mlflow.models.set_model``): nothing is pickled. It imports only what the model's
requirements list (torch, open_clip, Pillow, pandas, MLflow), never flyp_ray, so the model
serves wherever those are installed.

- Input: a DataFrame with a column ``image``: per row the encoded bytes of a JPEG or PNG, or
  the same bytes as a base64 string (what JSON requests carry; a ``data:...;base64,`` prefix
  and line breaks are allowed).
- Output: a DataFrame, per row ``label`` (the most probable class name), ``probability`` (its
  probability) and ``probabilities`` (class name -> probability, every class).
- Images go through open_clip's evaluation transform of the model (resize, centre crop,
  normalise), built from the ``preprocess_cfg`` the model was trained with, exactly as
  ``open_clip.create_model_and_transforms`` builds its ``preprocess_val``.
- A row that is empty or not an image is an MlflowException with INVALID_PARAMETER_VALUE
  naming the row (``mlflow models serve`` answers it with HTTP 400); nothing is predicted.

The artifact ``classifier`` is the pytorch-flavor model in the ``pt2`` format (images after the
transform in, probabilities out), loaded with ``mlflow.pytorch.load_model``, which refuses an
archive that holds pickle data. Its MLmodel metadata names the classes; its
``extra_files/open_clip_config.json`` has the ``preprocess_cfg``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, UnidentifiedImageError

COLUMN = "image"
CLASSIFIER = "classifier"  # the artifact: the pt2 pytorch-flavor model
OPEN_CLIP_CONFIG = "extra_files/open_clip_config.json"
OUTPUTS = ("label", "probability", "probabilities")
MAX_NAMED_ROWS = 10  # an error names at most this many bad rows
BATCH = 64  # images per forward pass: bounds memory on a large request
_DATA_URI = "base64,"


class BadImage(ValueError):
    """One row that is not an image."""


def decode(value: Any) -> Image.Image:
    """The RGB image of one row: encoded bytes, or those bytes as base64 text."""
    if isinstance(value, str):
        text = value.split(_DATA_URI, 1)[1] if value.startswith("data:") else value
        try:
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadImage(f"not base64 ({err})") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise BadImage(f"expected bytes or a base64 string, got {type(value).__name__}")
    if not raw:
        raise BadImage("empty")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()  # decode now: a truncated file fails here, not in the transform
    except UnidentifiedImageError:
        raise BadImage(f"not a JPEG or PNG image ({len(raw)} bytes)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        lines = str(err).strip().splitlines()
        raise BadImage(f"unreadable image ({type(err).__name__}: "
                       f"{lines[0] if lines else ''})") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rows(values: Sequence[Any]) -> list[Image.Image]:
    """Every row's image; an MlflowException naming the rows that are not images."""
    images: list[Image.Image] = []
    bad: list[str] = []
    for row, value in enumerate(values):
        try:
            images.append(decode(value))
        except BadImage as err:
            bad.append(f"row {row}: {err}")
    if bad:
        more = f" (and {len(bad) - MAX_NAMED_ROWS} more)" if len(bad) > MAX_NAMED_ROWS else ""
        raise MlflowException("; ".join(bad[:MAX_NAMED_ROWS]) + more,
                              error_code=INVALID_PARAMETER_VALUE)
    return images


def image_column(model_input: Any) -> list[Any]:
    """The ``image`` values of a DataFrame (or a dict or list of rows) as a list."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, dict):
        frame = pd.DataFrame(model_input)
    elif isinstance(model_input, list):
        frame = pd.DataFrame({COLUMN: model_input}) if model_input and not isinstance(
            model_input[0], dict) else pd.DataFrame(model_input)
    else:
        raise MlflowException(f"expected a DataFrame with a column {COLUMN!r}, got "
                              f"{type(model_input).__name__}", error_code=INVALID_PARAMETER_VALUE)
    if COLUMN not in frame.columns:
        raise MlflowException(f"expected a column {COLUMN!r}, got {list(frame.columns)}",
                              error_code=INVALID_PARAMETER_VALUE)
    if frame.empty:
        raise MlflowException("no rows: send at least one image",
                              error_code=INVALID_PARAMETER_VALUE)
    return list(frame[COLUMN])


class ImageClassifierModel(PythonModel):
    """Images in, class names and probabilities out."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the pt2 graph, the class names and the eval transform from the artifact."""
        folder = Path(context.artifacts[CLASSIFIER])
        self.module = mlflow.pytorch.load_model(str(folder))
        metadata = mlflow.models.Model.load(str(folder)).metadata or {}
        self.classnames: list[str] = list(metadata["classnames"])
        config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        self.transform = image_transform_v2(PreprocessCfg(**config["preprocess_cfg"]),
                                            is_train=False)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Per row: ``label``, ``probability`` and ``probabilities``."""
        images = decode_rows(image_column(model_input))
        probs = torch.cat([self.probabilities(images[i:i + BATCH])
                           for i in range(0, len(images), BATCH)])
        top, index = probs.max(dim=1)
        return pd.DataFrame({
            "label": [self.classnames[i] for i in index.tolist()],
            "probability": top.tolist(),
            "probabilities": [dict(zip(self.classnames, row, strict=True))
                              for row in probs.tolist()],
        })

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """Class probabilities of decoded images, float32 [N, classes]."""
        batch = torch.stack([self.transform(image) for image in images])
        return self.module(batch).float()


mlflow.models.set_model(ImageClassifierModel())
