"""The API reference at /schema: Swagger UI, its files served by the service itself.

Litestar's default page loads Redoc from a CDN and fonts from Google: on an offline or locked-down host it is blank.
The swagger-ui-py wheel ships Swagger UI's static build (no framework needed: we only read its `static/` folder), so
the page, its script, style sheet and icon all come from `/schema/assets/` and the document is inlined in the page.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from litestar import Router
from litestar.connection import ASGIConnection
from litestar.exceptions import NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

SCHEMA_PATH = "/schema"
ASSETS = "/assets"
# Only the files the page uses are served (the folder also holds Swagger Editor's bundles, source maps, …).
FILES = ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css", "favicon-32x32.png")


def assets_dir() -> Path:
    """swagger-ui-py's static folder, found without importing the package (its __init__ scans web-framework glue)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed: it serves the API reference's files (pip install swagger-ui-py)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


class LocalSwaggerPlugin(SwaggerRenderPlugin):
    """Swagger UI at /schema (and /schema/swagger) with every asset served from /schema/assets/."""

    def __init__(self) -> None:
        base = SCHEMA_PATH + ASSETS
        super().__init__(
            path=["/", "/swagger"],
            js_url=f"{base}/swagger-ui-bundle.js",
            css_url=f"{base}/swagger-ui.css",
            standalone_preset_js_url=f"{base}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{base}/favicon-32x32.png'>",
        )
        self.directory = assets_dir()
        missing = [name for name in FILES if not (self.directory / name).is_file()]
        if missing:
            raise RuntimeError(f"swagger-ui-py's static folder lacks {missing}")

    def receive_router(self, router: Router) -> None:
        super().receive_router(router)
        router.register(
            create_static_files_router(
                path=ASSETS,
                directories=[self.directory],
                include_in_schema=False,
                name="api_reference_assets",
                guards=[_only_the_pages_files],
            )
        )


def _only_the_pages_files(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    if str(connection.path_params.get("file_path", "")).lstrip("/") not in FILES:
        raise NotFoundException("no such file")
