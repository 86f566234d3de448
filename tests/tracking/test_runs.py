"""The MLflow module's pure helpers: secrets never leave in a URI, artifacts stay together."""

from __future__ import annotations

from pathlib import Path

import pytest

from flyp_ray.errors import ConfigError
from flyp_ray.tracking import runs


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@mlflow:5000", "http://alice:***@mlflow:5000"),
    ("https://mlflow:5000/?token=abc&x=1", "https://mlflow:5000/?token=***&x=1"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("http://mlflow:5000", "http://mlflow:5000"),
])
def test_redact(uri: str, shown: str) -> None:
    assert runs.redact(uri) == shown


def test_unreachable_or_impossible_uri_fails_before_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tracking.uri: MLflow server unreachable at 'http://u:\*\*\*@127.0.0.1:9/'"):
        runs.check_uri("http://u:pw@127.0.0.1:9/", "c.yaml")
    with pytest.raises(ConfigError, match="no file store"):
        runs.check_uri(str(tmp_path / "mlruns"), "c.yaml")
    with pytest.raises(ConfigError, match="folder of the database does not exist"):
        runs.check_uri(f"sqlite:///{tmp_path}/missing/mlflow.db", "c.yaml")


def test_sqlite_artifacts_live_beside_the_database(tmp_path: Path) -> None:
    location = runs.artifact_location(f"sqlite:///{tmp_path}/mlflow.db")
    assert location == (tmp_path / "mlartifacts").as_uri()
    assert runs.artifact_location("http://mlflow:5000") is None


@pytest.mark.slow
def test_metrics_survive_an_mlflow_outage(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from tests.support.servers import free_port, start_mlflow_server, stop_server

    # Fail fast while the server is down: MLflow's own client would otherwise retry for minutes.
    # A stopped server refuses the connection at once; the timeout only bounds a request to the
    # restarted one, which on a loaded machine may take seconds to answer its first requests.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setattr(runs.time, "sleep", lambda seconds: None)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    runs.log_metrics(uri, run_id, {"id_val/acc": 0.1}, step=1)

    stop_server(server)
    runs.log_metrics(uri, run_id, {"id_val/acc": 0.2}, step=2)  # the server is gone
    assert not runs.flush(uri, run_id)

    server = start_mlflow_server(tmp_path, port)
    try:
        runs.log_metrics(uri, run_id, {"id_val/acc": 0.3}, step=3)
        history = client.get_metric_history(run_id, "id_val/acc")
    finally:
        stop_server(server)
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
