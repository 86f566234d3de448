"""``python -m flyp_ray`` is the ``flyp-ray`` command."""

from flyp_ray.cli import main

raise SystemExit(main())
