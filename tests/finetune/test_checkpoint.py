"""Checkpoint contents: a host copy that training cannot change, written once, meta.json last."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from flyp_ray.config import TrainConfig
from flyp_ray.errors import FlypRayError
from flyp_ray.finetune import checkpoint
from flyp_ray.finetune.optim import build_state

CPU = torch.device("cpu")


def trained() -> tuple[torch.nn.Module, checkpoint.TrainingState]:
    """A small model after one AdamW step: the optimizer has state to save."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = build_state(model, TrainConfig(lr=0.1, warmup_steps=0), 10, CPU)
    model(torch.randn(5, 4)).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    return model, state


def test_the_host_copy_keeps_the_epochs_values_while_training_goes_on(tmp_path: Path) -> None:
    model, state = trained()
    saved = checkpoint.on_host(checkpoint.contents(model, state, 1, {"id_val/acc": 0.5}))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in state.optimizer.state_dict()["state"][0].items()}

    model(torch.randn(5, 4)).sum().backward()  # the next epoch's first step
    state.optimizer.step()

    assert all(torch.equal(saved.model[k], weights[k]) for k in weights)
    assert not all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    first = saved.training["optimizer"]["state"][0]
    assert all(torch.equal(first[k], moments[k]) for k in moments)


def test_the_next_copy_reuses_the_host_buffers_of_the_last(tmp_path: Path) -> None:
    model, state = trained()
    first = checkpoint.on_host(checkpoint.contents(model, state, 1, {}))
    buffer = first.model["0.weight"].data_ptr()
    model(torch.randn(5, 4)).sum().backward()
    state.optimizer.step()

    second = checkpoint.on_host(checkpoint.contents(model, state, 2, {}), reuse=first)
    assert second.model["0.weight"].data_ptr() == buffer  # no new allocation
    assert torch.equal(second.model["0.weight"], model[0].weight)
    assert second.training["epoch"] == 2
    moments = state.optimizer.state_dict()["state"][0]
    assert all(torch.equal(second.training["optimizer"]["state"][0][k], v)
               for k, v in moments.items())


def test_written_once_into_storage_and_read_back(tmp_path: Path) -> None:
    model, state = trained()
    folder = tmp_path / "run" / "epoch_0001"
    saved = checkpoint.on_host(checkpoint.contents(model, state, 1, {"id_val/acc": 0.5},
                                                   {"method": "flyp"}))
    checkpoint.write(saved, str(folder), pyarrow.fs.LocalFileSystem())

    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt", "training.pt"]
    assert json.loads((folder / "meta.json").read_text()) == {
        "epoch": 1, "metrics": {"id_val/acc": 0.5}, "method": "flyp"}
    restored_model, restored_state = trained()
    torch.nn.init.zeros_(restored_model[0].weight)
    checkpoint.load_weights(folder, restored_model)
    assert checkpoint.load_training(folder, restored_state) == 1
    assert torch.equal(restored_model[0].weight, model[0].weight)
    assert restored_state.scheduler.last_epoch == state.scheduler.last_epoch


def test_a_folder_that_cannot_be_made_names_its_path(tmp_path: Path) -> None:
    model, state = trained()
    (tmp_path / "epoch_0001").write_text("a file in the way\n")
    saved = checkpoint.contents(model, state, 1, {})
    with pytest.raises(FlypRayError, match=f"cannot write checkpoint to {tmp_path}/epoch_0001"):
        checkpoint.write(saved, str(tmp_path / "epoch_0001"))
