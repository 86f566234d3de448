"""Tracking: everything that talks to MLflow.

runs (experiments, runs, params, metrics, tags; retried, never raised into training) and
registry (the finetuned model logged as an MLflow model, registered, loaded back). May import:
``flyp_ray.finetune``, ``flyp_ray.data``, ``flyp_ray.config``, ``flyp_ray.errors``; nothing of
Ray.
"""
