"""The logged classifier behind Ray Serve, answering as ``mlflow models serve`` does.

The deployment loads the model with ``mlflow.pyfunc.load_model``: the very pyfunc that
``mlflow models serve`` runs (:mod:`flyp_ray.tracking.image_model`), so both servers give the
same answer to the same request.

- ``POST /invocations``: JSON with one of ``dataframe_split``, ``dataframe_records``,
  ``inputs`` or ``instances``, parsed by MLflow's own scoring-server functions against the
  model's signature; the answer is ``{"predictions": [{"label", "probability",
  "probabilities"}, ...]}``, one per row. Errors are MLflow's JSON error (``error_code``,
  ``message``) with its HTTP status: a row that is not an image is a 400 naming the row.
- ``GET /ping`` (and ``/health``): 200 once the replica has loaded the model.
- Dynamic batching: ``@serve.batch`` gathers the requests that arrive within
  ``batch_wait_timeout_s`` (at most ``max_batch_size`` requests) into one model call. One bad
  request cannot fail the others of its batch: when the joint call is refused, each request is
  answered on its own.

``build_app`` is the application builder that ``serve run``, ``serve deploy`` and a KubeRay
RayService name as ``flyp_ray.serve.app:build_app``, with ``args`` such as
``{model_uri: models:/flyp-iwildcam@champion, max_batch_size: 16}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
from typing import Any, cast

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import scoring_server
from ray import serve
from ray.serve import Application, Deployment
from starlette.requests import Request
from starlette.responses import Response

from flyp_ray.errors import BadInput

# Ray Serve shows its own logger's records in the replica's log and on the driver's stderr.
log = logging.getLogger("ray.serve")

APP_NAME = "flyp-ray"  # the Serve application's name
DEPLOYMENT = "ImageClassifier"
JSON = "application/json"
BATCH_LOG = "one model call for"  # "... N requests (M images)", logged per batch
HEALTH_PATHS = ("/ping", "/health")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What ``build_app`` takes (the ``args`` of a Serve config); checked on creation."""

    model_uri: str  # models:/name@alias, models:/name/version, runs:/id/model or a folder
    replicas: int = 1  # model copies, each a Ray actor; Ray Serve spreads requests over them
    max_batch_size: int = 16  # requests merged into one model call
    batch_wait_timeout_s: float = 0.01  # how long the first request of a batch waits for more
    num_cpus: float = 1.0  # per replica (torch's threads follow it)
    tracking_uri: str | None = None  # where models:/ and runs:/ resolve; None: the replica's env

    def __post_init__(self) -> None:
        if not isinstance(self.model_uri, str) or not self.model_uri:
            raise BadInput(f"model_uri: a model URI is required, got {self.model_uri!r}")
        if self.tracking_uri is not None and not isinstance(self.tracking_uri, str):
            raise BadInput(f"tracking_uri: must be a string, got {self.tracking_uri!r}")
        for key, low in (("replicas", 1), ("max_batch_size", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BadInput(f"{key}: must be an integer >= {low}, got {value!r}")
        for key in ("batch_wait_timeout_s", "num_cpus"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise BadInput(f"{key}: must be a number >= 0, got {value!r}")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeOptions:
        """Options from a Serve config's ``args``; an unknown key is refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise BadInput(f"args: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**args)


@serve.deployment(name=DEPLOYMENT)
class ImageClassifier:
    """One replica: the pyfunc model, its input schema, and the batching of its calls."""

    def __init__(self, model_uri: str, max_batch_size: int, batch_wait_timeout_s: float,
                 tracking_uri: str | None = None) -> None:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.schema = self.model.metadata.get_input_schema()
        batcher: Any = self.predict_batch  # serve.batch's wrapper has the setters
        batcher.set_max_batch_size(max_batch_size)
        batcher.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("serving %s", model_uri)

    async def __call__(self, request: Request) -> Response:
        """Route: /invocations, /ping, /health, /version."""
        path = request.url.path.rstrip("/") or "/"
        if request.method == "GET" and path in HEALTH_PATHS:
            return Response("\n", status_code=200, media_type=JSON)
        if request.method == "GET" and path == "/version":
            return Response(mlflow.__version__, status_code=200, media_type=JSON)
        if path != "/invocations":
            return Response(json.dumps({"error_code": "ENDPOINT_NOT_FOUND",
                                        "message": f"no endpoint {path}"}),
                            status_code=404, media_type=JSON)
        if request.method != "POST":
            return Response("", status_code=405, headers={"Allow": "POST"})
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip() != JSON:
            return Response(f"This predictor only supports {JSON}. Got {content_type!r}.",
                            status_code=415, media_type="text/plain")
        try:
            frame = self.parse(await request.body())
            answer = await self.predict_batch(frame)
            if isinstance(answer, MlflowException):
                raise answer
        except MlflowException as err:
            return Response(err.serialize_as_json(), status_code=err.get_http_status_code(),
                            media_type=JSON)
        out = io.StringIO()
        scoring_server.predictions_to_json(answer, out)
        return Response(out.getvalue(), status_code=200, media_type=JSON)

    def parse(self, body: bytes) -> pd.DataFrame:
        """A request's rows as a DataFrame, parsed as MLflow's scoring server parses them."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise MlflowException("Invalid input. Ensure that input is a valid JSON formatted "
                                  f"string. Error: {err!r}", error_code=BAD_REQUEST) from None
        if not isinstance(payload, dict):
            raise MlflowException("Invalid input: expected a JSON object with one of the keys "
                                  f"{sorted(scoring_server.SUPPORTED_FORMATS)}",
                                  error_code=BAD_REQUEST)
        data = {k: v for k, v in payload.items() if k in scoring_server.SUPPORTED_FORMATS}
        if not data:  # the same message as for several keys, from MLflow's own parser
            data = payload
        parsed = scoring_server.infer_and_parse_data(data, self.schema)
        return parsed if isinstance(parsed, pd.DataFrame) else pd.DataFrame(parsed)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, frames: list[pd.DataFrame]) -> list[Any]:
        """One model call for the requests of a batch; per request its rows or its error."""
        # In a thread: the replica keeps accepting requests, which form the next batch.
        return await asyncio.to_thread(self.predict_frames, frames)

    def predict_frames(self, frames: list[pd.DataFrame]) -> list[Any]:
        """Predictions per frame, or the MlflowException of a frame the model refused."""
        log.info("%s %d requests (%d images)", BATCH_LOG, len(frames),
                 sum(len(frame) for frame in frames))
        try:
            joint = self.model.predict(pd.concat(frames, ignore_index=True))
        except MlflowException as err:
            if len(frames) == 1:
                return [err]
            # A bad row: answer each request alone, so that its error names its own rows and
            # the good requests of the batch still get their predictions.
            return [self.predict_one(frame) for frame in frames]
        except Exception:  # noqa: BLE001 - answered as MLflow's server answers it
            log.exception("prediction failed")
            return [_unexpected()] * len(frames)
        answers, start = [], 0
        for frame in frames:
            answers.append(joint.iloc[start:start + len(frame)].reset_index(drop=True))
            start += len(frame)
        return answers

    def predict_one(self, frame: pd.DataFrame) -> Any:
        """One request's predictions, or its error."""
        try:
            return self.model.predict(frame)
        except MlflowException as err:
            return err
        except Exception:  # noqa: BLE001
            log.exception("prediction failed")
            return _unexpected()


def _unexpected() -> MlflowException:
    # mlflow models serve's answer to an error that is not an MlflowException.
    return MlflowException("Encountered an unexpected error while evaluating the model. Verify "
                           "that the serialized input Dataframe is compatible with the model for "
                           "inference.", error_code=BAD_REQUEST)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application of ``args`` (see :class:`ServeOptions`)."""
    return application(ServeOptions.from_args(dict(args)))


def application(options: ServeOptions) -> Application:
    """The deployment of ``options``, bound: ready for ``serve.run``."""
    deployment = cast(Deployment, ImageClassifier).options(num_replicas=options.replicas,
                                         ray_actor_options={"num_cpus": options.num_cpus})
    return deployment.bind(options.model_uri, options.max_batch_size,
                           options.batch_wait_timeout_s, options.tracking_uri)
