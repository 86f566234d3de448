"""Both servers of the registered model, over real HTTP: ``mlflow models serve`` and
``flyp-ray serve`` (Ray Serve), sent the same requests with the same PNG/JPEG files.

Each runs as a user runs it, a process of its own (``flyp-ray serve`` with its own local Ray);
both start side by side once for the module and are stopped by their PID, ``flyp-ray serve``
with SIGTERM as Ctrl-C would. The labels must be what ``flyp-ray eval``'s code predicts for the
same files (``served_images`` in conftest), and the two servers must agree.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flyp_ray import cli
from flyp_ray.errors import BadInput
from flyp_ray.serve import app
from tests.support import REPO
from tests.support.models import ImageSet, check_answer, post_json, probabilities, split_request
from tests.support.servers import (
    free_port,
    launch_model_server,
    stop_gracefully,
    stop_server,
    wait_until_healthy,
)

# How long the first request of a batch waits for more. The concurrent requests below leave
# together (a barrier) and need only reach the replica within this; every request sent alone
# waits it out, so it costs each of the few sequential requests here that long.
BATCH_WAIT_S = 2.0
START_S = 300  # both start at once on a small machine: a Ray cluster, a uvicorn, two models
LOG_S = 120  # Ray forwards a replica's log lines to the command's stderr within seconds


@dataclasses.dataclass
class Servers:
    mlflow: str  # mlflow models serve's URL
    flyp: str  # flyp-ray serve's URL
    flyp_log: Path

    @property
    def both(self) -> list[str]:
        return [self.mlflow, self.flyp]


@pytest.fixture(scope="module")
def servers(served_images: ImageSet, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("servers")
    env = {"MLFLOW_TRACKING_URI": served_images.tracking_uri, "PYTHONPATH": str(REPO)}
    ports = {"mlflow": free_port(), "flyp": free_port()}
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    started: dict[str, subprocess.Popen[bytes]] = {}
    started["mlflow"] = launch_model_server(
        [mlflow_cli, "models", "serve", "-m", served_images.uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(ports["mlflow"])], folder / "mlflow.log", env)
    started["flyp"] = launch_model_server(
        [sys.executable, "-m", "flyp_ray", "serve", served_images.uri,
         "--port", str(ports["flyp"]), "--replicas", "1", "--max-batch-size", "8",
         "--batch-wait-s", str(BATCH_WAIT_S)], folder / "flyp.log", env)
    try:
        for name, server in started.items():
            wait_until_healthy(server, f"http://127.0.0.1:{ports[name]}/ping",
                               folder / f"{name}.log", START_S)
        yield Servers(f"http://127.0.0.1:{ports['mlflow']}", f"http://127.0.0.1:{ports['flyp']}",
                      folder / "flyp.log")
    finally:
        stop_server(started["mlflow"])
        code = stop_gracefully(started["flyp"])
    # SIGTERM: flyp-ray serve took Serve and its Ray down and exited as a stopped server does
    assert code == 0, (folder / "flyp.log").read_text()[-3000:]


def both(servers: Servers, payload: Any) -> list[tuple[int, Any]]:
    """The same request to both servers: [(status, answer) of mlflow, of flyp-ray]."""
    return [post_json(f"{url}/invocations", payload) for url in servers.both]


@pytest.mark.slow
def test_both_answer_with_eval_labels_and_agree(servers: Servers,
                                                served_images: ImageSet) -> None:
    b64 = served_images.b64()
    requests = [(split_request(b64), list(range(len(b64)))),  # a batch: 4 PNG, 4 JPEG
                ({"dataframe_records": [{"image": b64[6]}, {"image": b64[1]}]}, [6, 1]),
                ({"inputs": {"image": [b64[3]]}}, [3])]
    for payload, rows in requests:
        (status_m, answer_m), (status_f, answer_f) = both(servers, payload)
        assert (status_m, status_f) == (200, 200), (answer_m, answer_f)
        check_answer(answer_m["predictions"], served_images, rows)
        check_answer(answer_f["predictions"], served_images, rows)
        assert set(answer_f) == set(answer_m) == {"predictions"}
        np.testing.assert_allclose(
            probabilities(answer_f["predictions"], served_images.classnames),
            probabilities(answer_m["predictions"], served_images.classnames), atol=1e-6)
    # flyp-ray serve's JSON line (first on its stdout): the alias pinned to its version
    assert '"model": "models:/flyp-served/1"' in servers.flyp_log.read_text()


@pytest.mark.slow
def test_bad_row_is_a_400_naming_it_and_both_go_on(servers: Servers,
                                                   served_images: ImageSet) -> None:
    b64 = served_images.b64()
    not_an_image = base64.b64encode(b"GIF89a? no, just text").decode()
    for status, answer in both(servers, split_request([b64[0], not_an_image, ""])):
        assert status == 400
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "row 1: not a JPEG or PNG image" in answer["message"]
        assert "row 2: empty" in answer["message"]
    for status, answer in both(servers, {"columns": ["image"]}):  # no known input format
        assert status == 400 and answer["error_code"] == "BAD_REQUEST"
        assert "dataframe_split" in answer["message"]
    for status, answer in both(servers, split_request(b64[:2])):
        assert status == 200
        check_answer(answer["predictions"], served_images, [0, 1])


@pytest.mark.slow
def test_concurrent_requests_share_a_batch_and_a_bad_one_fails_alone(
        servers: Servers, served_images: ImageSet) -> None:
    url = f"{servers.flyp}/invocations"
    b64 = served_images.b64()
    bad = base64.b64encode(b"not an image").decode()
    requests = [split_request([b64[0], b64[7]]), split_request([b64[2]]),
                split_request([b64[5], bad]), split_request([b64[4]])]
    together = threading.Barrier(len(requests))

    def send(payload: Any) -> tuple[int, Any]:
        together.wait()  # all threads started: the requests leave at once
        return post_json(url, payload)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(send, requests))
    (status0, answer0), (status1, answer1), (status2, answer2), (status3, answer3) = answers
    assert (status0, status1, status3) == (200, 200, 200)
    check_answer(answer0["predictions"], served_images, [0, 7])
    check_answer(answer1["predictions"], served_images, [2])
    check_answer(answer3["predictions"], served_images, [4])
    assert status2 == 400
    assert answer2["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer2["message"].startswith("row 1: not a JPEG or PNG image")
    # The replica logs each model call: at least one served several requests at once. Ray
    # forwards the replica's log lines to the command's stderr a little later.
    batched = [f"{app.BATCH_LOG} {n} requests" for n in (2, 3, 4)]
    deadline = time.monotonic() + LOG_S
    while not any(b in servers.flyp_log.read_text() for b in batched):
        assert time.monotonic() < deadline, [line for line in servers.flyp_log.read_text()
                                             .splitlines() if app.BATCH_LOG in line]
        time.sleep(0.5)


@pytest.mark.slow
def test_ping_and_unknown_paths(servers: Servers) -> None:
    for url in servers.both:
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as reply:
            assert reply.status == 200
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{url}/nothing", timeout=10)
        assert caught.value.code == 404


# --- without a server ----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--replicas", "0"], ["--port", "70000"],
                                  ["--max-batch-size", "0"]])
def test_bad_options_exit_2_before_ray_starts(argv: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "models:/anything/1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyp-ray: error: "), err


def test_unknown_model_exits_2(served_images: ImageSet, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_images.tracking_uri)
    assert cli.main(["serve", "models:/flyp-served@no-such-alias", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models:/flyp-served@no-such-alias" in err[0], err


def test_build_app_refuses_unknown_args() -> None:
    with pytest.raises(BadInput, match="unknown key 'replica'"):
        app.build_app({"model_uri": "models:/m/1", "replica": 2})
    bound = app.build_app({"model_uri": "models:/m/1", "replicas": 2, "max_batch_size": 4})
    assert bound is not None
