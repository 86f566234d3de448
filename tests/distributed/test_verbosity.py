"""What a Ray process prints by default and with FLYP_RAY_VERBOSE=1 (no Ray: the logging alone).

Ray Train sets the root logger of its workers to INFO with a console handler, and open_clip logs
every model build there; the package's own lines must still get through, after the run's name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from flyp_ray.distributed import verbosity

# A Train worker's logging as Ray Train leaves it, then ours, then a library's line and one of
# the package's.
WORKER = """
import logging, sys
root = logging.getLogger()
root.setLevel(logging.INFO)
root.addHandler(logging.StreamHandler(sys.stderr))
from flyp_ray.distributed import verbosity
verbosity.ray_process("3239a8b4")
logging.info("Loaded built-in flyp-tiny model config.")
logging.getLogger("flyp_ray.finetune.loop").info("epoch 1/4: train 2.0 s")
logging.getLogger("flyp_ray.finetune.loop").debug("epoch 2/4: train 2.1 s")
logging.getLogger("flyp_ray.finetune.model").warning("model.pretrained is null")
"""


def stderr_lines(script: str, verbose: bool) -> list[str]:
    """What ``script`` prints on stderr in a fresh interpreter, FLYP_RAY_VERBOSE set or not."""
    env = {k: v for k, v in os.environ.items() if k != verbosity.ENV}
    if verbose:
        env[verbosity.ENV] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stderr.strip().splitlines()


@pytest.mark.parametrize("verbose", [False, True])
def test_a_worker_prints_its_own_lines_and_the_libraries_only_when_verbose(verbose: bool) -> None:
    lines = stderr_lines(WORKER, verbose)
    if verbose:
        assert lines == ["Loaded built-in flyp-tiny model config.",
                         "3239a8b4: epoch 1/4: train 2.0 s", "3239a8b4: epoch 2/4: train 2.1 s",
                         "3239a8b4: warning: model.pretrained is null"]
    else:
        assert lines == ["3239a8b4: epoch 1/4: train 2.0 s",
                         "3239a8b4: warning: model.pretrained is null"]


def test_the_choice_travels_to_ray_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(verbosity.ENV, raising=False)
    assert verbosity.env() == verbosity.QUIET_ENV
    assert verbosity.tune_verbose() == 0 and verbosity.train_log_level() == "WARNING"
    monkeypatch.setenv(verbosity.ENV, "1")
    assert verbosity.env() == {verbosity.ENV: "1"}
    assert verbosity.tune_verbose() is None and verbosity.train_log_level() == "INFO"


def test_optunas_warning_of_a_step_reported_again_is_silenced() -> None:
    import optuna

    trial = optuna.create_study().ask()
    trial.report(0.5, step=1)
    for quiet, warned in ((False, 1), (True, 0)):
        with warnings.catch_warnings(record=True) as caught:  # restores the filters after
            warnings.simplefilter("always")
            if quiet:
                verbosity.quiet_repeated_steps()
            trial.report(0.5, step=1)  # what a resumed trial's first epoch does again
        assert len(caught) == warned, [str(w.message) for w in caught]


# A Tune trial's process as Ray leaves it (its loggers at INFO, with a handler), then ours, then
# the notices Ray Train and Tune give there at every PBT decision, and a warning.
TRIAL = r"""
import logging, sys
ray_logger = logging.getLogger("ray")
ray_logger.setLevel(logging.INFO)
ray_logger.addHandler(logging.StreamHandler(sys.stderr))
from flyp_ray.distributed import verbosity
verbosity.quiet_ray_notices()
logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager").info(
    "A run snapshot was found in storage folder at: '/r/trials/a'")
logging.getLogger("ray.tune.trainable.trainable").info("Restored on 10.0.0.1 from checkpoint")
logging.getLogger("ray.train.v2._internal.execution.storage").info(
    "Checkpoint successfully created at: /r/checkpoint_000001")
errors = logging.getLogger("ray.train.v2._internal.util")
errors.error("Error in training function:\nActorDiedError: The actor died unexpectedly before "
             "finishing this task.\n\tclass_name: SynchronizationActor\nThe actor is dead "
             "because its owner has died. Owner Id: 0513")
errors.error("Error in training function:\nValueError: bad batch")
logging.getLogger("ray.tune.trainable.trainable").warning("trial is slow to stop")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_trial_process_keeps_rays_notices_out_unless_verbose(verbose: bool) -> None:
    lines = stderr_lines(TRIAL, verbose)
    assert lines[-3:] == ["Error in training function:", "ValueError: bad batch",
                          "trial is slow to stop"]
    # Quiet: the notices and the traceback of a worker whose run was torn down go.
    assert len(lines) == (3 + 4 + 3 if verbose else 3), lines


def test_tunes_advice_to_reuse_actors_under_pbt_is_silenced() -> None:
    import ray.tune.tune

    source = Path(ray.tune.tune.__file__).read_text(encoding="utf-8")
    assert "Consider boosting PBT performance by enabling `reuse_actors`" in source  # Ray's text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verbosity.quiet_population()
        warnings.warn("Consider boosting PBT performance by enabling `reuse_actors` as well as "
                      "implementing `reset_config` for Trainable.", UserWarning, stacklevel=1)
    assert caught == []
