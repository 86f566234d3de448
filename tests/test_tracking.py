"""The MLflow module's pure helpers: secrets never leave in a URI, artifacts stay together."""

from __future__ import annotations

from pathlib import Path

import pytest

from flyp_ray import tracking
from flyp_ray.errors import ConfigError


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@mlflow:5000", "http://alice:***@mlflow:5000"),
    ("https://mlflow:5000/?token=abc&x=1", "https://mlflow:5000/?token=***&x=1"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("http://mlflow:5000", "http://mlflow:5000"),
])
def test_redact(uri: str, shown: str) -> None:
    assert tracking.redact(uri) == shown


def test_unreachable_or_impossible_uri_fails_before_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tracking.uri: MLflow server unreachable at 'http://u:\*\*\*@127.0.0.1:9/'"):
        tracking.check_uri("http://u:pw@127.0.0.1:9/", "c.yaml")
    with pytest.raises(ConfigError, match="no file store"):
        tracking.check_uri(str(tmp_path / "mlruns"), "c.yaml")
    with pytest.raises(ConfigError, match="folder of the database does not exist"):
        tracking.check_uri(f"sqlite:///{tmp_path}/missing/mlflow.db", "c.yaml")


def test_sqlite_artifacts_live_beside_the_database(tmp_path: Path) -> None:
    location = tracking.artifact_location(f"sqlite:///{tmp_path}/mlflow.db")
    assert location == (tmp_path / "mlartifacts").as_uri()
    assert tracking.artifact_location("http://mlflow:5000") is None
