"""Checkpoints the tests write, and a registered model with image files to send it.

:func:`image_set` is what the serving tests share (once per session): a ``ce``-style checkpoint
whose head tells six of the images apart (so that different images get different labels), logged
and registered with the alias ``champion``; the images as PNG and JPEG files of a ``csv`` data
set; and what ``flyp-ray eval``'s own code predicts for each file.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flyp_ray import config
from flyp_ray.data import synthetic
from flyp_ray.data.load import load_data
from flyp_ray.finetune import checkpoint, evaluate
from flyp_ray.finetune.model import load_model
from flyp_ray.finetune.optim import build_state
from flyp_ray.tracking import promotion, registry, runs
from tests.support.configs import tiny_config, write_config

SERVED_NAME = "flyp-served"
N_IMAGES = 8  # the first half PNG, the second JPEG
TEMPLATES = ["a photo of a {}."]
MARGIN = 50.0  # logits by which a prototype's own class leads (head: write_prototype_checkpoint)
MIN_LEAD = 10.0  # logits by which every file's top class must lead the next (checked once)


def write_checkpoint(cfg: config.Config, folder: Path) -> Path:
    """A FLYP checkpoint as the worker writes it, with weights no fresh model has."""
    torch.manual_seed(1234)
    loaded = load_model(cfg.model, cfg.source)
    with torch.no_grad():
        loaded.model.logit_scale.fill_(2.5)  # type: ignore[operator]
    state = build_state(loaded.model, cfg.train, 10, torch.device("cpu"))
    prompts = {"classnames": list(synthetic.CLASSNAMES), "templates": TEMPLATES}
    return checkpoint.save(folder, loaded.model, state, 1, {"id_val/acc": 0.5}, prompts)


def write_prototype_checkpoint(cfg: config.Config, folder: Path,
                               prototypes: list[Image.Image]) -> Path:
    """A ``ce`` checkpoint whose class ``i`` scores ``MARGIN`` on ``prototypes[i]`` and 0 on the
    other prototypes, so that a wrong transform or a mixed-up row shows in the labels.

    A randomly initialised tiny model maps every image to nearly the same unit feature (cosines
    above 0.9998 here): a head of the prototypes' own directions left top-2 probability gaps of
    5e-6, next to the 4e-6 that batching the same images differently moves a probability by, so
    a label could flip by machine. The head here is the pseudo-inverse of the prototypes'
    features: every file's top class leads by 15 logits or more, over 1000 times what batching
    moves a logit by (0.011 here), and the probabilities are saturated, so that rounding moves
    each by at most 2 p (1 - p) times that: 1e-8 (measured 2e-9; :func:`image_set` checks the
    lead).
    """
    torch.manual_seed(1234)
    loaded = load_model(cfg.model, cfg.source)
    clip: Any = loaded.model.eval()
    with torch.no_grad():
        batch = torch.stack([loaded.preprocess_eval(image) for image in prototypes])
        features = clip.encode_image(batch, normalize=True).double()
        clip.logit_scale.fill_(math.log(100.0))  # CLIP's largest scale
        head = (torch.linalg.pinv(features) * (MARGIN / 100.0)).float()
    module = registry.ProbabilityClassifier.from_clip(clip, head)
    state = build_state(module, cfg.train, 10, torch.device("cpu"))
    meta = {"method": "ce", "classnames": list(synthetic.CLASSNAMES), "templates": TEMPLATES}
    return checkpoint.save(folder, module, state, 1, {"id_val/acc": 0.5}, meta)


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """A registered model and image files, with what the eval path predicts for each file."""

    cfg: config.Config  # a csv data set of the files; tracking at the model's registry
    config_path: Path
    uri: str  # models:/NAME@champion
    files: list[Path]
    labels: list[str]  # flyp-ray eval's code's top class per file
    probabilities: np.ndarray  # float [files, classes], columns in classnames order
    classnames: list[str]

    @property
    def tracking_uri(self) -> str:
        """Where the registry is (for servers started as other processes)."""
        return self.cfg.tracking.uri

    def b64(self) -> list[str]:
        """Every file, base64: the strings a JSON request carries."""
        return [base64.b64encode(path.read_bytes()).decode() for path in self.files]


def image_set(tmp: Path) -> ImageSet:
    """Write the images, the checkpoint and the config; log and register the model."""
    root = tmp / "images"
    root.mkdir()
    # 48 x 48 and 48 x 40 pixels: the transform resizes the short side and crops the centre.
    pictures = [synthetic.image("id_val", i, size=48).crop((0, 0, 48, 48 - 8 * (i % 2)))
                for i in range(N_IMAGES)]
    files = []
    for i, picture in enumerate(pictures):
        fmt = "PNG" if i < N_IMAGES // 2 else "JPEG"
        path = root / f"image{i}.{fmt.lower()}"
        picture.save(path, format=fmt)
        files.append(path)
    (tmp / "classnames.txt").write_text("\n".join(synthetic.CLASSNAMES) + "\n")
    _write_metadata(root, files, [0] * len(files))
    raw = tiny_config(tmp, dataset={"name": "csv", "root": str(root),
                                    "classnames": str(tmp / "classnames.txt")},
                      tracking={"registered_model": SERVED_NAME})
    raw["dataset"].pop("subsample")
    path = write_config(tmp / "served.yaml", raw)
    cfg = config.load(path)
    decoded = [Image.open(f).convert("RGB") for f in files]
    ckpt = write_prototype_checkpoint(cfg, tmp / "checkpoint",
                                      decoded[:len(synthetic.CLASSNAMES)])
    run_id = runs.start_run(cfg, "served", {runs.KIND_TAG: "train"})
    registered = registry.log_and_register(cfg, run_id, ckpt, {"id_val/acc": 0.5})
    assert registered is not None
    assert promotion.promote(cfg, registered[1]).decision == promotion.FIRST  # -> champion
    uri = f"models:/{SERVED_NAME}@{registry.CHAMPION}"
    probabilities = eval_probabilities(cfg, uri)
    second, top = np.sort(probabilities, axis=1)[:, -2:].T
    assert (top >= math.exp(MIN_LEAD) * second).all(), probabilities  # no near-ties (above)
    classnames = list(synthetic.CLASSNAMES)
    labels = [classnames[i] for i in probabilities.argmax(axis=1)]
    # The files' labels are now the eval path's predictions: `flyp-ray eval` must score 1.0.
    _write_metadata(root, files, probabilities.argmax(axis=1).tolist())
    return ImageSet(cfg, path, uri, files, labels, probabilities, classnames)


def eval_probabilities(cfg: config.Config, uri: str) -> np.ndarray:
    """Per file of the csv data set, the class probabilities that ``flyp-ray eval``'s code
    computes: the model loaded back by :func:`registry.load_classifier`, the files read by the
    data loader through the model's own transform, :func:`evaluate.predict`'s logits."""
    classifier = registry.load_classifier(uri, cfg)
    data = load_data(cfg.dataset, classifier.preprocess, classifier.preprocess, cfg.source)
    module = classifier.module
    logits, indices = evaluate.predict(module, module.head, data.splits["id_val"],
                                       batch_size=64, device=torch.device("cpu"),
                                       precision="fp32")
    assert indices.tolist() == list(range(len(indices)))
    return logits.softmax(dim=1).numpy()


def _write_metadata(root: Path, files: list[Path], labels: list[int]) -> None:
    rows = [f"{f.name},{label},id_val" for f, label in zip(files, labels, strict=True)]
    (root / "metadata.csv").write_text("filepath,label,split\n" + "\n".join(rows) + "\n")


# --- HTTP ------------------------------------------------------------------------------------


def post_json(url: str, payload: Any, timeout: float = 60) -> tuple[int, Any]:
    """POST ``payload`` as JSON; (status, decoded JSON answer), for errors too."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def probabilities(answer: list[dict[str, Any]], classnames: list[str]) -> np.ndarray:
    """The ``probabilities`` maps of an answer as an array, columns in ``classnames`` order."""
    return np.array([[row["probabilities"][c] for c in classnames] for row in answer])


def check_answer(answer: list[dict[str, Any]], images: ImageSet, rows: list[int]) -> None:
    """``answer`` is the eval path's label and probabilities for files ``rows``."""
    assert [row["label"] for row in answer] == [images.labels[i] for i in rows]
    expected = images.probabilities[rows]
    np.testing.assert_allclose(probabilities(answer, images.classnames), expected, atol=1e-5)
    np.testing.assert_allclose([row["probability"] for row in answer], expected.max(axis=1),
                               atol=1e-5)


def split_request(images: list[str]) -> dict[str, Any]:
    """``dataframe_split``: what MLflow's serving_input_example.json looks like."""
    return {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}
