"""One worker's run, assembled once: model, data, loader, loss, optimizer state, prompts.

:func:`build_run` is where a run's pieces come together, in one process (tests) or inside a Ray
Train worker (which passes its DDP and sharding wrappers in). :class:`Run` is what the loop
(:mod:`flyp_ray.finetune.loop`) and the linear probe (:mod:`flyp_ray.finetune.probe`) work on.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from flyp_ray.config import CLASSIFIER_METHODS, Config, TrainConfig, resolve_recipe
from flyp_ray.data import fewshot
from flyp_ray.data.base import Data
from flyp_ray.data.load import load_data
from flyp_ray.finetune import progress, wiseft
from flyp_ray.finetune.checkpoint import TrainingState
from flyp_ray.finetune.classifier import ImageClassifier
from flyp_ray.finetune.evaluate import autocast, unwrap, zero_shot_head
from flyp_ray.finetune.loss import FlypLoss
from flyp_ray.finetune.model import apply_temperature, load_model
from flyp_ray.finetune.optim import build_state

Report = Callable[[int, dict[str, float]], None]
Tokenizer = Callable[..., torch.Tensor]
T = TypeVar("T")
Wrap = Callable[[T], T]


def _same(value: T) -> T:
    return value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def text_head(clip: torch.nn.Module, tokenizer: Tokenizer, data: Data, train: TrainConfig,
              device: torch.device) -> torch.Tensor:
    """The zero-shot head of ``clip``'s text tower, at the run's precision."""
    with autocast(device, train.precision):
        return zero_shot_head(clip, tokenizer, data.classnames, data.templates, device)


def method_model(clip: torch.nn.Module, tokenizer: Tokenizer, data: Data, train: TrainConfig,
                 device: torch.device) -> torch.nn.Module:
    """The model ``train.method`` trains: CLIP itself, or its image tower with a linear head.

    The head starts as the zero-shot head of the pretrained text tower (the WiSE-FT/LP-FT
    recipe), so every baseline starts from the zero-shot classifier. The text tower is dropped:
    DDP would wait forever for gradients of parameters that no loss reaches.
    """
    if train.method not in CLASSIFIER_METHODS:
        return clip
    clip.to(device)
    head = text_head(clip, tokenizer, data, train, device)
    classifier = ImageClassifier.from_clip(clip, head, trainable_head=True)
    if train.method == "lp":
        classifier.visual.requires_grad_(False)
    return classifier


def prompt_tokens(tokenizer: Callable[..., torch.Tensor], classnames: Sequence[str],
                  templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every (class, template) prompt, shape [classes, templates, context]."""
    texts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(texts)
    return tokens.view(len(classnames), len(templates), -1)


@dataclasses.dataclass
class Run:
    """Everything one worker's training needs, built once."""

    model: torch.nn.Module  # the CLIP model, possibly wrapped in DistributedDataParallel
    data: Data
    tokenizer: Callable[..., torch.Tensor]
    train: TrainConfig  # recipe resolved (config.resolve_recipe): no null recipe fields
    loader: DataLoader  # the training split, already sharded across workers
    loss_fn: FlypLoss
    state: TrainingState
    prompts: torch.Tensor
    device: torch.device
    rank: int = 0
    world_size: int = 1
    eval_workers: int = 0
    zero_shot: wiseft.State | None = None  # the starting weights, kept for WiSE-FT
    best: wiseft.Best = dataclasses.field(default_factory=wiseft.Best)  # WiSE-FT's other end
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds spent building
    pace: progress.Pace = dataclasses.field(default_factory=progress.Pace)  # terminal lines


def apply_speed_options(model: torch.nn.Module, train: TrainConfig) -> None:
    """Gradient checkpointing and ``torch.compile``, in place, as ``train`` asks.

    Both act on the CLIP model inside any DDP wrapper, so state-dict keys and ``unwrap`` stay
    as they are. Compiling in place covers the training forward; the evaluation calls
    ``encode_image``, which stays eager.
    """
    clip = unwrap(model)
    if train.grad_checkpointing:
        # open_clip recomputes each transformer block in backward; a ResNet tower ignores it.
        tower = clip.visual if isinstance(clip, ImageClassifier) else clip
        tower.set_grad_checkpointing(True)  # type: ignore[operator]
    if train.compile:
        clip.compile()


def make_run(model: torch.nn.Module, data: Data, tokenizer: Callable[..., torch.Tensor],
             train: TrainConfig, loader: DataLoader, device: torch.device, *, rank: int = 0,
             world_size: int = 1, eval_workers: int = 0) -> Run:
    """Assemble a Run: loss with the distributed context, prompt tokens, optimizer state.

    The run keeps ``train`` with its recipe resolved: the loop reads the effective clamp there.
    """
    train = resolve_recipe(train)
    apply_speed_options(model, train)
    loss_fn = FlypLoss(train.same_class, local_loss=train.local_loss, rank=rank,
                       world_size=world_size)
    total_steps = max(1, train.epochs * len(loader))
    state = build_state(model, train, total_steps, device)
    tokens = prompt_tokens(tokenizer, data.classnames, data.templates)
    # Taken before any checkpoint is restored: the model still holds the pretrained weights.
    zero_shot = wiseft.snapshot(unwrap(model)) if train.wiseft_alphas else None
    return Run(model, data, tokenizer, train, loader, loss_fn, state, tokens, device, rank,
               world_size, eval_workers, zero_shot)


def loader_workers(cfg: Config) -> int:
    """DataLoader processes per worker: ``dataset.loader_workers``; -1: its CPUs less one."""
    if cfg.dataset.loader_workers >= 0:
        return cfg.dataset.loader_workers
    # Ray gives this worker cpus_per_worker CPUs: the training process keeps one, the rest decode.
    return max(0, math.floor(cfg.resources.cpus_per_worker) - 1)


def train_loader(data: Data, cfg: Config, world_size: int, device: torch.device) -> DataLoader:
    """The training DataLoader with this worker's share of the global batch."""
    per_worker = cfg.train.batch_size // world_size
    workers = loader_workers(cfg)
    # drop_last: every worker must take the same number of steps, or DDP's all-reduce hangs.
    return DataLoader(data.splits["train"].dataset, batch_size=per_worker, shuffle=True,
                      drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda")


def build_run(cfg: Config, device: torch.device, *, rank: int = 0, world_size: int = 1,
              draw: int = 0, prepare_model: Wrap[torch.nn.Module] = _same,
              prepare_loader: Wrap[DataLoader] = _same) -> Run:
    """Model, data, loader and optimizer state of one worker of ``cfg``'s run.

    ``prepare_model`` and ``prepare_loader`` are Ray Train's in a worker (DDP and sharding);
    ``draw`` numbers the few-shot draw (``train.repeats``), which seeds the images kept.
    """
    clock = Clock()
    seed_everything(cfg.train.seed)  # identical initial weights on every worker
    loaded = load_model(cfg.model, cfg.source)
    apply_temperature(loaded.model, cfg.train)
    clock.lap("model")
    data = load_data(cfg.dataset, loaded.preprocess_train, loaded.preprocess_eval, cfg.source)
    data = fewshot.few_shot(data, cfg.train.k_shot, cfg.train.seed + draw)
    clock.lap("data")
    model = prepare_model(method_model(loaded.model, loaded.tokenizer, data, cfg.train, device))
    seed_everything(cfg.train.seed + rank)  # but different augmentations per worker
    loader = prepare_loader(train_loader(data, cfg, world_size, device))
    clock.lap("wrap")
    run = make_run(model, data, loaded.tokenizer, cfg.train, loader, device, rank=rank,
                   world_size=world_size, eval_workers=loader_workers(cfg))
    clock.lap("state")
    run.timings.update(clock.laps)
    return run


class Clock:
    """Seconds between laps, by name: where building a run spends its time."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
