"""Shoal: a pool of LLMs behind a chat UI and OpenAI/TGI-compatible APIs.

    python app.py            # UI and API on http://127.0.0.1:7860
    python app.py --help     # every setting (also SHOAL_* environment variables)

This is the composition root: it reads settings once, builds the services and the HTTP app, and
runs uvicorn. Nothing else reads the environment.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if os.environ.get("SPACE_ID"):  # a Hugging Face Space routes to 0.0.0.0:7860
        os.environ.setdefault("SHOAL_HOST", "0.0.0.0")
    from service import Settings
    settings = Settings.from_cli(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from server.app import create_app
    from service import build_services
    services = build_services(settings)
    app = create_app(services)
    logging.getLogger("shoal").info("Shoal on http://%s:%s (data in %s)", settings.host, settings.port,
                                    settings.data_dir)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
