"""Bad input: exit code 2 and one line naming the file, key and value; no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.configs import LR_SPACE, tiny_config, write_config
from tests.support.servers import free_port


def flyp_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flyp_ray", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120)


def wrong_shape_checkpoint(tmp: Path) -> str:
    path = tmp / "wrong.pt"
    torch.save({"logit_scale": torch.zeros(3)}, path)
    return str(path)


# (name, config sections, extra args, text the one-line message must contain)
CASES: list[tuple[str, dict[str, Any], list[str], list[str]]] = [
    ("unknown key", {"train": {"lgo": True}}, [], ["train.lgo", "unknown key"]),
    ("unknown section", {"trian": {}}, [], ["trian", "unknown key"]),
    ("wrong type", {"train": {"epochs": "ten"}}, [], ["train.epochs", "'ten'"]),
    ("negative lr", {"train": {"lr": -0.1}}, [], ["train.lr", "-0.1"]),
    ("quoted number", {"train": {"lr": "1e-5"}}, [], ["train.lr", "'1e-5'", "without quotes"]),
    ("missing data root", {"dataset": {"name": "iwildcam", "root": "/nonexistent/wilds"}}, [],
     ["/nonexistent/wilds"]),
    ("unknown arch", {"model": {"arch": "ViT-Q-99"}}, [], ["model.arch", "ViT-Q-99"]),
    ("missing checkpoint", {"model": {"pretrained": "/nonexistent/ckpt.pt"}}, [],
     ["model.pretrained", "/nonexistent/ckpt.pt"]),
    ("set unknown key", {}, ["--set", "lrr=0.1"], ["lrr", "unknown key"]),
    ("set bad value", {}, ["--set", "batch_size=0"], ["train.batch_size", "0"]),
]


@pytest.mark.parametrize(("sections", "extra", "needles"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          sections: dict[str, Any], extra: list[str],
                                          needles: list[str]) -> None:
    from flyp_ray import cli

    path = write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, **sections))
    # PyYAML's dumper leaves 1e-5 unquoted (YAML 1.1 sees no float there): quote it by hand.
    path.write_text(path.read_text().replace("lr: 1e-5", "lr: '1e-5'"))
    # In this process (a fresh interpreter per case cost 5 s each); the tests below run the
    # real command in its own process for its exit code and its whole stderr.
    assert cli.main(["validate", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flyp-ray: error: ")
    for needle in needles:
        assert needle in last, last


def test_wrong_shape_checkpoint(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, model={"pretrained": wrong_shape_checkpoint(tmp_path)})
    result = flyp_ray("validate", str(write_config(tmp_path / "c.yaml", raw)), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "wrong.pt" in result.stderr.strip().splitlines()[-1]


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1\nmodel: {}\n")
    result = flyp_ray("train", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("flyp-ray: error: bad.yaml: malformed YAML at line 3: "
                                     "expected ',' or ']', but got ':'")
    result = flyp_ray("train", "missing.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr.strip()) == (
        2, "flyp-ray: error: missing.yaml: config file not found")


def test_validate_accepts_a_good_config(tmp_path: Path) -> None:
    result = flyp_ray("validate", str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path))),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config ok" in result.stdout and "synthetic" in result.stdout


# --- the same contract in-process: every level of the config, and the checks after it ------


# (name, command, config sections, text the one-line message must contain)
IN_PROCESS: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("unknown dataset key", "validate", {"dataset": {"rooot": "/x"}}, ["dataset.rooot"]),
    ("unknown model key", "validate", {"model": {"archh": "x"}}, ["model.archh"]),
    ("unknown scheduler key", "validate", {"search": {"scheduler": {"grace": 1}}},
     ["search.scheduler.grace"]),
    ("unknown space key", "validate",
     {"search": {"space": {"lr": {"type": "float", "low": 0.1, "high": 1.0, "lgo": True}}}},
     ["search.space.lr.lgo"]),
    ("low >= high", "validate",
     {"search": {"space": {"lr": {"type": "float", "low": 0.1, "high": 0.1}}}},
     ["search.space.lr.low", "0.1"]),
    ("log with low <= 0", "validate",
     {"search": {"space": {"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}},
     ["search.space.lr.low", "0.0"]),
    ("space key not a train field", "validate",
     {"search": {"space": {"lrate": {"type": "float", "low": 0.1, "high": 1.0}}}},
     ["search.space.lrate", "not a train field"]),
    ("num_samples 0", "validate", {"search": {"num_samples": 0}}, ["search.num_samples", "0"]),
    ("empty search space", "tune", {"search": {"space": {}}}, ["search.space"]),
    ("number as a string", "validate", {"train": {"weight_decay": "0.1"}},
     ["train.weight_decay", "'0.1'"]),
    ("bool as a string", "validate", {"train": {"learn_temperature": "yes"}},
     ["train.learn_temperature", "'yes'"]),
    ("unreachable MLflow server", "train", {"tracking": {"uri": "http://127.0.0.1:9"}},
     ["tracking.uri", "127.0.0.1:9"]),
]


@pytest.mark.parametrize(("command", "sections", "needles"), [c[1:] for c in IN_PROCESS],
                         ids=[c[0] for c in IN_PROCESS])
def test_bad_input_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
                              sections: dict[str, Any], needles: list[str]) -> None:
    from flyp_ray import cli

    raw = tiny_config(tmp_path, search={"space": LR_SPACE})
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = write_config(tmp_path / "bad.yaml", raw)

    assert cli.main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"flyp-ray: error: {path}"), err
    assert all(needle in err[-1] for needle in needles), err[-1]
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_resume_from_a_folder_without_a_checkpoint(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from flyp_ray import cli

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    (tmp_path / "epoch_0002").mkdir()

    assert cli.main(["train", str(path), "--resume-from", str(tmp_path / "epoch_0002")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flyp-ray: error: --resume-from: no checkpoint at "
                   f"'{tmp_path / 'epoch_0002'}' (no model.pt in it)"]
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_folder_without_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flyp_ray import cli

    (tmp_path / "wilds" / "iwildcam_v2.0").mkdir(parents=True)
    raw = tiny_config(tmp_path, dataset={"name": "iwildcam", "root": str(tmp_path / "wilds")})
    assert cli.main(["validate", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert "iwildcam_v2.0" in capsys.readouterr().err.strip().splitlines()[-1]


def test_classname_file_with_the_wrong_count(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from flyp_ray import cli

    (tmp_path / "names.txt").write_text("circle\nsquare\ntriangle\n")
    raw = tiny_config(tmp_path, dataset={"classnames": str(tmp_path / "names.txt")})
    assert cli.main(["validate", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dataset.classnames" in last and "names.txt" in last


def test_more_gpus_than_the_cluster_has(ray_session: None, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from flyp_ray import cli

    raw = tiny_config(tmp_path, resources={"workers": 2, "gpus_per_worker": 1})
    assert cli.main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "resources.gpus_per_worker: 2 worker(s) x 1 GPU need 2, but the Ray cluster has 0" \
        in last
    assert not (tmp_path / "results").exists()


# Runs a command in a fresh interpreter; prints its exit code and whether torch was imported.
EXIT_AND_IMPORTS = ("import json, sys; from flyp_ray import cli; code = cli.main(sys.argv[1:]); "
                    "print(json.dumps([code, 'torch' in sys.modules]))")


@pytest.mark.parametrize("command", ["validate", "train", "tune", "compare"])
def test_unreachable_ray_address_is_refused_at_once(tmp_path: Path, command: str) -> None:
    # Its own process: in this one, an earlier test may already have connected Ray.
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}  # nothing listens there
    done = subprocess.run([sys.executable, "-c", EXIT_AND_IMPORTS, command, str(path)],
                          cwd=tmp_path, text=True, capture_output=True, env=env, timeout=120)
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("flyp-ray: error: RAY_ADDRESS: cannot reach a Ray cluster at '127.0.0.1:")
    # Refused before the preflight's imports (about ten seconds here), and before any output.
    assert json.loads(done.stdout) == [2, False]
    assert not (tmp_path / "results").exists()



# --- what a command prints: the JSON result last off a terminal, a table for a person -------


def run_on(stdout_terminal: bool, args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run ``flyp-ray args`` with stdout a pipe, or a terminal (a pseudo-terminal); stderr is
    a pipe either way. The exit code, stdout and stderr."""
    import pty

    command = [sys.executable, "-m", "flyp_ray", *args]
    if not stdout_terminal:
        done = subprocess.run(command, cwd=cwd, text=True, capture_output=True, timeout=300)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen(command, cwd=cwd, stdout=follower, stderr=subprocess.PIPE,
                          text=True) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the command is done
                break
            if not chunk:
                break
            chunks.append(chunk)
        err = proc.stderr.read() if proc.stderr else ""
        code = proc.wait(timeout=300)
    os.close(leader)
    # A terminal also gets a colour reset when the command exits (colorama's); nothing else.
    out = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())
    return code, out.replace("\r\n", "\n"), err


def test_the_json_result_is_last_off_a_terminal_and_asked_for_on_one(tmp_path: Path) -> None:
    from tests.support.models import write_checkpoint

    raw = tiny_config(tmp_path)
    path = write_config(tmp_path / "c.yaml", raw)
    folder = write_checkpoint(config_of(raw), tmp_path / "ckpt")
    args = ["eval", "--model", str(folder), str(path)]

    code, out, err = run_on(False, args, tmp_path)  # a script, a Ray job, CI
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"model", "metrics"} and result["metrics"]["id_val/acc"] >= 0
    assert "flyp-ray eval:" in err  # the table for a person, on stderr

    code, out, err = run_on(True, args, tmp_path)  # a person at a terminal
    assert code == 0, err
    assert out.strip() == "" and "flyp-ray eval:" in err
    acc = err.split("id_val", 1)[1].split()[0]
    assert float(acc) == pytest.approx(result["metrics"]["id_val/acc"], abs=5e-4)

    code, out, err = run_on(True, [*args, "--json"], tmp_path)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == result


def config_of(raw: dict[str, Any]) -> Any:
    from flyp_ray import config

    return config.from_dict(raw, "c.yaml")


def test_help_lists_the_commands_in_the_order_a_user_meets_them() -> None:
    from flyp_ray import cli

    text = cli.parser().format_help()
    order = ["demo", "init", "validate", "train", "tune", "tune-all", "compare", "eval", "status",
             "serve", "submit"]
    listed = [line.split()[0] for line in text.split("commands:", 1)[1].split("\n\n")[0]
              .splitlines()[2:]]
    assert listed == order
    assert "where to start:" in text and "flyp-ray demo" in text
    for name in order:  # each says what it prints
        assert "Prints" in cli.parser()._subparsers._group_actions[0].choices[name].description
