"""The search page: one HTML file with its script and style, shipped as package data (no build step, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

#: index.html, app.js, app.css and icon.svg; StaticFiles serves only files below it.
STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def static_files() -> StaticFiles:
    """The page's script and style, mounted at /static."""
    return StaticFiles(directory=STATIC_DIR)
