"""``flyp-ray serve``: the logged model behind Ray Serve, answering as ``mlflow models serve``.

The command runs as a user runs it (a process of its own, with its own local Ray), started once
for the module and stopped by its PID with SIGTERM, as Ctrl-C would. Real HTTP, the PNG/JPEG
files of ``served_images`` (conftest), labels checked against ``flyp-ray eval``'s code.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flyp_ray import cli
from flyp_ray.errors import BadInput
from flyp_ray.serve import app
from tests.support import REPO
from tests.support.models import ImageSet, check_answer, post_json, split_request
from tests.support.servers import free_port, start_model_server, stop_gracefully

BATCH_WAIT_S = 0.5  # long enough that the concurrent requests below meet in one batch


@dataclasses.dataclass
class Server:
    url: str
    log: Path


@pytest.fixture(scope="module")
def flyp_ray_serve(served_images: ImageSet, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("flyp-ray-serve") / "server.log"
    server = start_model_server(
        [sys.executable, "-m", "flyp_ray", "serve", served_images.uri, "--port", str(port),
         "--replicas", "1", "--max-batch-size", "8", "--batch-wait-s", str(BATCH_WAIT_S)],
        log, port, env={"MLFLOW_TRACKING_URI": served_images.tracking_uri,
                        "PYTHONPATH": str(REPO)})
    yield Server(f"http://127.0.0.1:{port}", log)
    code = stop_gracefully(server)
    assert code == 0, log.read_text()[-3000:]  # SIGTERM: Serve and its Ray taken down


@pytest.mark.slow
def test_serve_answers_as_mlflow_models_serve(flyp_ray_serve: Server,
                                              served_images: ImageSet) -> None:
    url = f"{flyp_ray_serve.url}/invocations"
    b64 = served_images.b64()
    status, answer = post_json(url, split_request(b64))  # a batch: 4 PNG, 4 JPEG
    assert status == 200, answer
    check_answer(answer["predictions"], served_images, list(range(len(b64))))
    status, answer = post_json(url, {"dataframe_records": [{"image": b64[6]}, {"image": b64[1]}]})
    assert status == 200, answer
    check_answer(answer["predictions"], served_images, [6, 1])
    status, answer = post_json(url, {"inputs": {"image": [b64[3]]}})
    assert status == 200, answer
    check_answer(answer["predictions"], served_images, [3])
    # the first line of the log is the command's JSON line: the alias pinned to its version
    assert '"model": "models:/flyp-served/1"' in flyp_ray_serve.log.read_text()


@pytest.mark.slow
def test_concurrent_requests_share_a_batch_and_a_bad_one_fails_alone(
        flyp_ray_serve: Server, served_images: ImageSet) -> None:
    url = f"{flyp_ray_serve.url}/invocations"
    b64 = served_images.b64()
    bad = base64.b64encode(b"not an image").decode()
    requests = [split_request([b64[0], b64[7]]), split_request([b64[2]]),
                split_request([b64[5], bad]), split_request([b64[4]])]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda payload: post_json(url, payload), requests))
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
    deadline = time.monotonic() + 30
    while not any(b in flyp_ray_serve.log.read_text() for b in batched):
        assert time.monotonic() < deadline, [line for line in flyp_ray_serve.log.read_text()
                                             .splitlines() if app.BATCH_LOG in line]
        time.sleep(0.5)
    status, answer = post_json(url, split_request([b64[1]]))  # and it goes on answering
    assert status == 200
    check_answer(answer["predictions"], served_images, [1])


@pytest.mark.slow
def test_ping_and_errors_answer_as_mlflow_does(flyp_ray_serve: Server) -> None:
    with urllib.request.urlopen(f"{flyp_ray_serve.url}/ping", timeout=10) as reply:
        assert reply.status == 200
    status, answer = post_json(f"{flyp_ray_serve.url}/invocations", {"columns": ["image"]})
    assert status == 400 and answer["error_code"] == "BAD_REQUEST"
    assert "dataframe_split" in answer["message"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{flyp_ray_serve.url}/nothing", timeout=10)
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
