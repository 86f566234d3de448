"""The MLflow module: secrets never leave in a URI, artifacts stay together, experiments and
runs say what they are and where they came from."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from flyp_ray.config import from_dict
from flyp_ray.errors import ConfigError
from flyp_ray.tracking import runs
from tests.support.configs import tiny_config


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


def test_an_experiment_created_meanwhile_by_another_search_is_used(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    class LookedBeforeTheOtherCreatedIt(MlflowClient):
        """A client whose first look-up ran just before another process created the experiment:
        the window two searches started together fall into (the store itself is real)."""

        looked = False

        def get_experiment_by_name(self, name: str):  # type: ignore[no-untyped-def]
            if not self.looked:
                self.looked = True
                return None
            return super().get_experiment_by_name(name)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created_by_the_other = MlflowClient(tracking_uri=uri).create_experiment("shared")
    client = LookedBeforeTheOtherCreatedIt(tracking_uri=uri)
    assert runs.experiment_id(client, "shared") == created_by_the_other


def test_experiments_open_as_model_training_in_mlflow_ui(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    # One experiment that an earlier version made without the tag, one whose kind a user set.
    client.create_experiment("old", artifact_location=runs.artifact_location(uri))
    client.create_experiment("chosen", artifact_location=runs.artifact_location(uri),
                             tags={runs.EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("test", "old", "chosen"):
        cfg = from_dict(tiny_config(tmp_path, tracking={"experiment": name}), "c.yaml")
        runs.start_run(cfg, "run", {runs.KIND_TAG: "train"})
    kinds = {name: client.get_experiment_by_name(name).tags.get(runs.EXPERIMENT_KIND_TAG)
             for name in ("test", "old", "chosen")}
    assert kinds == {"test": "custom_model_development", "old": "custom_model_development",
                     "chosen": "genai_development"}
    page = runs.ui_address(uri, "test")
    assert page == (f"http://127.0.0.1:5000/#/experiments/"
                    f"{client.get_experiment_by_name('test').experiment_id}"
                    f"/runs?workflowType=machine_learning")
    assert runs.ui_address(uri, "no such experiment") is None


def test_runs_name_the_command_that_made_them_as_their_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    cfg = from_dict(tiny_config(tmp_path), "search_spaces/iwildcam.yaml")

    def source(run_id: str) -> tuple[str, str]:
        tags = client.get_run(run_id).data.tags
        return tags[runs.SOURCE_NAME_TAG], tags[runs.SOURCE_TYPE_TAG]

    # What the command line sets: the command as typed. A search's trials and re-checks (made
    # in other processes, on other machines) take their parent's.
    monkeypatch.setenv(runs.COMMAND_ENV, "flyp-ray tune search_spaces/iwildcam.yaml --set lr=1")
    search = runs.start_search_run(cfg, "search-iwildcam", str(tmp_path / "s"))
    monkeypatch.delenv(runs.COMMAND_ENV)
    trial = runs.start_trial_run(cfg, search, "abc123")
    recheck = runs.start_run(cfg, "recheck-abc123-seed1", {
        runs.KIND_TAG: "recheck", runs.PARENT_TAG: search, runs.TRIAL_TAG: "abc123"})
    typed = ("flyp-ray tune search_spaces/iwildcam.yaml --set lr=1", "JOB")
    assert [source(r) for r in (search, trial, recheck)] == [typed] * 3

    # Without the command line (the package used from Python): the command of the run's kind.
    compare = runs.start_run(cfg, "compare-iwildcam", {runs.KIND_TAG: "compare"})
    method = runs.start_run(cfg, "train-iwildcam-ce", {runs.KIND_TAG: "train",
                                                       runs.PARENT_TAG: compare})
    train = runs.start_run(cfg, "train-iwildcam", {runs.KIND_TAG: "train"})
    assert source(compare) == source(method) == ("flyp-ray compare search_spaces/iwildcam.yaml",
                                                 "JOB")
    assert source(train) == ("flyp-ray train search_spaces/iwildcam.yaml", "JOB")
