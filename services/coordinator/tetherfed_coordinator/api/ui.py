"""The live dashboard at `/ui/`: static HTML/JS from this package, plotly.js from the
installed `plotly` package (the `report` extra), data from the REST API and SSE streams.

The files need no token (they hold no data); every data request the page makes carries the
token the user entered, in the Authorization header (never in a URL).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from .deps import SettingsDep

router = APIRouter(tags=["ui"], include_in_schema=False)

ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
NO_PLOTLY = (
    "the dashboard needs plotly.js: install the report extra (pip install 'tetherfed[report]')"
)


def _asset(name: str) -> str:
    return (files("tetherfed_coordinator") / "ui" / name).read_text(encoding="utf-8")


@cache
def plotly_js() -> Path | None:
    """plotly.min.js of the installed plotly package (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "package_data" / "plotly.min.js"
        if path.exists():
            return path
    return None


@router.get("/ui")
async def ui_redirect() -> RedirectResponse:
    """`/ui` → `/ui/` (the page's relative links need the slash)."""
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/")
async def ui_index() -> HTMLResponse:
    """The dashboard page."""
    return HTMLResponse(_asset("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/ui/config.json")
async def ui_config(settings: SettingsDep) -> dict[str, bool]:
    """What the page needs before its first data request: whether a token is required."""
    return {"auth": settings.token is not None, "plotly": plotly_js() is not None}


@router.get("/ui/plotly.min.js", response_model=None)
async def ui_plotly() -> FileResponse:
    """plotly.js, from the installed plotly package (404 naming the extra when absent)."""
    path = plotly_js()
    if path is None:
        raise HTTPException(404, NO_PLOTLY)
    return FileResponse(
        path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"}
    )


@router.get("/ui/{name}")
async def ui_asset(name: str) -> Response:
    """The page's script and style sheet."""
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard file {name!r}")
    return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
