"""A real MLflow server with basic auth, set up as deploy/mlflow does it, and the project's client.

The server refuses a request without credentials (401) and one for a foreign Host (403); the
project's tracking module logs a run once MLFLOW_TRACKING_USERNAME/PASSWORD are set.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flyp_ray import config
from flyp_ray.tracking import runs
from tests.support.configs import tiny_config, write_config
from tests.support.servers import free_port, start_mlflow_server, stop_server

ADMIN, PASSWORD = "admin", "a-long-test-password-0123"


def status_of(url: str, headers: dict[str, str]) -> int:
    """The HTTP status of a GET, errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def basic(user: str, password: str) -> dict[str, str]:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.mark.slow
def test_basic_auth_server_refuses_strangers_and_takes_the_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # deploy/mlflow/start-mlflow.sh's settings, with sqlite stores instead of Postgres.
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                   f"admin_username = {ADMIN}\n"
                   f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(
        tmp_path, port, "--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port}",
        env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
             "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key-0123456789abcdef"})
    try:
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status_of(api, {}) == 401
        assert status_of(api, basic(ADMIN, "wrong")) == 401
        assert status_of(api, {**basic(ADMIN, PASSWORD), "Host": "evil.example:5000"}) == 403
        assert status_of(api, basic(ADMIN, PASSWORD)) == 200

        raw = tiny_config(tmp_path, tracking={"uri": uri, "experiment": "auth"})
        cfg = config.load(write_config(tmp_path / "c.yaml", raw))
        runs.check_uri(uri, cfg.source)  # the pre-flight check passes the auth wall
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
            runs.start_run(cfg, "no-credentials", {runs.KIND_TAG: "train"})

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        run_id = runs.start_run(cfg, "with-credentials", {runs.KIND_TAG: "train"})
        runs.log_metrics(uri, run_id, {"id_val/acc": 0.5}, step=1)
        runs.end_run(uri, run_id)
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    finally:
        stop_server(server)
    assert run.data.metrics["id_val/acc"] == 0.5
    assert run.data.params["lr"] == "0.001"
    assert run.info.status == "FINISHED"
