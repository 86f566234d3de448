"""Ray Train: the per-worker function, the TorchTrainer driver of one run, job submission.

worker (what each Ray Train worker runs: build, resume, train, report, checkpoint), trainer
(one run as a ``TorchTrainer``), cluster (joining or starting Ray), submit (Ray Jobs),
verbosity (what a command's processes print: the libraries' switches, ``--verbose``). May
import: ``flyp_ray.tracking``, ``flyp_ray.finetune``, ``flyp_ray.data``, ``flyp_ray.config``,
``flyp_ray.errors``; nothing of Tune.
"""
