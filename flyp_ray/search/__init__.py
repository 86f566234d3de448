"""The search: Ray Tune + Optuna over TrainConfig fields, and what is built on it.

tune (the Tuner, the summary), trial (the per-trial driver, light to import), trial_lines (a
line when a trial starts and ends), space (``search.space`` as Optuna distributions and sampler),
plots (search plots for MLflow), compare (every method side by side), recheck (the top trials
again on new seeds), budget (worker-hours), report (the table a command ends with).
May import every lower wing: ``flyp_ray.distributed``, ``flyp_ray.tracking``,
``flyp_ray.finetune``, ``flyp_ray.data``, ``flyp_ray.config``, ``flyp_ray.errors``.
"""
