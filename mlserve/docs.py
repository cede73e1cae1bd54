"""Interactive API docs that work offline: Swagger UI served from the ``fastapi-offline`` wheel's
static files (no CDN), at ``/docs`` with its assets under ``/docs/assets``. Off with
``MLSERVE_DOCS_ENABLED=false``."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

ASSETS_URL = "/docs/assets"


def assets_dir() -> Path:
    """Swagger UI's JavaScript, CSS and icon, as shipped in the fastapi-offline package."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


@lru_cache(maxsize=4)
def docs_page(openapi_url: str, title: str) -> tuple[str, str]:
    """The docs page's HTML and the Content-Security-Policy that lets exactly it run: its own
    scripts and styles from this server, and its one inline script by hash."""
    from fastapi.openapi.docs import get_swagger_ui_html

    html = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - API docs",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        oauth2_redirect_url=None,
    ).body.decode()
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    )
    return html, docs_csp(hashes)


def docs_csp(script_hashes: str) -> str:
    return (
        f"default-src 'none'; script-src 'self' {script_hashes}; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'"
    )
