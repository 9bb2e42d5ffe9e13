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
        # Every connection comes from the Space's proxy, which holds the clients' connections:
        # counting connections per address would bound all users together.
        os.environ.setdefault("SHOAL_MAX_CONNECTIONS_PER_CLIENT", "0")
    from service import Settings
    settings = Settings.from_cli(sys.argv[1:] if argv is None else argv)
    if os.environ.get("SPACE_HOST"):  # the Space's own name (user-space.hf.space): Host checks accept it
        settings = settings.model_copy(update={"allowed_hosts": [*settings.allowed_hosts, os.environ["SPACE_HOST"]]})
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())
    raise_descriptor_limit()
    from server.app import create_app
    from server.connections import server_config
    from service import build_services
    DrainingServer = _draining_server_class()
    services = build_services(settings)
    app = create_app(services)
    logging.getLogger("shoal").info("Shoal on http://%s:%s (data in %s)", settings.host, settings.port,
                                    settings.data_dir)
    server = DrainingServer(server_config(app, settings), services, settings.drain_timeout)
    server.run()
    if server.drained is False:
        sys.exit(1)


def raise_descriptor_limit() -> None:
    """Open files (each connection is one): the soft limit up to the hard one, where allowed.
    The common default of 1024 is what a few hundred slow clients exhaust."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logging.getLogger("shoal").warning("could not raise the open-files limit from %d: %s", soft, exc)
        return
    logging.getLogger("shoal").info("open-files limit raised from %d to %d", soft, target)


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
