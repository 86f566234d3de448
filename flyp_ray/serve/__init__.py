"""Serving: the logged image classifier behind Ray Serve (``flyp-ray serve``, RayService)."""
