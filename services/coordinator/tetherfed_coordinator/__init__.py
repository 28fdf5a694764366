"""tetherfed coordinator: REST API, Redis store, scoring loop and decision delivery (DESIGN §2–§4)."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
