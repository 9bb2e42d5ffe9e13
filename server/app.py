"""The HTTP application: API routers and the Gradio UI on one FastAPI app, one port."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import gradio as gr
from fastapi import FastAPI

from service import Services

from . import models_api, openai_api, tgi_api
from .errors import install_error_handlers
from .ui import ASSETS, create_ui, ui_css

log = logging.getLogger("shoal.http")


def create_app(services: Services, *, with_ui: bool = True, own_services: bool = True) -> FastAPI:
    """`own_services`: preload models at start-up and close the services at shutdown (tests
    share one set of services between several apps and pass False)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if own_services:
            services.preload()
        yield
        if own_services:
            services.close()

    app = FastAPI(title="Shoal", version="0.1.0", lifespan=lifespan,
                  description="A pool of LLMs behind OpenAI- and TGI-compatible APIs and a chat UI.")
    app.state.services = services
    install_error_handlers(app)
    app.include_router(models_api.router)
    app.include_router(openai_api.router)
    app.include_router(tgi_api.router)
    if with_ui:
        demo = create_ui(services)
        demo.queue(default_concurrency_limit=None, api_open=False)
        gr.mount_gradio_app(app, demo, path="", css=ui_css(), favicon_path=str(ASSETS / "logo.svg"),
                            footer_links=["api", "settings"], show_error=True,
                            allowed_paths=[], max_file_size=int(services.settings.max_upload_mb * 1e6))
    return app
