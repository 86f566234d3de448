"""open_clip models: architecture by name or model-config JSON, weights by tag, file or hub id.

Everything goes through ``open_clip.create_model_and_transforms``; this module only resolves the
user's spec into its arguments and turns open_clip's exceptions into one-line errors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch

from flyp_ray.config import ModelConfig, TrainConfig, did_you_mean
from flyp_ray.errors import ModelError, first_line
from flyp_ray.finetune import weights

log = logging.getLogger(__name__)

HF_HUB = "hf-hub:"
# Shipped with the package for tests and the demo. The default tiny model has a small ResNet
# image tower: on CPU it learns the synthetic shapes in a few epochs from random weights, where a
# ViT of the same size needs far more steps. The ViT one has no BatchNorm, so data-parallel
# runs compute exactly what one process does (the loss-equivalence test uses it).
TINY_CONFIG = "flyp-tiny.json"
TINY_VIT_CONFIG = "flyp-tiny-vit.json"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A CLIP model with the transforms and tokenizer that belong to it."""

    model: torch.nn.Module
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_eval: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str


def tiny_config_path(vit: bool = False) -> Path:
    """The path of a tiny model-config JSON shipped with the package."""
    name = TINY_VIT_CONFIG if vit else TINY_CONFIG
    return Path(str(resources.files("flyp_ray.finetune") / "model_configs" / name))


def resolve_arch(arch: str, source: str = "model.arch") -> str:
    """The open_clip model name for ``arch``, registering a model-config JSON if given one."""
    if arch.startswith(HF_HUB):
        return arch
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ModelError(f"{source}: model-config file not found: {path}")
        # open_clip registers every JSON of a folder or a single file by its stem.
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        near = did_you_mean(arch, open_clip.list_models())
        raise ModelError(f"{source}: unknown open_clip architecture {arch!r}{near} "
                         f"(an open_clip model name or a path to a model-config JSON)")
    return arch


def check_model(cfg: ModelConfig, source: str) -> str:
    """Check the spec without building the model; returns a one-line description."""
    name = resolve_arch(cfg.arch, f"{source}: model.arch")
    weights = _check_pretrained(name, cfg.pretrained, source)
    if cfg.pretrained is not None and Path(cfg.pretrained).expanduser().is_file():
        open_checkpoint(Path(cfg.pretrained).expanduser(), source)
        load_model(cfg, source)  # a local file is cheap to try, and a wrong shape shows only here
    return f"model {name} with {weights}"


def open_checkpoint(path: Path, source: str) -> None:
    """Refuse a ``model.pretrained`` file that is not a state dict torch (or safetensors) reads.

    Opened with ``weights_only=True`` (no code from the file runs) and, for torch's zip format,
    memory-mapped: the check reads the file's structure, not its gigabytes.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open  # open_clip's own reader of .safetensors

            with safe_open(str(path), framework="pt") as opened:
                opened.keys()
            return
        # Only torch's zip format can be memory-mapped; a legacy file is read whole.
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - whatever torch says, the file is not a checkpoint
        reason = ("not a file torch.save wrote" if isinstance(err, pickle.UnpicklingError)
                  else f"{type(err).__name__}: {first_line(err, 120)}")
        raise ModelError(f"{source}: model.pretrained: {str(path)!r} is not a checkpoint "
                         f"({reason})") from None
    if not isinstance(state, dict):
        raise ModelError(f"{source}: model.pretrained: {str(path)!r} holds a "
                         f"{type(state).__name__}, not a state dict of weights")


def _check_pretrained(name: str, pretrained: str | None, source: str) -> str:
    """What ``pretrained`` is for ``name``; weights to fetch must be cached or reachable."""
    if name.startswith(HF_HUB) or pretrained is None:
        if not name.startswith(HF_HUB):
            return "random initialisation"
        return f"weights from the hub ({weights.locate(name, None, source, 'model.arch')})"
    if pretrained.startswith(HF_HUB):
        where = weights.locate(name, pretrained, source, "model.pretrained")
        return f"weights from {pretrained} ({where})"
    if pretrained in open_clip.list_pretrained_tags_by_model(name):
        where = weights.locate(name, pretrained, source, "model.pretrained")
        return f"pretrained tag {pretrained!r} ({where})"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return f"checkpoint {path}"
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ModelError(f"{source}: model.pretrained: {pretrained!r} is neither a checkpoint file nor "
                     f"a tag of {name}{did_you_mean(pretrained, tags)} "
                     f"(tags: {', '.join(tags) or 'none'})")


def load_model(cfg: ModelConfig, source: str = "<config>", *,
               warn_random: bool = True) -> LoadedModel:
    """Build the open_clip model, transforms and tokenizer of ``cfg`` (weights on the CPU).

    ``warn_random`` False: random weights are meant (a pre-training from scratch, a skeleton
    that a checkpoint fills), so a null ``pretrained`` is not worth a warning.
    """
    name = resolve_arch(cfg.arch, f"{source}: model.arch")
    pretrained = cfg.pretrained
    # What validate checked, with the same line: a worker that still finds the weights neither
    # cached nor reachable stops in seconds, not after open_clip's minutes of retries.
    _check_pretrained(name, pretrained, source)
    if pretrained is not None and pretrained.startswith(HF_HUB) and not name.startswith(HF_HUB):
        name, pretrained = pretrained, None  # open_clip reads hub weights from the model name
    if pretrained is None and not name.startswith(HF_HUB) and warn_random:
        log.warning("model.pretrained is null: %s starts from random weights", name)
    elif pretrained is not None and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser())
    try:
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, output_dict=True, weights_only=True)
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise ModelError(f"{source}: model.pretrained: cannot load {pretrained or name!r}: "
                         f"{first_line(err)}") from None
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(model, preprocess_train, preprocess_eval, tokenizer, name)


def apply_temperature(model: torch.nn.Module, train: TrainConfig) -> None:
    """Set and freeze/unfreeze CLIP's logit scale as the TrainConfig asks."""
    logit_scale: torch.nn.Parameter = model.logit_scale  # type: ignore[assignment]
    if train.temperature is not None:
        with torch.no_grad():
            logit_scale.fill_(math.log(1.0 / train.temperature))
    logit_scale.requires_grad_(train.learn_temperature)


def clamp_logit_scale(model: torch.nn.Module, max_scale: float | None) -> None:
    """Clamp as CLIP's pre-training does after every step: ``1 <= exp(logit_scale) <= max_scale``.

    ``max_scale`` None (the FLYP reference's finetuning) leaves the scale alone: FLYP learns the
    temperature freely, and OpenAI's CLIP starts *at* CLIP's cap of 100, so a clamp there could
    only ever lower it.
    """
    if max_scale is None:
        return
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))  # type: ignore[operator]
