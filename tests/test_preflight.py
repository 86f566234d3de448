"""validate refuses what a run would refuse, with the same line; nothing decisive defaults.

The table of issue-style cases runs ``validate``, ``train`` and ``tune`` in this process (each
refusal comes before Ray starts); the last tests run a real search whose trials stop on bad
input and a real run whose report lacks its metric.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from flyp_ray import cli, config, preflight
from flyp_ray.distributed import worker
from flyp_ray.errors import ConfigError, DataError, first_line, input_error
from flyp_ray.finetune.model import tiny_config_path
from tests.support import REPO
from tests.support.configs import tiny_config, write_config
from tests.support.servers import free_port
from tests.support.wilds_folder import write_csv_dataset


def jpeg_bytes(tmp: Path) -> str:
    from PIL import Image

    path = tmp / "photo.jpg"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return str(path)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    return code, lines[-1] if lines else ""


# (name, how to break tiny_config, commands that must refuse it, what the line names)
ROWS: list[tuple[str, Any, tuple[str, ...], list[str]]] = [
    ("metric that no report has", {"search": {"metric": "id_val/accuracy"}},
     ("validate", "train", "tune"), ["search.metric", "'id_val/accuracy'", "did you mean "
                                                                           "'id_val/acc'"]),
    ("empty search space", {"search": {"space": {}}}, ("tune", "tune-all", "compare --tune"),
     ["search.space: is empty, so a search has nothing to search", "train runs this config"]),
    ("no dataset section", "drop dataset", ("validate", "train", "tune"),
     ["dataset.name", "is required"]),
    ("a JPEG as the checkpoint", "jpeg", ("validate", "train", "tune"),
     ["model.pretrained", "photo.jpg", "not a checkpoint"]),
    ("a batch the workers cannot split", {"train": {"batch_size": 7},
                                          "resources": {"workers": 2}},
     ("validate", "train", "tune"), ["train.batch_size", "7", "resources.workers (2)"]),
    ("a tracking URI MLflow has no store for", {"tracking": {"uri": "ftp://host/mlflow"}},
     ("validate", "train", "tune"), ["tracking.uri", "ftp://host/mlflow"]),
    ("empty storage", {"storage": ""}, ("validate", "train", "tune"), ["storage", "''"]),
    ("a key twice", "lr twice", ("validate", "train", "tune"),
     ["train.lr", "given twice, at lines"]),
]


def broken_config(tmp: Path, how: Any) -> Path:
    raw = tiny_config(tmp, **(how if isinstance(how, dict) else {}))
    if how == "drop dataset":
        del raw["dataset"]
    if how == "jpeg":
        raw["model"]["pretrained"] = jpeg_bytes(tmp)
    path = write_config(tmp / "c.yaml", raw)
    if how == "lr twice":
        path.write_text(path.read_text().replace("  lr: 0.001\n", "  lr: 0.001\n  lr: 0.01\n"))
    return path


@pytest.mark.parametrize(("how", "commands", "needles"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_every_row_is_refused_by_validate_and_the_runs_alike(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: Any,
        commands: tuple[str, ...], needles: list[str]) -> None:
    path = broken_config(tmp_path, how)
    lines = set()
    for command in commands:
        code, line = run_cli(capsys, *command.split(), str(path))
        assert code == 2, (command, line)
        assert line.startswith(f"flyp-ray: error: {path}: "), line
        for needle in needles:
            assert needle in line, (command, line)
        lines.add(line)
    assert len(lines) == 1  # one code path: the same line from each command


# --- the good corpus: configs users write every day, which validate must accept ------------

BASE = """\
model: {{arch: {arch}, pretrained: null}}
resources: {{workers: 1, cpus_per_worker: 0.5, max_failures: 0}}
tracking: {{uri: "sqlite:///{tmp}/mlflow.db", experiment: test}}
"""
SYNTHETIC = "dataset: {{name: synthetic, subsample: 64}}\n"
TRAIN = "train: {{epochs: 1, batch_size: 16, lr: 1.0e-3, warmup_steps: 2}}\n"
SPACE = "search:\n  space:\n    lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}\n"
STORAGE = "storage: {tmp}/results\n"
# One name a line: accents, an apostrophe, double quotes, guillemets, a comma (UTF-8).
CLASSNAMES = ("café au lait\ncrème brûlée\nl'étoile du nord\n\"quoted\" ring\n"
              "« cross »\nsquare, small\n")
SEARCHES = "fit for: train, tune, tune-all, compare --tune, eval"
TRAINS = "fit for: train, eval, compare (tune needs search.space)"

# (name, YAML text, --set arguments, the fit-for line, what the loaded config must hold)
GOOD: list[tuple[str, str, list[str], str, Any]] = [
    ("anchors and aliases", SYNTHETIC + BASE.replace("experiment: test}", "experiment: &name "
     "flyp-anchors, registered_model: *name}") + STORAGE + """\
train: &fixed {{epochs: 1, batch_size: 16, lr: 1.0e-3, warmup_steps: 2}}
search:
  space:
    lr: &rate {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
    weight_decay:
      <<: *rate
      low: 1.0e-3
      high: 0.3
""", [], SEARCHES, lambda c: (c.tracking.registered_model == "flyp-anchors"
                             and c.search.space["weight_decay"].log
                             and c.search.space["weight_decay"].high == 0.3)),
    ("template lists", """\
dataset:
  name: synthetic
  subsample: 64
  templates:
    - a photo of a {{}}.
    - "a blurry photo of the {{}}."
    - 'itap of my {{}}.'
""" + BASE + TRAIN + SPACE + STORAGE, [], SEARCHES, lambda c: len(c.dataset.templates) == 3),
    ("a class-name file with accents and quotes",
     "dataset: {{name: synthetic, subsample: 64, classnames: {tmp}/names.txt}}\n" + BASE
     + TRAIN + SPACE + STORAGE, [], SEARCHES, None),
    ("file:// storage", SYNTHETIC + BASE + TRAIN + SPACE + "storage: file://{tmp}/results\n",
     [], SEARCHES, lambda c: c.storage.startswith("file:///")),
    ("WILDS' official metric as the search metric",
     "dataset: {{name: iwildcam, root: {wilds}}}\n" + BASE + TRAIN.replace("16", "4") + """\
search:
  metric: id_val/official/F1-macro_all
  space: {{lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}}}
""" + STORAGE, [], SEARCHES, None),
    ("a multi-objective search with nsga2", SYNTHETIC + BASE + TRAIN + """\
search:
  metric: [id_val/acc, ood_val/acc]
  mode: [max, max]
  sampler: nsga2
  num_samples: 4
  space: {{lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}}}
""" + STORAGE, [], SEARCHES, lambda c: c.search.sampler == "nsga2"),
    ("--set in scientific notation", SYNTHETIC + BASE + TRAIN + SPACE + STORAGE,
     ["--set", "lr=3e-5", "--set", "search.space.lr.low=1E-6"], SEARCHES,
     lambda c: c.train.lr == 3e-5 and c.search.space["lr"].low == 1e-6),
    ("a train-only config", SYNTHETIC + BASE + TRAIN + STORAGE, [], TRAINS, None),
    ("a search section that only selects the epoch", SYNTHETIC + BASE + TRAIN + STORAGE
     + "search: {{metric: id_val/loss, mode: min}}\n", [], TRAINS,
     lambda c: c.search.metric == "id_val/loss"),
]


@pytest.mark.parametrize(("text", "args", "fit", "holds"), [g[1:] for g in GOOD],
                         ids=[g[0] for g in GOOD])
def test_everyday_good_configs_are_accepted(
        tmp_path: Path, wilds_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, text: str, args: list[str], fit: str,
        holds: Any) -> None:
    # No `ray start` cluster of someone else's on this machine to size the run against.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "names.txt").write_text(CLASSNAMES, encoding="utf-8")
    path = tmp_path / "c.yaml"
    path.write_text(text.format(arch=tiny_config_path(), tmp=tmp_path, wilds=wilds_root),
                    encoding="utf-8")
    code = cli.main(["validate", str(path), *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err and "error" not in captured.err, captured.err
    assert captured.out.splitlines()[0] == f"{path}: config ok"
    assert captured.out.splitlines()[-1] == fit
    cfg = config.load(path, [a for a in args if a != "--set"])
    assert holds is None or holds(cfg)


def test_the_class_names_are_read_as_written(tmp_path: Path) -> None:
    from flyp_ray.data.prompts import read_classnames

    (tmp_path / "names.txt").write_text(CLASSNAMES, encoding="utf-8")
    assert read_classnames(str(tmp_path / "names.txt"), "c.yaml") == [
        "café au lait", "crème brûlée", "l'étoile du nord", '"quoted" ring', "« cross »",
        "square, small"]


# --- issue 21's four: each refused with one line on stderr, before Ray starts --------------

# Runs each command in turn in one interpreter (the imports once), stderr read per command at
# the file descriptor, so that a line written by a library or by Ray's C++ core counts too.
EACH_COMMAND = """
import json, os, sys, tempfile
from flyp_ray import cli
results = []
for command in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = cli.main(command)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        results.append([code, err.read().decode()])
print(json.dumps(results))
"""


def refused_lines(tmp: Path, commands: list[list[str]], **env: str) -> list[str]:
    """Each command's exit code must be 2 and its stderr one line: those lines."""
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE")}
    full.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(tmp / "raytmp"), **env)
    done = subprocess.run([sys.executable, "-c", EACH_COMMAND, json.dumps(commands)],
                          cwd=tmp, text=True, capture_output=True, env=full, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = []
    for command, (code, err) in zip(commands, json.loads(done.stdout.splitlines()[-1]),
                                    strict=True):
        assert code == 2 and len(err.strip().splitlines()) == 1, (command, code, err)
        lines.append(err.strip())
    assert not (tmp / "raytmp").exists()  # Ray was not started
    assert not (tmp / "results").exists()
    return lines


def latin1_comment(tmp: Path) -> tuple[Path, dict[str, str]]:
    path = write_config(tmp / "c.yaml", tiny_config(tmp))
    path.write_bytes(b"# r\xe9glages du jeu\n" + path.read_bytes())
    return path, {}


def latin1_classnames(tmp: Path) -> tuple[Path, dict[str, str]]:
    (tmp / "names.txt").write_bytes(CLASSNAMES.encode("latin-1", errors="replace"))
    raw = tiny_config(tmp, dataset={"classnames": str(tmp / "names.txt")})
    return write_config(tmp / "c.yaml", raw), {}


def a_gpu_here(tmp: Path) -> tuple[Path, dict[str, str]]:
    # CUDA_VISIBLE_DEVICES="" hides every GPU from Ray's detection, on any machine.
    raw = tiny_config(tmp, resources={"gpus_per_worker": 1})
    return write_config(tmp / "c.yaml", raw), {"CUDA_VISIBLE_DEVICES": ""}


def weights_not_here(tmp: Path) -> tuple[Path, dict[str, str]]:
    # An empty cache, and a hub address that takes no connection (holds with internet too).
    (tmp / "hub").mkdir()
    raw = tiny_config(tmp, model={"arch": "ViT-B-16", "pretrained": "openai"})
    return write_config(tmp / "c.yaml", raw), {"HF_HUB_CACHE": str(tmp / "hub"),
                                               "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}


# (name, how to write the case, what its one line says)
FOUR: list[tuple[str, Any, list[str]]] = [
    ("a Latin-1 comment in the config", latin1_comment,
     ["c.yaml: not UTF-8: line 1, byte 4 is 0xe9 (save the file as UTF-8)"]),
    ("a Latin-1 class-name file", latin1_classnames,
     ["c.yaml: dataset.classnames: ", "names.txt is not UTF-8: line 1, byte 4 is 0xe9"]),
    ("a GPU on a machine without one", a_gpu_here,
     ["c.yaml: resources.gpus_per_worker: 1 worker(s) x 1 GPU need 1, but the Ray cluster "
      "has 0"]),
    ("weights neither cached nor reachable", weights_not_here,
     ["c.yaml: model.pretrained: the weights of ViT-B-16 'openai' are neither cached nor "
      "reachable: looked for ", "/hub/models--timm--vit_base_patch16_clip_224.openai/",
      "HF_HUB_OFFLINE=1"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("write", "needles"), [f[1:] for f in FOUR], ids=[f[0] for f in FOUR])
def test_validate_and_train_refuse_each_in_one_line_before_ray(
        tmp_path: Path, write: Any, needles: list[str]) -> None:
    path, env = write(tmp_path)
    lines = refused_lines(tmp_path, [["validate", str(path)], ["train", str(path)]], **env)
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("flyp-ray: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_a_train_config_is_refused_by_the_searches_in_one_line(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path)
    del raw["search"]
    path = write_config(tmp_path / "c.yaml", raw)
    lines = refused_lines(tmp_path, [["tune", str(path)], ["tune-all", str(path)],
                                     ["compare", "--tune", str(path)]])
    assert set(lines) == {f"flyp-ray: error: {path}: search.space: is empty, so a search has "
                          f"nothing to search: name at least one train field (e.g. lr: {{type: "
                          f"float, low: 1.0e-6, high: 1.0e-4, log: true}}); train runs this "
                          f"config as it is"}


# --- more of what users get wrong ----------------------------------------------------------

MORE: list[tuple[str, dict[str, Any], list[str]]] = [
    ("a metric only the last epoch reports",
     {"train": {"epochs": 2, "wiseft_alphas": [0.5]},
      "search": {"metric": "wiseft/0.5/id_val/acc"}},
     ["search.metric", "last epoch only", "wiseft/best/id_val/acc"]),
    ("a metric of another method", {"train": {"method": "ce"},
                                    "search": {"metric": "train/temperature"}},
     ["search.metric", "'train/temperature'", "not a metric of this run"]),
    ("maximising a loss", {"search": {"metric": "id_val/loss", "mode": "max"}},
     ["search.mode", "use min"]),
    ("more shots than a class has", {"train": {"k_shot": 50}}, ["train.k_shot", "50"]),
    ("a batch larger than the training set", {"train": {"batch_size": 128}},
     ["train.batch_size", "128", "64 training images"]),
    ("a misspelt architecture", {"model": {"arch": "ViT-B-61"}},
     ["model.arch", "did you mean 'ViT-B-16'"]),
    ("a misspelt search key", {"search": {"space": {"weight_decy": {
        "type": "float", "low": 0.0, "high": 0.1}}}},
     ["search.space.weight_decy", "did you mean 'weight_decay'"]),
    ("a searched batch the workers cannot split",
     {"resources": {"workers": 2}, "search": {"space": {"batch_size": {
         "type": "int", "low": 8, "high": 32}}}}, ["search.space.batch_size.step"]),
    ("eval_splits without the search metric's split",
     {"train": {"eval_splits": ["ood_val"]}}, ["train.eval_splits", "id_val"]),
    ("a promotion guard no model evaluation reports",
     {"tracking": {"promotion": {"guard": {"ood_tset/acc": 0.01}}}},
     ["tracking.promotion.guard.ood_tset/acc", "did you mean 'ood_test/acc'"]),
]


@pytest.mark.parametrize(("sections", "needles"), [m[1:] for m in MORE], ids=[m[0] for m in MORE])
def test_more_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    sections: dict[str, Any], needles: list[str]) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections))
    code, line = run_cli(capsys, "validate", str(path))
    assert code == 2 and line.startswith(f"flyp-ray: error: {path}: "), line
    for needle in needles:
        assert needle in line, line


def test_eval_splits_must_be_splits_of_the_data_set(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = write_csv_dataset(tmp_path / "set", n_per_split=6, num_classes=3,
                             splits=("train", "id_val", "id_test"))
    raw = tiny_config(tmp_path, dataset={"name": "csv", "root": str(root),
                                         "classnames": str(root / "classnames.txt")},
                      train={"batch_size": 4, "eval_splits": ["id_val", "ood_val"]})
    code, line = run_cli(capsys, "validate", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2
    assert "train.eval_splits: 'ood_val' is not a split of csv" in line
    assert "(it has id_val, id_test)" in line


def test_a_registered_model_of_another_data_set_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config(tmp_path, tracking={"registered_model": "flyp-iwildcam"})
    client = MlflowClient(raw["tracking"]["uri"])
    client.create_registered_model("flyp-iwildcam")
    client.create_model_version("flyp-iwildcam", source=str(tmp_path),
                                tags={"dataset": "iwildcam"})
    code, line = run_cli(capsys, "validate", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2
    assert ("tracking.registered_model: 'flyp-iwildcam' holds iwildcam models (version 1), but "
            "this config's data set is synthetic") in line


def test_warnings_leave_validate_at_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config(tmp_path, train={"warmup_steps": 500},
                      dataset={"templates": "iwildcam"})
    path = write_config(tmp_path / "c.yaml", raw)
    assert cli.main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert "config ok" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("flyp-ray: warn")]
    assert warnings == [
        f"flyp-ray: warning: {path}: train.warmup_steps: 500 of the run's 4 optimizer steps: "
        f"the learning rate never reaches train.lr",
        f"flyp-ray: warning: {path}: dataset.templates: 'iwildcam' are another data set's "
        f"prompts, for dataset synthetic (copied from its config?)"]


def test_a_gpu_config_that_decodes_in_the_training_process_is_warned_of(
        tmp_path: Path) -> None:
    # The warnings alone: validate refuses a GPU config outright on a machine without a GPU.
    raw = tiny_config(tmp_path, dataset={"cache": "none"},
                      resources={"gpus_per_worker": 1, "cpus_per_worker": 8})
    path = write_config(tmp_path / "c.yaml", raw)
    assert preflight.data_path_warnings(config.load(path)) == [
        f"{path}: dataset.loader_workers: 0 with GPUs: the training process "
        f"decodes every image itself while the GPU waits; set dataset.loader_workers: -1 (one "
        f"per CPU of the worker but one)",
        f"{path}: dataset.cache: none with GPUs: every epoch decodes every "
        f"image again (about 300 images/s per core); set dataset.cache: disk"]

    fed = config.load(path, ["dataset.loader_workers=-1", "dataset.cache=disk",
                             f"dataset.cache_dir={tmp_path / 'cache'}"])
    assert preflight.data_path_warnings(fed) == []
    one_cpu = config.load(path, ["dataset.loader_workers=-1", "resources.cpus_per_worker=1"])
    (line, _) = preflight.data_path_warnings(one_cpu)
    assert line.endswith("give the worker more CPUs than resources.cpus_per_worker: 1")
    cpu_only = config.load(path, ["resources.gpus_per_worker=0"])
    assert preflight.data_path_warnings(cpu_only) == []
    # The synthetic set's own default caches it in memory: decoded once, even with no loaders.
    auto = config.load(path, ["dataset.cache=auto"])
    assert [line.split(": ")[1] for line in preflight.data_path_warnings(auto)] == [
        "dataset.loader_workers"]


def test_a_disk_cache_the_disk_cannot_hold_is_warned_of(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    cache = tmp_path / "cache"
    raw = tiny_config(tmp_path, dataset={"cache": "disk", "cache_dir": str(cache)})
    cfg = config.load(write_config(tmp_path / "c.yaml", raw))
    assert preflight.check(cfg).warnings == []
    # 5 splits of 64 images at 32 px: 5 x 64 x (3 x 32 x 32 + 1) bytes, about 1 MB.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, 10**5))
    (warning,) = preflight.check(cfg).warnings
    assert f"dataset.cache_dir: the disk cache needs about 0.0 GB (32 px) under {cache}" in warning
    # A cache that is already there takes the space it needs.
    cache.mkdir()
    (cache / "pixels").write_bytes(b"x" * 2 * 10**6)
    assert preflight.check(cfg).warnings == []


def test_a_good_config_passes_every_check(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    checked = preflight.check(cfg)
    assert checked.lines[0] == f"{cfg.source}: config ok" and checked.warnings == []
    assert not (tmp_path / "mlflow.db").exists()  # validate creates no tracking store


# --- a run's own failures end in one line too ----------------------------------------------


def test_a_missing_metric_stops_the_worker_with_the_configs_line(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, metric="ood_val/acc"))
    with pytest.raises(ConfigError, match=r"c.yaml: search.metric: 'ood_val/acc' is not in "
                                          r"epoch 3's report \(it has ood_val/loss\)"):
        worker.check_objectives(cfg, 3, {"epoch": 3.0, "ood_val/loss": 1.0})


def test_wrapped_input_errors_are_found_and_read_in_one_line() -> None:
    import ray.exceptions
    import ray.train

    # What a DataLoader process's error looks like once torch re-raises it in the trainer.
    inner = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                      "(most recent call last):\n  File \"x.py\", line 1\nflyp_ray.errors."
                      "DataError: cannot read image /d/a.png (FileNotFoundError: gone)")
    group = ray.train.WorkerGroupError("Training failed", {0: inner})
    wrapped = ray.exceptions.RayTaskError("run_trial", "traceback", group)
    assert input_error(wrapped) is inner
    assert first_line(inner) == "cannot read image /d/a.png (FileNotFoundError: gone)"
    assert input_error(RuntimeError("no")) is None


@pytest.mark.slow
def test_a_search_whose_trials_stop_on_a_vanished_image_exits_2(
        ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_csv_dataset(tmp_path / "set", n_per_split=8, num_classes=2)
    raw = tiny_config(tmp_path, dataset={"name": "csv", "root": str(root),
                                         "classnames": str(root / "classnames.txt")},
                      train={"batch_size": 4},
                      search={"num_samples": 1, "scheduler": {"type": "none"}})
    path = write_config(tmp_path / "c.yaml", raw)
    assert cli.main(["validate", str(path)]) == 0
    (root / "images" / "train_0005.png").unlink()  # gone after validate, before the epoch
    code = cli.main(["tune", str(path)])
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert code == 2, last
    assert last.startswith("flyp-ray: error: search-c: every trial stopped on bad input, the "
                           "first with: cannot read image "), last
    assert "train_0005.png" in last and (tmp_path / "results/search-c/summary.json").exists()


def test_checkpoint_of_a_tensor_is_not_a_state_dict(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    raw = tiny_config(tmp_path, model={"pretrained": str(tmp_path / "t.pt")})
    code, line = run_cli(capsys, "validate", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2 and "t.pt' holds a Tensor, not a state dict of weights" in line
