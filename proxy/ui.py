"""``/ui``: the memory page, three static files (HTML, JavaScript, CSS) in ``proxy/ui/``.

The files hold no data and need no key: the page asks for the user's API key, keeps it in the
tab's session storage and sends it as ``Authorization: Bearer`` on every call to the same
authenticated API the SDKs use (``/v1/memories``, ``/v1/interactions``). So the page reaches
exactly what the key reaches, and a browser without the key sees an empty shell. A strict
Content-Security-Policy allows only these files (no inline script, no other origin).
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.errors import NotFound

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' blob: data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def ui_routes() -> list[BaseRoute]:
    """The page's routes, its files read once here (a few KB)."""
    folder = files("proxy") / "ui"
    assets = {name: (folder / name).read_bytes() for name in ASSETS}

    async def page(request: Request) -> Response:
        return _asset(assets, "index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            raise NotFound(f"Unknown path {request.url.path}.", code="unknown_url")
        return _asset(assets, name)

    async def slash(request: Request) -> Response:
        return RedirectResponse("/ui", status_code=308)

    return [
        Route("/ui", page, methods=["GET", "HEAD"]),
        Route("/ui/", slash, methods=["GET", "HEAD"]),
        Route("/ui/{name}", asset, methods=["GET", "HEAD"]),
    ]


def _asset(assets: dict[str, bytes], name: str) -> Response:
    return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)
