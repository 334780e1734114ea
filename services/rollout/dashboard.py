"""The live dashboard: a page at ``/`` of the rollout service, with no build step.

    app.include_router(dashboard_router())

The page (static/index.html, dashboard.js, dashboard.css) holds no data. Its script reads
everything through the service's own API, as any client does: GET /v1/status?history=N
(training curves by variant, throughput, staleness, where a step's time goes, the engines),
GET /v1/evaluations (pass@k), GET /v1/transfer (the problems table), GET /v1/rollouts (the
inspector), polling every few seconds. When reads need the bearer token
(``require_auth_for_reads``), an API answer of 401 makes the page ask for it; it keeps it in
the tab's sessionStorage and sends it as an Authorization header, never in a URL. So ``/``
and ``/dashboard/*`` are open paths (services/common/http.py), and what they serve is the
same for everyone.

Problem text and model output are untrusted: the script puts them into the page as text
nodes only (never as markup), and the page is served with a Content-Security-Policy that
runs no script but these files, so markup in a problem or a completion shows as the
characters it is.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
"""The files under /dashboard/, with their media types."""

SECURITY_HEADERS = {
    # Scripts and styles from this origin's files only (no inline script, no eval), data
    # from this origin's API only, no frames, no plugins, no forms posting elsewhere.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("services.rollout").joinpath("static", name).read_bytes()


def dashboard_router() -> APIRouter:
    """GET / (the page) and GET /dashboard/{asset} (its script and style); not in the OpenAPI."""
    router = APIRouter(include_in_schema=False)
    page = _read("index.html")
    assets = {name: _read(name) for name in ASSETS}

    @router.get("/")
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @router.get("/dashboard/{asset}")
    async def asset(asset: str) -> Response:
        if asset not in assets:
            raise HTTPException(404, f"no dashboard file {asset!r}")
        return Response(assets[asset], media_type=f"{ASSETS[asset]}; charset=utf-8", headers=SECURITY_HEADERS)

    return router
