"""The web dashboard: one static page (HTML, CSS and JS modules from app/static/dashboard, no build step)
that talks only to the public /v1 API with the user's key. This module serves the files; `/` redirects here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static" / "dashboard"  # index.html, assets/
PAGE_PATH = "/dashboard"
ASSETS_PATH = "/dashboard/assets"

# The page holds an API key: it runs only this origin's scripts and styles, calls only this origin, and is
# never framed. File names carry no content hash (no build step), so the browser revalidates (ETag) each use.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}

router = APIRouter(include_in_schema=False)


class DashboardAssets(StaticFiles):
    """The page's scripts and styles, with the dashboard's cache and security headers (304s included)."""

    def file_response(self, *args: Any, **kwargs: Any):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def assets() -> DashboardAssets:
    """Mount at ASSETS_PATH: `app.mount(ASSETS_PATH, assets())`."""
    return DashboardAssets(directory=STATIC_DIR / "assets", follow_symlink=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse(PAGE_PATH, status_code=307)


@router.get(f"{PAGE_PATH}/")
def page_with_slash() -> RedirectResponse:
    return RedirectResponse(PAGE_PATH, status_code=307)


@router.get(PAGE_PATH)
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
