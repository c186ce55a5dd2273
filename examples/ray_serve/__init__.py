"""The iris model on Ray Serve (``examples.ray_serve:app``): see ``app.py``; ``serve.py`` runs it locally."""

from .app import app

__all__ = ["app"]
