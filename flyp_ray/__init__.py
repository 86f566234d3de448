"""flyp-ray: FLYP finetuning of CLIP models, searched with Ray Tune + Optuna, tracked in MLflow."""

__version__ = "0.1.0"
