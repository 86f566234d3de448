"""Data: images, splits, class names, prompts, the decode-once cache and few-shot draws.

Every loader turns a data set's files into the same shape (:mod:`.base`); :mod:`.load` is the
entry point (``load_data``, ``check_data``). May import: ``flyp_ray.config``,
``flyp_ray.errors``; nothing of finetune, tracking, distributed or search.
"""
