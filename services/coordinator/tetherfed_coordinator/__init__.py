"""tetherfed coordinator: REST API, Redis store, scoring loop and decision delivery ."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
