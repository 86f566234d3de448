"""Training checkpoints as a folder of state dicts, loaded with ``weights_only=True``.

A folder (not one pickle) so that Ray Train can move it to its storage as it is, and so that
the model weights can be read without the optimizer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from flyp_ray.errors import ConfigError, FlypRayError, ModelError, first_line

MODEL = "model.pt"
TRAINING = "training.pt"
META = "meta.json"


@dataclasses.dataclass
class TrainingState:
    """What a resumed run needs besides the model weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


@dataclasses.dataclass(frozen=True)
class Contents:
    """What a checkpoint folder holds: everything a resume needs, and nothing else.

    The model's weights (also what the logged model is built from), the optimizer, schedule and
    loss-scaler state with the epoch, and meta.json (epoch, metrics, the prompts).
    """

    model: dict[str, Any]
    training: dict[str, Any]
    meta: dict[str, Any]


def contents(model: torch.nn.Module, state: TrainingState, epoch: int,
             metrics: dict[str, float], extra: dict[str, Any] | None = None) -> Contents:
    """A checkpoint's contents, referring to the live tensors (see :func:`on_host`)."""
    return Contents(model=model.state_dict(),
                    training={"optimizer": state.optimizer.state_dict(),
                              "scheduler": state.scheduler.state_dict(),
                              "scaler": state.scaler.state_dict(), "epoch": epoch},
                    meta={"epoch": epoch, "metrics": metrics, **(extra or {})})


def on_host(saved: Contents, reuse: Contents | None = None) -> Contents:
    """A copy in host memory, so that training can change the weights while a thread writes it.

    ``reuse``: an earlier copy whose write has finished; its buffers take the new values in
    place, so that only the first checkpoint of a run allocates (and, from a GPU, pins) its
    host memory: 1.8 GB of fresh pages for a ViT-B/16 with AdamW every epoch cost seconds of
    page faults. Copies from a GPU are queued without blocking and waited for once, at the end.
    """
    copied = Contents(_copied(saved.model, reuse.model if reuse else None),
                      _copied(saved.training, reuse.training if reuse else None), saved.meta)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the queued copies have landed before a thread reads them
    return copied


def _copied(value: Any, into: Any = None) -> Any:
    if isinstance(value, torch.Tensor):
        source = value.detach()
        if not (isinstance(into, torch.Tensor) and into.shape == source.shape
                and into.dtype == source.dtype):
            into = torch.empty(source.shape, dtype=source.dtype, device="cpu",
                               pin_memory=source.is_cuda)
        return into.copy_(source, non_blocking=source.is_cuda)
    if isinstance(value, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _copied(v, into.get(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(value) else \
            [None] * len(value)
        return type(value)(_copied(v, i) for v, i in zip(value, into, strict=True))
    return value


def write(saved: Contents, folder: str, fs: pyarrow.fs.FileSystem | None = None) -> str:
    """Write ``saved`` into ``folder`` on ``fs`` (the local disk if None), meta.json last.

    Each file is written once, where it stays: into the run's storage directly, not into a
    local folder that is then copied there. meta.json comes last, so a folder without it was cut
    short (a killed worker); Ray never lists such a folder as a checkpoint.
    """
    fs = fs or pyarrow.fs.LocalFileSystem()
    try:
        fs.create_dir(folder, recursive=True)
        for name, value in ((MODEL, saved.model), (TRAINING, saved.training)):
            with fs.open_output_stream(f"{folder}/{name}") as out:
                torch.save(value, out)
        with fs.open_output_stream(f"{folder}/{META}") as out:
            out.write(json.dumps(saved.meta, indent=1).encode())
    except OSError as err:
        raise FlypRayError(f"cannot write checkpoint to {folder}: "
                           f"{err.strerror or first_line(err)}") from err
    return folder


def save(folder: Path, model: torch.nn.Module, state: TrainingState, epoch: int,
         metrics: dict[str, float], extra: dict[str, Any] | None = None) -> Path:
    """Write the model, the training state and a JSON of epoch and metrics into ``folder``."""
    write(contents(model, state, epoch, metrics, extra), str(folder))
    return folder


def check_storage(storage: str, source: str) -> None:
    """Fail before Ray starts when ``storage`` (a folder or a URI) cannot take a checkpoint.

    Writes and deletes a small probe file: permission bits say nothing when running as root,
    nor about a read-only mount or a full disk, and a run would otherwise fail at its first
    checkpoint, after the first epoch. Folders it had to create are removed again, so that a
    run refused later (bad input found after this check) leaves nothing behind.
    """
    probe_name = f".flyp_ray-write-test-{uuid.uuid4().hex[:8]}"
    try:
        if "://" in storage and not storage.startswith("file://"):
            fs, root = pyarrow.fs.FileSystem.from_uri(storage)
            with fs.open_output_stream(f"{root.rstrip('/')}/{probe_name}") as out:
                out.write(b"0" * 4096)
            fs.delete_file(f"{root.rstrip('/')}/{probe_name}")
        else:
            _probe_folder(Path(storage.removeprefix("file://")).expanduser().resolve(), probe_name)
    except (OSError, pyarrow.ArrowException) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(source, "storage", f"cannot write checkpoints to {storage!r}: "
                                             f"{reason.splitlines()[0]}") from None


def _probe_folder(folder: Path, probe_name: str) -> None:
    """Write and delete a probe file in ``folder``; remove the folders made for it."""
    created = []
    probe = folder / probe_name
    try:
        for parent in [*reversed(folder.parents), folder]:
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        probe.write_bytes(b"0" * 4096)
    finally:
        with contextlib.suppress(OSError):  # the error that matters is the one above
            probe.unlink(missing_ok=True)
            for made in reversed(created):
                made.rmdir()


def save_marker(folder: Path, epoch: int, metrics: dict[str, float], error: str) -> Path:
    """A checkpoint folder with only the JSON: marks a run that ended without usable weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).write_text(json.dumps({"epoch": epoch, "metrics": metrics, "error": error}))
    return folder


def resume_source(value: str) -> str:
    """A ``--resume-from`` checkpoint as the workers can open it: a URI as given, a local folder
    made absolute (workers run in folders of their own), refused at once if it holds no model."""
    if "://" in value:
        return value
    folder = Path(value).expanduser().resolve()
    if not (folder / MODEL).is_file():
        raise ModelError(f"--resume-from: no checkpoint at '{value}' (no {MODEL} in it)")
    return str(folder)


def model_file(folder: Path | str) -> Path:
    """The weights file of a checkpoint folder, or the path itself if it is a file."""
    path = Path(folder)
    return path / MODEL if path.is_dir() else path


def read_weights(folder: Path | str) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint folder (or a bare state-dict file), on the CPU."""
    file = model_file(folder)
    if not file.is_file():
        raise ModelError(f"checkpoint not found: {file}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(folder: Path | str, model: torch.nn.Module) -> dict[str, Any]:
    """Load the model weights of a checkpoint folder (or a bare state-dict file); returns meta."""
    file = model_file(folder)
    state = read_weights(file)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(f"checkpoint {file} does not fit the model: {first}") from None
    return load_meta(folder)


def load_meta(folder: Path | str) -> dict[str, Any]:
    """The meta.json of a checkpoint folder: epoch, metrics, method, prompts; {} for a file."""
    meta = Path(folder) / META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_training(folder: Path, state: TrainingState) -> int:
    """Restore optimizer, scheduler and scaler; returns the epoch the checkpoint finished."""
    saved = torch.load(folder / TRAINING, map_location="cpu", weights_only=True)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    return int(saved["epoch"])
