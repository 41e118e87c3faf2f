"""The service's HTML surfaces: the page (`GET /`, its files under /static) and the API docs (`GET /docs`).

Both work on a machine without internet and load nothing from a third party: the page is plain files of
this package (static/), the docs are Swagger UI from fastapi-offline's files (mounted at
/static/swagger), started by our static/docs.js. Every URL they use is relative, so they also work under a
Serve route prefix. Their answers carry a strict Content-Security-Policy (CSP below): no inline script,
no inline style, nothing from another origin.
"""

from __future__ import annotations

from html import escape
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = resources.files("featmap_ray.serve") / "static"

# Everything from the app itself ('self'), nothing inline; two relaxations, each needed by what is shown:
#   img-src data:  the page shows the reconstructions as base64 data: URLs (app.js imageSource) and has
#                  an empty data: icon (no /favicon.ico request); swagger-ui.css draws its icons as data:
#                  SVGs and PNGs.
#   img-src blob:  Swagger UI's "Try it out" shows an image/png answer (format=png) as a blob: URL.
# Swagger UI 5 needs neither 'unsafe-inline' nor 'unsafe-eval': its styles are in swagger-ui.css, and
# React sets element styles through the DOM (CSSOM), which CSP allows; its Function("return this")
# fallbacks are never reached in a browser. Checked in headless Chromium, every operation opened with
# Try it out: no violation in the console (tests/serve_page.py). The page never puts a style= attribute
# into a document (an HTML error answer is read as text: app.js htmlWords). frame-ancestors, unlike the
# rest, works only as a header.
CSP = (
    "default-src 'self'; "
    "script-src 'self'; "
    "style-src 'self'; "
    "img-src 'self' data: blob:; "
    "connect-src 'self'; "
    "object-src 'none'; "
    "base-uri 'none'; "
    "frame-ancestors 'none'; "
    "form-action 'self'"
)
HEADERS = {"Content-Security-Policy": CSP}  # nosniff and the referrer policy: on every answer (guard.py)

# The docs page: Swagger UI's files from /static/swagger, our start-up script static/docs.js (no inline
# script: CSP), the schema's URL in a data attribute (relative, as every URL here).
DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} · API docs</title>
  <link rel="icon" type="image/png" href="static/swagger/favicon.png">
  <link rel="stylesheet" href="static/swagger/swagger-ui.css">
  <script src="static/swagger/swagger-ui-bundle.js" defer></script>
  <script src="static/docs.js" defer></script>
</head>
<body>
  <div id="swagger-ui" data-openapi="{openapi}"></div>
</body>
</html>
"""


class _StaticFiles(StaticFiles):
    """StaticFiles whose answers carry HEADERS too (a file opened directly gets the same policy)."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def _swagger_files():
    """fastapi-offline's Swagger UI files (swagger-ui-bundle.js, swagger-ui.css, favicon.png)."""
    try:
        folder = resources.files("fastapi_offline") / "static"
    except ModuleNotFoundError:
        folder = None
    if folder is None or not (folder / "swagger-ui-bundle.js").is_file():
        raise RuntimeError("serve.docs needs Swagger UI's files from the package fastapi-offline: "
                           "install it (pip install -e .) or set serve.docs: false")
    return folder


def add_page(api: FastAPI, docs: bool) -> None:
    """Register the page (`GET /`, /static) and, with `docs`, the API docs (`GET /docs`, /static/swagger).

    `docs` needs the app's OpenAPI schema (`api.openapi_url`); call it after creating the app with its
    title. Without `docs` there is no /docs (404) and no /static/swagger.
    """
    if docs:
        if api.openapi_url is None:
            raise ValueError("add_page(docs=True) needs the app's openapi_url")
        # Relative to /docs, so that it also resolves under a route prefix.
        html = DOCS_HTML.format(title=escape(api.title), openapi=escape(api.openapi_url.lstrip("/")))
        # Before /static: that mount would otherwise take /static/swagger/... (and answer 404).
        api.mount("/static/swagger", _StaticFiles(directory=str(_swagger_files())), name="swagger")

        @api.get("/docs", include_in_schema=False)
        async def api_docs() -> Response:
            return HTMLResponse(html, headers=HEADERS)

    @api.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return JSONResponse({"error": "the page is not installed (featmap_ray/serve/static/index.html)"},
                                status_code=404)
        return FileResponse(str(index), headers=HEADERS)

    api.mount("/static", _StaticFiles(directory=str(STATIC), check_dir=False), name="static")
