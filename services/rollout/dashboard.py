"""The live dashboard: a page at ``/`` of the rollout service, with no build step.

    app.include_router(dashboard_router())

The page (static/index.html, dashboard.js, dashboard.css) holds no data. Its script reads
everything through the service's own API, as any client does: GET /v1/status?history=N
(training curves by variant, throughput, staleness, where a step's time goes, the engines),
GET /v1/evaluations (pass@k), GET /v1/transfer (the problems table), GET /v1/rollouts (the
inspector), polling every few seconds. When reads need the bearer token
(``require_auth_for_reads``), an API answer of 401 makes the page ask for it; it keeps it in
the tab's sessionStorage and sends it as an Authorization header, never in a URL. So ``/``
and its two files are open paths (services/common/http.py, ``DASHBOARD_PATHS``), and what
they serve is the same for everyone.

Problem text and model output are untrusted: the script puts them into the page as text
nodes only (never as markup), and the page is served with a Content-Security-Policy that
runs no script but these files, so markup in a problem or a completion shows as the
characters it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
"""The files under /dashboard/, with their media types (each an open path: common/http.py,
``DASHBOARD_PATHS``)."""

SECURITY_HEADERS = {
    # Scripts and styles from this origin's files only (no inline script, no eval), data
    # from this origin's API only, no frames, no plugins, no forms posting elsewhere.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
        # and no string ever parsed as markup: an innerHTML would throw
        "require-trusted-types-for 'script'; trusted-types 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("services.rollout").joinpath("static", name).read_bytes()


def _serve(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=f"{media_type}; charset=utf-8", headers=SECURITY_HEADERS)

    return serve


def dashboard_router() -> APIRouter:
    """GET / (the page) and GET /dashboard/{asset} (its script and style); not in the OpenAPI."""
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/", _serve(_read("index.html"), "text/html"), methods=["GET"])
    for name, media_type in ASSETS.items():  # a route each: any other path under /dashboard/ is a 404
        router.add_api_route(f"/dashboard/{name}", _serve(_read(name), media_type), methods=["GET"])

    return router
