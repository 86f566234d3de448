"""A trial's process imports only what drives a Train run.

Tune starts one process per trial and imports the trial function's module there before the
trial starts; every second of imports is paid again by every trial of every search.
"""

from __future__ import annotations

import json
import subprocess
import sys

# What the training code, the plots and the model registry bring, and a trial never uses.
TRAINING_ONLY = ("open_clip", "torchvision", "matplotlib", "sklearn", "wilds", "optuna", "PIL",
                 "flyp_ray.finetune.evaluate", "flyp_ray.data", "flyp_ray.tracking.registry")


def test_the_trial_function_imports_no_training_code() -> None:
    probe = ("import json, sys; import flyp_ray.search.trial; "
             f"print(json.dumps(sorted(m for m in {TRAINING_ONLY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
