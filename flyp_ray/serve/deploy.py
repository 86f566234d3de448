"""``flyp-ray serve``: deploy the Serve application on the local Ray or a cluster, in the
foreground, and take it down again on Ctrl-C or SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

import mlflow

from flyp_ray.distributed import cluster
from flyp_ray.errors import BadInput, FlypRayError, first_line
from flyp_ray.serve.app import APP_NAME, ServeOptions, application
from flyp_ray.tracking import registry

log = logging.getLogger(__name__)


def serve_model(options: ServeOptions, *, host: str, port: int, address: str | None) -> None:
    """Serve ``options.model_uri`` at ``http://host:port`` until interrupted.

    Prints one JSON line (model, url, replicas) once every replica answers. On a local Ray the
    port is checked first; on a cluster (``address`` or RAY_ADDRESS) the replicas load the
    model from the tracking server this command uses, so it must be reachable from there.
    """
    if not 0 < port < 65536:
        raise BadInput(f"--port: must be in 1..65535, got {port}")
    uri = registry.serving_uri(options.model_uri)
    options = dataclasses.replace(options, model_uri=uri,
                                  tracking_uri=options.tracking_uri or _tracking_uri())
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        _check_port(host, port)
    from ray import serve

    # "local": a Ray of its own, never one that `ray start` left running on this machine (which
    # ray.init() would join): on exit this command shuts its Ray's Serve down.
    cluster.init_ray(address="local" if local else address)
    # After ray.init, which installs a SIGTERM handler of its own that aborts the process:
    # stopped by PID, the command cleans up as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application(options), name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # Serve's "Deploying app ... failed": the replicas' error
            raise FlypRayError(f"{uri} did not start behind Ray Serve: "
                               f"{first_line(err)}") from None
        print(json.dumps({"model": uri, "url": f"http://{host}:{port}",
                          "replicas": options.replicas}), flush=True)
        log.info("serving %s at http://%s:%d/invocations; Ctrl-C stops", uri, host, port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        _take_down(local)


def _tracking_uri() -> str:
    """This command's tracking URI, with a relative sqlite path made absolute for replicas
    that do not share the working directory."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


def _check_port(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise BadInput(f"--port: cannot listen on {host}:{port} ({err.strerror})") from None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _take_down(local: bool) -> None:
    """Remove what this command deployed: all of Serve on its own local Ray, else its app."""
    from ray import serve

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as err:  # noqa: BLE001 - stopping anyway; say what was left behind
        print(f"flyp-ray: could not remove the Serve application {APP_NAME!r}: {err}",
              file=sys.stderr)
    cluster.shutdown_if_started()
