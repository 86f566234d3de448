"""Pieces the bench scripts share: a FLYP step on random data, its FLOPs, and robust timing.

The step is the package's own (``loop.loss_step`` then ``loop.optimizer_step``) on a ``Run``
built around random images and real prompt tokens, so a figure here is a figure of the code that
trains.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch

from flyp_ray.config import TrainConfig
from flyp_ray.data import synthetic
from flyp_ray.data.base import Data, Split
from flyp_ray.finetune.loop import loss_step, optimizer_step
from flyp_ray.finetune.loss import FlypLoss
from flyp_ray.finetune.model import resolve_arch
from flyp_ray.finetune.optim import build_state
from flyp_ray.finetune.run import Run, prompt_tokens

CONFIGS = Path(__file__).parent / "configs"
TEMPLATES = ["a photo of a {}.", "a picture of a {}."]


def worker_path(*folders: str) -> str:
    """``PYTHONPATH`` for a Ray worker: ``folders`` ahead of this process's own.

    A runtime_env's variable replaces the raylet's, so a PYTHONPATH naming only the bench folder
    leaves workers unable to import Ray itself wherever the packages come from PYTHONPATH (the
    worker then never starts and ``fit()`` waits for ever).
    """
    return os.pathsep.join([*folders, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def arch_path(arch: str) -> str:
    """An arch name, or a bench config JSON given by its stem (e.g. ``bench-vit-s``)."""
    local = CONFIGS / f"{arch}.json"
    return str(local) if local.is_file() else arch


@dataclasses.dataclass
class Step:
    """One FLYP training step on a fixed random batch."""

    run: Run
    images: torch.Tensor
    labels: torch.Tensor

    def __call__(self) -> None:
        loss = loss_step(self.run, self.images, self.labels, torch.Generator().manual_seed(0))
        optimizer_step(self.run, loss)


def build_step(arch: str, *, batch: int, image_size: int | None, precision: str,
               device: torch.device, seed: int = 0, grad_checkpointing: bool = False) -> Step:
    """A FLYP step of open_clip ``arch`` (random weights) on a random batch of ``batch`` pairs."""
    torch.manual_seed(seed)
    name = resolve_arch(arch_path(arch))
    kwargs = {"force_image_size": image_size} if image_size else {}
    model = open_clip.create_model(name, pretrained=None, output_dict=True, **kwargs).to(device)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(name)
    train = TrainConfig(precision=precision, warmup_steps=10, lr=1e-5)  # type: ignore[arg-type]
    classnames = list(synthetic.CLASSNAMES)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(len(classnames), (batch,))
    split = Split("train", torch.utils.data.TensorDataset(images, labels), labels, None, None)
    data = Data(classnames, TEMPLATES, {"train": split})
    state = build_state(model, train, 10**6, device)
    run = Run(model, data, tokenizer, train, [], FlypLoss(), state,  # type: ignore[arg-type]
              prompt_tokens(tokenizer, classnames, TEMPLATES), device)
    if device.type == "cuda":
        images = images.pin_memory()
    return Step(run, images, labels)


def step_flops(step: Step) -> int:
    """FLOPs of one step (forward, loss, backward) counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = loss_step(step.run, step.images, step.labels, torch.Generator().manual_seed(0))
        loss.backward()
    step.run.state.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over ``steps`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """min..max as a percentage around the median: the noise of a measurement."""
    mid = median(values)
    if mid == 0 or len(values) < 2:
        return "n/a"
    return f"{100 * (min(values) / mid - 1):+.1f}%..{100 * (max(values) / mid - 1):+.1f}%"


def machine() -> str:
    """A one-line description of where the figures came from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()}-core CPU ({_cpu_name()}), torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
