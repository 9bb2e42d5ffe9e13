"""Shoal: a pool of LLMs behind a chat UI and OpenAI/TGI-compatible APIs.

    python app.py            # UI and API on http://127.0.0.1:7860
    python app.py --help     # every setting (also SHOAL_* environment variables)

This is the composition root: it reads settings once, builds the services and the HTTP app, and
runs uvicorn. Nothing else reads the environment.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if os.environ.get("SPACE_ID"):  # a Hugging Face Space: public, routed to 0.0.0.0:7860
        os.environ.setdefault("SHOAL_HOST", "0.0.0.0")
        os.environ.setdefault("SHOAL_TRUST_LOOPBACK", "false")  # the Space's proxy is not the owner
    from service import Settings
    settings = Settings.from_cli(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())
    import uvicorn

    from server.app import create_app
    from service import build_services
    DrainingServer = _draining_server_class()
    services = build_services(settings)
    app = create_app(services)
    logging.getLogger("shoal").info("Shoal on http://%s:%s (data in %s)", settings.host, settings.port,
                                    settings.data_dir)
    # X-Forwarded-For is believed only from the proxies named in --forwarded-allow-ips (uvicorn
    # would believe any local peer: behind the share tunnel, anyone could claim to be 127.0.0.1).
    forwarded = settings.forwarded_allow_ips.strip()
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=3, proxy_headers=bool(forwarded),
                            forwarded_allow_ips=forwarded or None,
                            ws_max_size=int(settings.max_request_mb * 1e6))
    server = DrainingServer(config, services, settings.drain_timeout)
    server.run()
    if server.drained is False:
        sys.exit(1)


class RedactSecrets(logging.Filter):
    """Access-log lines never carry a secret sent in a URL (keys there are refused anyway)."""

    _SECRET = re.compile(r"((?:api_key|key|token|access_token|secret)=)[^&\s\"]+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(self._SECRET.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: answer new requests 503, let in-flight generations finish (up to
        the drain timeout), then shut down and exit 0. A second signal exits at once."""

        def __init__(self, config, services, drain_timeout: float):
            super().__init__(config)
            self.services, self.drain_timeout, self.drained = services, drain_timeout, None

        def handle_exit(self, sig, frame) -> None:
            if self.services.draining:
                self.should_exit = True
                return
            logging.getLogger("shoal").info("draining: new requests get 503; waiting up to %.0f s for %d "
                                            "in flight", self.drain_timeout, self.services.pool.in_flight())
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self) -> None:
            self.drained = self.services.drain(self.drain_timeout)
            self.should_exit = True

    return DrainingServer


if __name__ == "__main__":
    main()
