"""The web viewer (`/viewer/`) and GraphiQL (`GET /graphql` for browsers), both from the built
files under app/static: nothing is fetched from another origin, so both work on a hospital
network without internet. viewer/ holds their sources and `npm run build` writes app/static."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from app.config import Settings

STATIC_DIR = Path(__file__).parent / "static"
# The built files keep their names from build to build, so browsers revalidate (ETag) instead
# of caching blindly.
REVALIDATE = "no-cache"


def _storage_origins(settings: Settings) -> list[str]:
    """Browsers PUT uploads straight to storage: the page may connect there, and nowhere else."""
    if settings.storage_provider == "local":
        return []
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if endpoint:
        parts = urlsplit(endpoint)
        return [f"{parts.scheme}://{parts.netloc}"]
    region = settings.s3_region
    return [
        f"https://{settings.s3_bucket_name}.s3.{region}.amazonaws.com",
        f"https://s3.{region}.amazonaws.com",
    ]


def page_headers(settings: Settings) -> dict[str, str]:
    """The one Content-Security-Policy of our HTML pages: same origin only (plus S3 storage,
    which browsers upload to and may view from); data: for GraphiQL's inlined fonts and icons."""
    storage = "".join(f" {origin}" for origin in _storage_origins(settings))
    connect = f"'self'{storage}"
    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src 'self' data:{storage}; "
        f"font-src 'self' data:; connect-src {connect}; worker-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": REVALIDATE,
    }


class _BuiltFiles(StaticFiles):
    """Built assets with the page headers; with `fallback`, unknown extensionless paths get
    index.html so that the viewer's own routes (/viewer/groups/7) survive a reload."""

    def __init__(self, directory: Path, headers: dict[str, str], *, fallback: bool) -> None:
        super().__init__(directory=directory, html=True, check_dir=False)
        self.extra_headers = headers
        self.fallback = fallback

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except HTTPException as error:
            is_route = "." not in path.rsplit("/", 1)[-1]
            if error.status_code != 404 or not self.fallback or not is_route:
                raise
            response = await super().get_response("index.html", scope)
        response.headers.update(self.extra_headers)
        return response


def static_routes(settings: Settings) -> list[BaseRoute]:
    headers = page_headers(settings)
    routes: list[BaseRoute] = [
        Mount("/viewer", app=_BuiltFiles(STATIC_DIR / "viewer", headers, fallback=True)),
    ]
    if settings.graphiql:
        routes.append(
            Mount("/graphiql", app=_BuiltFiles(STATIC_DIR / "graphiql", headers, fallback=False))
        )
    return routes


def graphiql_page(settings: Settings) -> Response:
    return FileResponse(STATIC_DIR / "graphiql" / "index.html", headers=page_headers(settings))
