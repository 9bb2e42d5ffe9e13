"""The HTTP application: API routers and the Gradio UI on one FastAPI app, one port."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response

from service import Services

from . import (
    anthropic_api,
    batch_api,
    embeddings_api,
    files_api,
    mcp_api,
    models_api,
    openai_api,
    responses_api,
    sessions_api,
    tgi_api,
    tokens_api,
    ws_api,
)
from .auth import IdentityMiddleware, KeyThrottle, login, login_page
from .connections import WebSocketLimitMiddleware, exempt_peers
from .errors import install_error_handlers
from .gradio_guard import mount_ui
from .guards import BodyLimitMiddleware, DrainMiddleware
from .origin import SameSiteMiddleware, own_names
from .ui import ASSETS, create_ui, ui_css, ui_js

log = logging.getLogger("shoal.http")


def create_app(services: Services, *, with_ui: bool = True, own_services: bool = True) -> FastAPI:
    """`own_services`: preload models at start-up and close the services at shutdown (tests
    share one set of services between several apps and pass False)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if own_services:
            services.preload()
        if services.settings.share:
            threading.Thread(target=_share, args=(services.settings,), daemon=True).start()
        yield
        if own_services:
            services.close()

    settings = services.settings
    app = FastAPI(title="Shoal", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="A pool of LLMs behind OpenAI- (chat, completions, Responses), Anthropic- and "
                  "TGI-compatible APIs, with MCP tools and a chat UI.")
    app.state.services = services
    app.state.key_throttle = throttle = KeyThrottle.from_settings(settings)
    install_error_handlers(app)
    for module in (models_api, openai_api, responses_api, anthropic_api, tgi_api, tokens_api, embeddings_api, batch_api,
                   mcp_api,
                   sessions_api, files_api, ws_api):
        app.include_router(module.router)
    _add_service_routes(app, services)
    _add_docs(app)
    if with_ui:
        mount_ui(app, create_ui(services), settings, css=ui_css(), favicon_path=str(ASSETS / "logo.svg"),
                 footer_links=["api", "settings"], show_error=True, js=ui_js())
    # Middleware runs outermost last-added first: Host and cross-site checks, drain, body limit,
    # open WebSockets per client, CORS (answers preflights, and puts its headers on 401s too), then
    # who the caller is.
    app.add_middleware(IdentityMiddleware, identity=services.identity, throttle=throttle)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(WebSocketLimitMiddleware, max_per_client=settings.max_websockets_per_client,
                       exempt=exempt_peers(settings))
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_request_mb * 1e6),
                       upload_bytes=int(settings.max_upload_mb * 1e6) + 1_000_000)
    app.add_middleware(DrainMiddleware, services=services)
    app.add_middleware(SameSiteMiddleware, names=own_names(settings, socket.gethostname().lower()),
                       cors_origins=settings.cors_origins)
    return app


def _share(settings) -> None:
    """Ask Gradio's share server for a public link; offline, say so and keep serving locally."""
    from gradio.networking import setup_tunnel
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        url = setup_tunnel(host, settings.port, secrets.token_urlsafe(32), None, None)
    except Exception as exc:  # no internet, blocked, or the share server is down
        log.error("Could not create a public share link (%s: %s). Shoal keeps running locally at "
                  "http://%s:%s", type(exc).__name__, exc.__cause__ or exc, host, settings.port)
        return
    log.info("Public share link: %s (it expires after a while; anyone with it can use this app)", url)


def _add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts served from here, not a CDN: they work
    offline and on a machine that reaches nothing else. Same owner as /openapi.json."""
    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Shoal API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="Shoal API",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)


def _add_service_routes(app: FastAPI, services: Services) -> None:
    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/login", include_in_schema=False)
    async def login_form() -> HTMLResponse:
        return HTMLResponse(login_page())

    app.post("/login", include_in_schema=False)(login)
