"""Finetuning one worker's share in plain PyTorch: no Ray, no MLflow, runs in one process.

model (open_clip), loss (FLYP's contrastive loss), optim (the optimizer and schedule), run (a
worker's run, assembled), loop (the epochs of every method), evaluate (the zero-shot head and
metrics), classifier, probe, WiSE-FT, checkpoints, tiny-model pre-training. May import:
``flyp_ray.data``, ``flyp_ray.config``, ``flyp_ray.errors``.
"""
