"""The training loop in plain PyTorch: no Ray in here, so it runs and tests in one process.

One loop for every method (``train.method``), one data path and one evaluation:

- ``flyp``: CLIP's contrastive loss between images and prompts of their class; evaluated with
  the zero-shot head rebuilt from the current text tower.
- ``ce``: cross-entropy through the image tower and a head that starts as the zero-shot head.
- ``lp``: that head fitted on frozen image features (:mod:`flyp_ray.probe`), nothing else.
- ``lpft``: ``lp``, then ``ce`` from the fitted head (Kumar et al. 2022).
- ``zeroshot``: evaluation of the pretrained model only.

One epoch is one pass over the training images; every epoch ends with the splits evaluated, and
the last one with WiSE-FT's mixes when ``train.wiseft_alphas`` asks. The caller decides what to
do with the metrics (the Ray worker reports and checkpoints them).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from flyp_ray import fewshot, probe, wiseft
from flyp_ray.checkpoint import TrainingState
from flyp_ray.classifier import ImageClassifier
from flyp_ray.config import CLASSIFIER_METHODS, Config, TrainConfig
from flyp_ray.data import Data, load_data
from flyp_ray.errors import TrialDiverged
from flyp_ray.evaluate import autocast, evaluate_splits, unwrap, zero_shot_head
from flyp_ray.loss import FlypLoss
from flyp_ray.model import apply_temperature, clamp_logit_scale, load_model

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


def build_optimizer(model: torch.nn.Module, train: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over every trainable parameter; no weight decay on gains, biases and logit scale."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        # CLIP's recipe: decaying 1-d parameters (norm gains, biases) or the temperature hurts.
        exempt = param.ndim < 2 or "logit_scale" in name or "bias" in name
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=device.type == "cuda")


def lr_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay, never below ``min_lr`` (as a factor of lr)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    decay_steps = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return max(train.min_lr / train.lr, cosine)


def build_state(model: torch.nn.Module, train: TrainConfig, total_steps: int,
                device: torch.device) -> TrainingState:
    """Optimizer, schedule and (fp16 only) loss scaler for ``total_steps`` optimizer steps."""
    optimizer = build_optimizer(model, train, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
    return TrainingState(optimizer, scheduler, scaler)


def prompt_tokens(tokenizer: Callable[..., torch.Tensor], classnames: Sequence[str],
                  templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every (class, template) prompt, shape [classes, templates, context]."""
    texts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(texts)
    return tokens.view(len(classnames), len(templates), -1)


def draw_prompts(tokens: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """One prompt per image: its class with a template drawn at random (FLYP's pairing)."""
    choice = torch.randint(tokens.shape[1], (labels.shape[0],), generator=generator)
    return tokens[labels.cpu(), choice]


@dataclasses.dataclass
class Run:
    """Everything one worker's training needs, built once."""

    model: torch.nn.Module  # the CLIP model, possibly wrapped in DistributedDataParallel
    data: Data
    tokenizer: Callable[..., torch.Tensor]
    train: TrainConfig
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
    """Assemble a Run: loss with the distributed context, prompt tokens, optimizer state."""
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


def loss_step(run: Run, images: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """The batch's loss: FLYP's on (image, drawn prompt) pairs, else cross-entropy."""
    images = images.to(run.device, non_blocking=True)
    prepare = run.data.splits["train"].prepare
    if prepare is not None:  # cached uint8 pixels: crop, flip and normalise here, per batch
        images = prepare(images)
    if run.train.method != "flyp":
        labels = labels.to(run.device, non_blocking=True)
        with autocast(run.device, run.train.precision):
            return F.cross_entropy(run.model(images).float(), labels)
    texts = draw_prompts(run.prompts, labels, generator).to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    with autocast(run.device, run.train.precision):
        out = run.model(images, texts)
        return run.loss_fn(out["image_features"].float(), out["text_features"].float(),
                           out["logit_scale"].float(), labels)


def optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward, optional clipping, step, schedule, and CLIP's logit-scale clamp."""
    state = run.state
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if run.train.grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.train.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    clamp_logit_scale(unwrap(run.model))


def all_finite(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on every worker.

    With the global loss every worker sees the same value; with ``local_loss`` each sees its own
    rows, and all must agree to stop together (a lone stopping worker would hang the others).
    """
    finite = torch.isfinite(loss.detach()).float()
    if world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training data: ``train/loss``, ``train/lr``, ``train/temperature``."""
    run.model.train()
    # Seeded per (seed, epoch, rank): a resumed run draws the same prompts as an uninterrupted one.
    generator = torch.Generator().manual_seed(run.train.seed * 100_003 + epoch * 101 + run.rank)
    total, count = 0.0, 0
    for step, (images, labels, _) in enumerate(run.loader):
        loss = loss_step(run, images, labels, generator)
        if not all_finite(loss, run.world_size if run.train.local_loss else 1):
            raise TrialDiverged(f"loss is {loss.item()} at epoch {epoch}, step {step}")
        optimizer_step(run, loss)
        total += loss.item()
        count += 1
    metrics = {"train/loss": total / max(count, 1),
               "train/lr": run.state.optimizer.param_groups[0]["lr"]}
    if run.train.method == "flyp":  # the baselines keep CLIP's scale fixed
        metrics["train/temperature"] = 1.0 / unwrap(run.model).logit_scale.exp().item()
    return metrics


def head(run: Run) -> torch.Tensor:
    """The evaluation head: a classifier's own, or the zero-shot head of the text tower."""
    model = unwrap(run.model)
    if isinstance(model, ImageClassifier):
        return model.head.detach().float()
    return text_head(run.model, run.tokenizer, run.data, run.train, run.device)


def evaluate(run: Run, *, final: bool = True) -> dict[str, float]:
    """Evaluate the splits with the current head.

    Every split at the ``final`` epoch; before it, only ``train.eval_splits`` when that is set
    (a scheduler's early rungs need the search metric, not every split).
    """
    wanted = None if final else run.train.eval_splits
    splits = [s for name, s in run.data.splits.items()
              if name != "train" and (wanted is None or name in wanted)]
    return evaluate_splits(run.model, head(run), splits, batch_size=run.train.eval_batch_size,
                           device=run.device, precision=run.train.precision, rank=run.rank,
                           world_size=run.world_size, num_workers=run.eval_workers)


def final_metrics(run: Run, epoch: int) -> dict[str, float]:
    """Every split, and WiSE-FT's mixes of the starting weights and the epoch best on id_val
    when asked (the epoch FLYP selects; this one if no earlier epoch was better)."""
    metrics = evaluate(run)
    if run.train.wiseft_alphas and run.zero_shot is not None:
        model = unwrap(run.model)
        run.best.update(model, metrics, epoch)
        metrics.update(wiseft.evaluate_alphas(model, run.zero_shot, run.best.state,
                                              run.train.wiseft_alphas, lambda: evaluate(run)))
    return metrics


def interim_metrics(run: Run, epoch: int) -> dict[str, float]:
    """An epoch before the last: its splits, and with WiSE-FT asked, ``wiseft/best/...`` as far
    as known: the current weights (alpha 1) only, so that a ``wiseft/`` search objective has a
    value at every epoch for the scheduler; the full sweep runs once, at the end."""
    metrics = evaluate(run, final=False)
    if not run.train.wiseft_alphas:
        return metrics
    run.best.update(unwrap(run.model), metrics, epoch)
    return {**metrics, **{f"wiseft/best/{k}": v for k, v in metrics.items()},
            "wiseft/best/alpha": 1.0}


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
    seed_everything(cfg.train.seed)  # identical initial weights on every worker
    loaded = load_model(cfg.model, cfg.source)
    apply_temperature(loaded.model, cfg.train)
    data = load_data(cfg.dataset, loaded.preprocess_train, loaded.preprocess_eval, cfg.source)
    data = fewshot.few_shot(data, cfg.train.k_shot, cfg.train.seed + draw)
    model = prepare_model(method_model(loaded.model, loaded.tokenizer, data, cfg.train, device))
    seed_everything(cfg.train.seed + rank)  # but different augmentations per worker
    loader = prepare_loader(train_loader(data, cfg, world_size, device))
    return make_run(model, data, loaded.tokenizer, cfg.train, loader, device, rank=rank,
                    world_size=world_size, eval_workers=loader_workers(cfg))


def run_epochs(run: Run, start_epoch: int, report: Report) -> None:
    """Train from ``start_epoch`` (the last finished one) to the end, reporting each epoch.

    ``zeroshot`` trains nothing: it reports the pretrained model's metrics as epoch 0. ``lp``
    reports its one fit as epoch 1; ``lpft`` fits the probe before its first epoch.
    """
    method = run.train.method
    if method == "zeroshot":
        report(0, {"epoch": 0, **evaluate(run)})
        return
    fitted = probe.fit_probe(run) if method in ("lp", "lpft") and start_epoch == 0 else {}
    if method == "lp":
        report(1, {"epoch": 1, **fitted, **final_metrics(run, 1)})
        return
    for epoch in range(start_epoch + 1, run.train.epochs + 1):
        final = epoch == run.train.epochs
        metrics = {"epoch": float(epoch), **(fitted if epoch == 1 else {}),
                   **train_epoch(run, epoch)}
        metrics.update(final_metrics(run, epoch) if final else interim_metrics(run, epoch))
        report(epoch, metrics)


def diverged_metrics(epoch: int, objectives: dict[str, str]) -> dict[str, float]:
    """What a diverged run reports: the worst value of each objective, and a flag.

    Reporting (rather than raising) lets the search record the trial as a bad point and go on;
    a raised error would also make Ray Train restart a run that will diverge again.
    """
    worst = {m: (0.0 if mode == "max" else math.inf) for m, mode in objectives.items()}
    return {"epoch": float(epoch), "diverged": 1.0, **worst}
