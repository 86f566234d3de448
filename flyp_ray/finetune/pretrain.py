"""A short CLIP pre-training of the tiny model on synthetic image-caption pairs, cached on disk.

The demo finetunes with FLYP from a model that already has zero-shot ability, as a real CLIP
does. This module builds that start: the tiny open_clip model, randomly initialised, trained with
CLIP's contrastive loss on *captions* ("a large red circle on a plain white background"), never on
the class prompts that zero-shot evaluation uses ("a photo of a circle."). What reaches the
prompts is what the towers learned about the words, which gives an honest zero-shot start.

The caption images come from the synthetic generator under a seed of their own, so none of them
is an image of the data set's train, val or test splits. Most are in-distribution (light plain
backgrounds); a small share shows the out-of-distribution backgrounds, as a broad pre-training
corpus would, while the finetuning data stays in-distribution only.

The result is a plain state dict saved with ``torch.save``: ``model.pretrained: <path>`` in a
config loads it through ``open_clip.create_model_and_transforms(..., weights_only=True)``.

Run: ``python -m flyp_ray.finetune.pretrain`` prints the cached checkpoint's path (training it
if absent).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from flyp_ray.config import ModelConfig, TrainConfig, resolve_recipe
from flyp_ray.data import synthetic
from flyp_ray.finetune.loss import FlypLoss
from flyp_ray.finetune.model import clamp_logit_scale, load_model, tiny_config_path
from flyp_ray.finetune.optim import build_optimizer

log = logging.getLogger(__name__)

# Bump whenever the recipe below changes what a given (config, steps, seed) produces: it is part
# of the cache key, so old checkpoints are then ignored rather than reused.
# 2: one CPU thread always (version 1 took as many as were idle: its weights followed the load).
VERSION = 2
DEFAULT_STEPS = 100  # about 20-25 s on one CPU core; zero-shot id_val ~0.45-0.6
# Float sums reduce in another order with another thread count, and the weights differ after a
# few steps (zero-shot id_val 0.537 on one thread, 0.550 on two, bench/pretrain_spread.py):
# one thread makes the demo's start the same on every run and every load of a machine.
THREADS = 1
BATCH_SIZE = 128  # pairs per step: the contrastive loss sees 127 negatives per image
LR = 2e-3  # AdamW peak; a tiny model from random weights wants a large step
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 20
# This *is* CLIP pre-training, so it keeps CLIP's recipe (betas 0.9/0.98, eps 1e-6, no decay on
# gains and biases, logit scale clamped at 100) whatever finetuning's default is.
RECIPE = resolve_recipe(TrainConfig(recipe="clip", lr=LR, weight_decay=WEIGHT_DECAY))
POOL_SIZE = 3072  # caption images, drawn once and reused across steps
OOD_SHARE = 0.1  # of the pool on dark noisy or striped backgrounds
# The data set itself uses seed 0; this one gives other images of the same kinds.
POOL_SEED = 7919
LOG_EVERY = 25


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flyp-ray`` (``~/.cache/flyp-ray`` when the variable is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "flyp-ray"


def cache_key(steps: int, seed: int) -> str:
    """A short hash of everything the checkpoint depends on: config JSON, steps, seed, VERSION."""
    digest = hashlib.sha256()
    digest.update(tiny_config_path().read_bytes())
    digest.update(f"|steps={steps}|seed={seed}|version={VERSION}".encode())
    return digest.hexdigest()[:16]


def cache_path(steps: int = DEFAULT_STEPS, seed: int = 0) -> Path:
    """Where :func:`pretrain_tiny` keeps the checkpoint of ``(steps, seed)`` by default."""
    return cache_dir() / f"flyp-tiny-pretrained-{cache_key(steps, seed)}.pt"


def pretrain_tiny(out: Path | None = None, *, steps: int = DEFAULT_STEPS, seed: int = 0) -> Path:
    """Pre-train the tiny model on synthetic captions and return the checkpoint file.

    With ``out`` None the file goes to :func:`cache_path` and an existing one is reused without
    training. An explicit ``out`` is always (re)written. Either way the file appears atomically.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    target = cache_path(steps, seed) if out is None else Path(out)
    if out is None and target.is_file():
        log.debug("pretrained tiny model found in the cache: %s", target)
        return target
    start = time.perf_counter()
    # fork_rng: seeding here must not change the caller's random stream.
    with _threads(THREADS), torch.random.fork_rng(devices=[]):
        model = train(steps=steps, seed=seed)
    _save_atomically(model.state_dict(), target)
    log.info("pretrained tiny model (%d steps, %.0f s) written to %s", steps,
             time.perf_counter() - start, target)
    return target


def train(*, steps: int, seed: int) -> torch.nn.Module:
    """The tiny model after ``steps`` contrastive steps on the caption pool (CPU, one process)."""
    torch.manual_seed(seed)
    loaded = load_model(ModelConfig(arch=str(tiny_config_path()), pretrained=None),
                        "pretrain", warn_random=False)
    model = loaded.model.train()
    start = time.perf_counter()
    images, tokens = caption_pool(loaded.preprocess_eval, loaded.tokenizer)
    log.debug("caption pool: %d images in %.1f s", len(images), time.perf_counter() - start)
    optimizer = build_optimizer(model, RECIPE, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    loss_fn = FlypLoss()  # "negative": the plain CLIP loss
    generator = torch.Generator().manual_seed(seed)
    for step, batch in enumerate(_batches(len(images), steps, generator), start=1):
        variant = torch.randint(tokens.shape[1], (len(batch),), generator=generator)
        out = model(images[batch], tokens[batch, variant])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        clamp_logit_scale(model, RECIPE.max_logit_scale)
        if step % LOG_EVERY == 0 or step == steps:
            log.debug("pretrain step %d/%d: loss %.3f, temperature %.4f", step, steps,
                      loss.item(), 1.0 / model.logit_scale.detach().exp().item())  # type: ignore[operator]
    return model.eval()


def caption_pool(preprocess: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool: preprocessed images [N, 3, H, W] and caption tokens [N, variants, context].

    Mostly ID images, ``OOD_SHARE`` of them OOD. Each image has several captions (see
    :func:`captions`); training draws one of them per image and step.
    """
    num_ood = round(POOL_SIZE * OOD_SHARE)
    # "train" draws only ID backgrounds and "ood_val" only OOD ones; POOL_SEED keeps every draw
    # apart from the data set's own images (seed 0).
    sources = [synthetic.ShapesSplit("train", seed=POOL_SEED, size=POOL_SIZE - num_ood),
               synthetic.ShapesSplit("ood_val", seed=POOL_SEED, size=num_ood)]
    images = [preprocess(s.image(i)) for s in sources for i in range(len(s))]
    texts = [captions(s.split, i, s.seed) for s in sources for i in range(len(s))]
    tokens = tokenizer([t for variants in texts for t in variants])
    return torch.stack(images), tokens.view(len(texts), len(texts[0]), -1)


def captions(split: str, index: int, seed: int) -> tuple[str, str, str]:
    """The full caption of a synthetic image and two shorter ones, as a web corpus would vary.

    None is a class prompt: each names the shape together with its colour or its background.
    """
    d = synthetic.draw(split, index, seed)
    shape = synthetic.CLASSNAMES[d.label]
    return (synthetic.caption(split, index, seed),
            f"a {d.colour} {shape}",
            f"a {shape} on a {synthetic.BACKGROUNDS[d.background]} background")


def _batches(pool: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of pool indices, each pass over the pool in a fresh random order."""
    order = torch.randperm(pool, generator=generator)
    at = 0
    for _ in range(steps):
        if at + BATCH_SIZE > pool:
            order, at = torch.randperm(pool, generator=generator), 0
        yield order[at:at + BATCH_SIZE]
        at += BATCH_SIZE


def _lr_factor(step: int, steps: int) -> float:
    warmup = min(WARMUP_STEPS, max(1, steps // 5))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Train on ``count`` CPU threads, then restore the caller's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    log.info("pre-training: %d steps on %d CPU thread%s, about 30 s", DEFAULT_STEPS, count,
             "" if count == 1 else "s")
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _save_atomically(state: dict[str, torch.Tensor], target: Path) -> None:
    """Write to a temporary file in the target's folder, then rename: never a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    print(pretrain_tiny())
