"""The finetuned CLIP as an image classifier: logged as an MLflow model, registered, loaded back.

The classifier is CLIP's image tower plus the zero-shot head of its finetuned text tower (the
normalised, template-averaged class embeddings that evaluation uses): images in, class
probabilities out, ``softmax(logit_scale * normalize(image_features) @ head)``.

One model folder, two flavors, no pickle:

- ``python_function``: MLflow's "models from code": the code is
  :mod:`flyp_ray.tracking.image_model` (copied into the folder), which takes a DataFrame column
  ``image`` of JPEG/PNG bytes or base64 strings and answers per row ``label``, ``probability``
  and ``probabilities`` (class name -> p), through the model's own open_clip eval transform.
  ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` use it; its signature and input
  example (a small PNG, base64) say so.
- ``pytorch``: the classifier module in the ``pt2`` format (``torch.export``: a traced graph
  and raw tensors), which the pyfunc's artifact ``classifier`` holds and
  ``mlflow.pytorch.load_model`` loads as a module: float32 ``[N, 3, H, W]`` images after
  open_clip's eval transform (``metadata["preprocess"]``) in, ``[N, C]`` probabilities out,
  column ``i`` being ``metadata["classnames"][i]``. MLflow checks that the archive is
  pickle-free before it loads one, so loading a model from a registry runs no code that came
  with the model except the pyfunc's own file, which is plain source to read.

The classifier artifact also holds ``extra_files/open_clip_config.json`` (open_clip's
``local-dir:`` layout), from which the pyfunc builds its transform and :func:`load_classifier`
rebuilds the image tower as a plain module, so that ``flyp-ray eval`` gets image features and the
head, as training's evaluation does. On a machine with CUDA, the ``pt2`` graph stays on the CPU
it was exported on.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import open_clip
import pandas as pd
import PIL
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Map
from packaging.version import Version
from PIL import Image

from flyp_ray.config import CLASSIFIER_METHODS, Config
from flyp_ray.data import prompts
from flyp_ray.data.load import load_data
from flyp_ray.errors import BadInput, ConfigError, FlypRayError
from flyp_ray.finetune import checkpoint
from flyp_ray.finetune.classifier import ImageClassifier
from flyp_ray.finetune.evaluate import evaluate_splits, zero_shot_head
from flyp_ray.finetune.model import load_model
from flyp_ray.tracking import image_model, runs

log = logging.getLogger(__name__)

CHAMPION = "champion"  # what servers load; moves only by the promotion rule (promotion.py)
CHALLENGER = "challenger"  # the newest registered version that was not promoted
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's name for it in a local-dir: folder
EXTRA_FILES = "extra_files"  # where MLflow's flavors put extra_files in a model folder
MLMODEL = "MLmodel"
URI_SCHEMES = ("models:/", "runs:/")
IMAGE_MODEL_CODE = Path(image_model.__file__)  # the pyfunc's "models from code" file
INPUT_DOC = (f"DataFrame column {image_model.COLUMN!r}: per row a JPEG or PNG image, as bytes or "
             "as a base64 string; the model applies open_clip's eval transform itself")
OUTPUT_DOC = ("per row: label (the most probable class name), probability (its probability), "
              "probabilities (class name -> probability)")
TENSOR_INPUT_DOC = ("float32 [N, 3, H, W]: RGB images after open_clip's eval transform (resize, "
                    "centre crop, scale to [0, 1], normalise with preprocess.mean and "
                    "preprocess.std)")
TENSOR_OUTPUT_DOC = "float32 [N, C]: class probabilities; column i is classnames[i]"
# torch.export makes a dimension of size 1 static: a batch of 2 keeps the batch size free.
EXAMPLE_BATCH = 2
_BAD_URI_CODES = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}


class ProbabilityClassifier(ImageClassifier):
    """The classifier as it is logged: images in, class probabilities out."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities, shape [N, classes]."""
        return super().forward(images).softmax(dim=-1)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A classifier with what it takes to use it: class names, prompts and image transform."""

    module: ProbabilityClassifier
    classnames: list[str]
    templates: list[str]
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> the tensor the module takes
    open_clip_config: dict[str, Any]  # {"model_cfg": ..., "preprocess_cfg": ...}

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the input."""
        size = self.open_clip_config["preprocess_cfg"]["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# --- building ------------------------------------------------------------------------------


def from_checkpoint(cfg: Config, checkpoint_dir: str | Path) -> Classifier:
    """The classifier of a checkpoint folder (or state-dict file) of ``cfg``'s architecture.

    A FLYP (or zero-shot) checkpoint holds a CLIP model, whose head is rebuilt from its text
    tower; a ``ce``/``lp``/``lpft`` checkpoint holds the image tower and its trained head.
    """
    spec = dataclasses.replace(cfg.model, pretrained=None)  # the checkpoint brings the weights
    loaded = load_model(spec, cfg.source, warn_random=False)
    clip: Any = loaded.model.eval()  # open_clip's CLIP: towers and logit_scale untyped
    meta = checkpoint.load_meta(checkpoint_dir)
    classnames, templates = checkpoint_prompts(cfg, meta)
    if meta.get("method") in CLASSIFIER_METHODS:
        embed_dim = open_clip.get_model_config(loaded.name)["embed_dim"]
        empty = torch.zeros(embed_dim, len(classnames))
        module = ProbabilityClassifier.from_clip(clip, empty)
        checkpoint.load_weights(checkpoint_dir, module)
    else:
        checkpoint.load_weights(checkpoint_dir, clip)
        head = zero_shot_head(clip, loaded.tokenizer, classnames, templates, torch.device("cpu"))
        module = ProbabilityClassifier.from_clip(clip, head)
    config = {"model_cfg": open_clip.get_model_config(loaded.name),
              "preprocess_cfg": dict(open_clip.get_model_preprocess_cfg(clip))}
    return Classifier(module.eval(), classnames, templates, loaded.preprocess_eval, config)


def checkpoint_prompts(cfg: Config, meta: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The class names and templates a checkpoint was trained with.

    Training writes them into the checkpoint's meta.json; an older checkpoint gets the config's
    (the built-in class list, without opening the data set: the driver may not see the data).
    """
    ds = cfg.dataset
    classnames = meta.get("classnames") or prompts.classnames_for(ds.name, ds.classnames, None,
                                                                  cfg.source)
    templates = meta.get("templates") or prompts.templates_for(ds.templates, ds.name, cfg.source)
    return list(classnames), list(templates)


# --- logging and registering ---------------------------------------------------------------


def log_model(cfg: Config, run_id: str, checkpoint_dir: str | Path,
              artifact_path: str = "model") -> str | None:
    """Log a checkpoint's classifier as an MLflow model of run ``run_id``.

    Returns ``runs:/<run_id>/<artifact_path>``, or None if it could not be logged: the failure is
    logged, never raised, so that tracking cannot kill the training or search that called it.
    """
    info = _log(cfg, run_id, checkpoint_dir, artifact_path)
    return None if info is None else f"runs:/{run_id}/{artifact_path}"


def log_and_register(cfg: Config, run_id: str, checkpoint_dir: str | Path,
                     metrics: Mapping[str, float],
                     tags: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Log the model and register it as ``tracking.registered_model``, alias ``challenger``.

    The version is tagged with the data set, the selection metric (the first of
    ``search.metric``) and its value, and ``tags`` (a search's add the digests of its data and
    config, :mod:`flyp_ray.tracking.lineage`). Whether it becomes ``champion`` is
    :func:`flyp_ray.tracking.promotion.promote`'s decision. Returns (name, version), or None when
    nothing was registered (no registered_model configured, or an MLflow failure, which is
    logged).
    """
    info = _log(cfg, run_id, checkpoint_dir, "model")
    name = cfg.tracking.registered_model
    if info is None or not name:
        return None
    try:
        return register(cfg, info.model_uri, metrics, tags)
    except Exception as err:  # noqa: BLE001 - a registry failure must not fail the search
        log.error("could not register %s as %r: %s: %s", info.model_uri, name,
                  type(err).__name__, str(err)[:300])
        return None


def _log(cfg: Config, run_id: str, checkpoint_dir: str | Path,
         artifact_path: str) -> ModelInfo | None:
    try:
        classifier = from_checkpoint(cfg, checkpoint_dir)
        return log_classifier(cfg, run_id, classifier, artifact_path)
    except Exception as err:  # noqa: BLE001 - see log_model: logged, never raised
        log.error("could not log the model of run %s from %s: %s: %s", run_id, checkpoint_dir,
                  type(err).__name__, str(err)[:300], exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def log_classifier(cfg: Config, run_id: str, classifier: Classifier,
                   artifact_path: str = "model") -> ModelInfo:
    """Log ``classifier`` as an MLflow model of run ``run_id`` (raises on failure).

    The pt2 graph is saved first, on its own, and goes into the pyfunc model as its artifact
    ``classifier``; :class:`_ImageModelFlavor` then names it in the pytorch flavor too.
    """
    mlflow_client = runs.client(cfg.tracking.uri)
    experiment = mlflow_client.get_run(run_id).info.experiment_id
    # Created here rather than by log_model, which would file it under the process's current
    # experiment: runs:/<run>/model finds only models in the run's own experiment.
    logged = mlflow_client.create_logged_model(experiment, name=artifact_path,
                                               source_run_id=run_id)
    height, width = classifier.image_size
    example = np.zeros((EXAMPLE_BATCH, 3, height, width), dtype=np.float32)  # the mean image
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / OPEN_CLIP_CONFIG
        config_file.write_text(json.dumps(classifier.open_clip_config, indent=1))
        graph = Path(tmp) / image_model.CLASSIFIER
        mlflow.pytorch.save_model(
            classifier.module.cpu().eval(), str(graph), serialization_format="pt2",
            input_example=example, signature=tensor_signature(classifier),
            metadata=_metadata(cfg, classifier, TENSOR_INPUT_DOC, TENSOR_OUTPUT_DOC),
            extra_files=[str(config_file)], pip_requirements=_requirements())
        info: ModelInfo = Model.log(
            artifact_path=None, name=artifact_path, flavor=_ImageModelFlavor,
            model_id=logged.model_id, run_id=run_id, python_model=str(IMAGE_MODEL_CODE),
            artifacts={image_model.CLASSIFIER: str(graph)}, signature=signature(classifier),
            input_example=input_example(classifier),
            metadata=_metadata(cfg, classifier, INPUT_DOC, OUTPUT_DOC),
            pip_requirements=_requirements(pyfunc=True))
        return info


class _ImageModelFlavor:
    """``Model.log``'s flavor: the pyfunc from code, plus the pytorch flavor of its artifact."""

    @staticmethod
    def save_model(path: str, mlflow_model: Model, **kwargs: Any) -> None:
        """Save the pyfunc, then point a pytorch flavor at the pt2 graph inside it."""
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        pyfunc_conf = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
        graph = pyfunc_conf["artifacts"][image_model.CLASSIFIER]["path"]
        torch_conf = dict(Model.load(str(Path(path) / graph)).flavors[mlflow.pytorch.FLAVOR_NAME])
        torch_conf["model_data"] = f"{graph}/{torch_conf['model_data']}"
        torch_conf["extra_files"] = [{**extra, "path": f"{graph}/{extra['path']}"}
                                     for extra in torch_conf.get("extra_files") or []]
        mlflow_model.add_flavor(mlflow.pytorch.FLAVOR_NAME, **torch_conf)
        mlflow_model.save(str(Path(path) / MLMODEL))


def signature(classifier: Classifier) -> ModelSignature:
    """The pyfunc's: a string column ``image`` in; label, probability, probabilities out.

    ``string``, not ``binary``: for a binary column ``mlflow models serve`` decodes the base64
    itself and answers a bad row with a parse error that names no row. Bytes pass too (the
    column is an object column).
    """
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, image_model.COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, "label"),
                        ColSpec(DataType.double, "probability"),
                        ColSpec(Map(DataType.double), "probabilities")]),
    )


def tensor_signature(classifier: Classifier) -> ModelSignature:
    """The pt2 graph's tensor specs; -1 is the free batch dimension.

    Unnamed on purpose: pyfunc then hands the array to the model as it is (a named spec makes
    it a dict, which the pytorch flavor refuses).
    """
    height, width = classifier.image_size
    classes = len(classifier.classnames)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, height, width))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )


def input_example(classifier: Classifier) -> pd.DataFrame:
    """One real PNG, base64: a grey image of the model's input size."""
    height, width = classifier.image_size
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({image_model.COLUMN: [base64.b64encode(buffer.getvalue()).decode()]})


def _metadata(cfg: Config, classifier: Classifier, input_doc: str,
              output_doc: str) -> dict[str, Any]:
    preprocess = {k: list(v) if isinstance(v, tuple) else v
                  for k, v in classifier.open_clip_config["preprocess_cfg"].items()}
    return {"classnames": classifier.classnames, "templates": classifier.templates,
            "dataset": cfg.dataset.name, "model.arch": cfg.model.arch,
            "preprocess": preprocess, "input": input_doc, "output": output_doc}


def _requirements(pyfunc: bool = False) -> list[str]:
    # A pt2 archive needs the torch release that wrote it (no local build tag such as +cpu);
    # the pyfunc pins open_clip and Pillow too: its transform and decoding must not drift.
    pins = [f"torch=={Version(torch.__version__).base_version}", f"mlflow=={mlflow.__version__}",
            "numpy"]
    if pyfunc:
        pins += [f"open_clip_torch=={open_clip.__version__}", f"pillow=={PIL.__version__}",
                 "pandas"]
    return pins


def register(cfg: Config, model_uri: str, metrics: Mapping[str, float],
             extra: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Register a logged model as a new version of ``tracking.registered_model`` with the
    alias ``challenger`` (see :func:`log_and_register`); raises on an MLflow failure."""
    name = str(cfg.tracking.registered_model)
    metric = cfg.search.metric[0] if isinstance(cfg.search.metric, list) else cfg.search.metric
    tags = {"dataset": cfg.dataset.name, "metric": metric, **(extra or {})}
    if metric in metrics:
        tags["metric_value"] = str(float(metrics[metric]))
    mlflow_client = runs.client(cfg.tracking.uri)
    version = mlflow.register_model(model_uri, name, tags=tags)
    # A challenger until the promotion decision (promotion.py): never champion by registering.
    mlflow_client.set_registered_model_alias(name, CHALLENGER, str(version.version))
    log.info("registered %s version %s (alias %s)", name, version.version, CHALLENGER)
    return name, str(version.version)


def check_registered_model(cfg: Config) -> None:
    """Refuse a ``tracking.registered_model`` whose versions are models of another data set.

    A config copied from another data set's keeps its model name: its search would move the
    other data set's ``champion`` alias to a model of this one. Nothing is created here (a
    sqlite store that does not exist yet has no models).
    """
    name = cfg.tracking.registered_model
    if not name or "'" in name or not runs.store_exists(cfg.tracking.uri):
        return  # (a quote cannot be searched for in an MLflow filter)
    try:
        found = runs.client(cfg.tracking.uri).search_model_versions(
            f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
    except MlflowException:  # a store without a registry, or no such model: nothing to compare
        return
    dataset = found[0].tags.get("dataset") if found else None
    if dataset is not None and dataset != cfg.dataset.name:
        raise ConfigError(cfg.source, "tracking.registered_model",
                          f"{name!r} holds {dataset} models (version {found[0].version}), but "
                          f"this config's data set is {cfg.dataset.name}: name its own model")


# --- loading -------------------------------------------------------------------------------


def load_classifier(uri: str, cfg: Config | None = None) -> Classifier:
    """Load a classifier from ``models:/name/version``, ``models:/name@alias``,
    ``runs:/id/model``, a local MLflow model folder, or a checkpoint folder or state-dict file.

    A checkpoint needs ``cfg``: its model spec builds the architecture and its data set names the
    classes. With ``cfg``, MLflow URIs resolve against ``cfg.tracking.uri``. A URI that names
    nothing is a :class:`BadInput`.
    """
    if cfg is not None:
        runs.client(cfg.tracking.uri)
    path = Path(uri).expanduser()
    if uri.startswith(URI_SCHEMES) or (path / MLMODEL).is_file():
        return _from_mlflow(uri)
    if path.exists():
        if cfg is None:
            raise BadInput(f"--model: {uri} is a checkpoint; its config is needed to build it")
        return from_checkpoint(cfg, path)
    raise BadInput(f"--model: {uri!r} is not models:/name/version, models:/name@alias, "
                   f"runs:/id/model, or an existing model folder or checkpoint")


def serving_uri(uri: str) -> str:
    """The model URI to serve: ``models:/name@alias`` pinned to the version the alias names now,
    so that every replica loads the same model even if the alias moves; checked to be a model
    that takes images. An unknown or unsuitable model is a :class:`BadInput`."""
    if uri.startswith("models:/") and "@" in uri:
        name, _, alias = uri.removeprefix("models:/").rpartition("@")
        try:
            version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
        except MlflowException as err:
            where = runs.redact(mlflow.get_tracking_uri())
            raise BadInput(f"{uri!r}: not found in {where}: {_first_line(err)}") from None
        uri = f"models:/{name}/{version}"
    try:
        model = Model.load(str(Path(uri).expanduser()) if Path(uri).expanduser().is_dir()
                           else uri)
    except (MlflowException, OSError) as err:
        where = runs.redact(mlflow.get_tracking_uri())
        message = _first_line(err) if isinstance(err, MlflowException) else str(err)
        raise BadInput(f"{uri!r}: cannot read its MLmodel in {where}: {message}") from None
    inputs = model.signature.inputs.input_names() if model.signature is not None else []
    if image_model.COLUMN not in inputs:
        raise BadInput(f"{uri!r} does not take images (inputs: {inputs or 'tensors'}): it was "
                       f"logged before flyp-ray's models did; `flyp-ray eval` still reads it")
    return uri


def _from_mlflow(uri: str) -> Classifier:
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(uri, tmp)
        model = Model.load(local)
        meta = model.metadata or {}
        config_dir = _graph_folder(local, model) / EXTRA_FILES
        if "classnames" not in meta or not (config_dir / OPEN_CLIP_CONFIG).is_file():
            raise BadInput(f"--model: {uri} is an MLflow model but not one flyp-ray logged "
                           f"(no classnames or {EXTRA_FILES}/{OPEN_CLIP_CONFIG})")
        try:
            # MLflow refuses a pickled model, and a pt2 archive with pickle payloads, before
            # torch reads it (unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION says otherwise).
            graph = mlflow.pytorch.load_model(local)
        except MlflowException as err:
            raise BadInput(f"--model: cannot load {uri}: {_first_line(err)}") from None
        clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{config_dir}")
        config = json.loads((config_dir / OPEN_CLIP_CONFIG).read_text())
    state = graph.state_dict()
    module = ProbabilityClassifier(clip.visual, torch.empty_like(state["head"]),
                                   torch.empty_like(state["logit_scale"]))
    module.load_state_dict(state)
    return Classifier(module.eval(), list(meta["classnames"]), list(meta.get("templates", [])),
                      preprocess, config)


def _graph_folder(local: str, model: Model) -> Path:
    """The folder of the pt2 graph: the pyfunc's artifact, or the model folder itself (models
    logged with the pytorch flavor alone)."""
    torch_conf = model.flavors.get(mlflow.pytorch.FLAVOR_NAME, {})
    return (Path(local) / torch_conf.get("model_data", "data")).parent


def _download(uri: str, dst: str) -> str:
    """The model folder of ``uri`` on this machine; an unknown model or run is a BadInput."""
    if Path(uri).expanduser().is_dir():
        return str(Path(uri).expanduser())
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except MlflowException as err:
        if err.error_code in _BAD_URI_CODES:
            where = runs.redact(mlflow.get_tracking_uri())
            raise BadInput(f"--model: cannot find {uri!r} in {where}: {_first_line(err)}") from None
        raise FlypRayError(f"cannot download {uri!r}: {_first_line(err)}") from None


def _first_line(err: MlflowException) -> str:
    lines = str(err.message).strip().splitlines()
    return lines[0][:300] if lines else str(err.error_code)


# --- evaluating ----------------------------------------------------------------------------


def evaluate_model(cfg: Config, uri: str) -> dict[str, float]:
    """Metrics of the model at ``uri`` on every evaluation split of ``cfg``'s data set.

    The same names and code as training's evaluation (``{split}/acc``, ``macro_f1``,
    ``worst_group_acc``, ``loss``); images go through the model's own eval transform.
    """
    classifier = load_classifier(uri, cfg)
    data = load_data(cfg.dataset, classifier.preprocess, classifier.preprocess, cfg.source)
    _check_classes(classifier, data.classnames, uri, cfg.source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = classifier.module.to(device)
    splits = [split for name, split in data.splits.items() if name != "train"]
    return evaluate_splits(module, module.head, splits, batch_size=cfg.train.eval_batch_size,
                           device=device, precision=cfg.train.precision,
                           num_workers=cfg.dataset.loader_workers)


def _check_classes(classifier: Classifier, classnames: list[str], uri: str, source: str) -> None:
    if len(classifier.classnames) != len(classnames):
        raise BadInput(f"--model: {uri} has {len(classifier.classnames)} classes but the data set "
                       f"of {source} has {len(classnames)}")
    if classifier.classnames != classnames:
        log.warning("%s names its classes differently from %s's data set (label order is "
                    "assumed to match)", uri, source)
