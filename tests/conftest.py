"""Shared fixtures: one local Ray instance for the session, the tiny model, an MLflow server,
and WILDS-format folders that the real WILDS loader reads. Helpers live in ``tests/support``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Quiet, small Ray for a 2-core machine; set before ray is imported anywhere.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Under pytest-xdist each test process has a Ray folder of its own: the `ray start` heads some
# tests run write the machine's ray_current_cluster there, which a command without RAY_ADDRESS
# joins. In a shared /tmp/ray, another process's command would join that head.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["RAY_TMPDIR"] = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"),
                                            os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

from flyp_ray.distributed.cluster import runtime_env  # noqa: E402
from flyp_ray.finetune.model import tiny_config_path  # noqa: E402
from tests.support import REPO  # noqa: E402
from tests.support.models import ImageSet, image_set  # noqa: E402
from tests.support.servers import free_port, start_mlflow_server, stop_server  # noqa: E402
from tests.support.wilds_folder import write_camelyon17, write_fmow, write_iwildcam  # noqa: E402


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray cluster shared by every test that needs Ray; shut down at the end."""
    import ray

    # Ray workers import test modules by their package name (tests.<wing>.test_x): functions
    # defined in tests run there too, so the repository root goes on their path. "local": a
    # Ray of the session's own, even where a `ray start` cluster runs on the machine (without
    # it, ray.init joins that one, and refuses num_cpus). Workers' and actors' output is not
    # forwarded here: an actor left by one test can print late, into a later test's captured
    # stderr, breaking its check that an error is one line. Their logs stay under Ray's
    # session folder, and Train raises a worker's traceback to the driver.
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False, runtime_env=runtime_env({"PYTHONPATH": str(REPO)}, local=True))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    """The path of the tiny open_clip model-config JSON shipped with the package."""
    return str(tiny_config_path())


@pytest.fixture(scope="session")
def tiny_vit_arch() -> str:
    """The tiny ViT config: no BatchNorm, so data parallel is exactly one big batch."""
    return str(tiny_config_path(vit=True))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server for the session, stopped by its PID at the end."""
    port = free_port()
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    stop_server(server)


@pytest.fixture(scope="session")
def wilds_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WILDS root_dir with small iWildCam, FMoW and Camelyon17 folders in WILDS' layouts."""
    root = tmp_path_factory.mktemp("wilds")
    write_iwildcam(root, n_per_split=8, num_classes=4)
    write_fmow(root, n_per_split=8)
    write_camelyon17(root, n_per_split=8)
    return root


@pytest.fixture(scope="session")
def served_images(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    """A registered model (``models:/flyp-served@champion``) and PNG/JPEG files of a csv data
    set, with what ``flyp-ray eval``'s code predicts for each: shared by the serving tests."""
    return image_set(tmp_path_factory.mktemp("served"))
