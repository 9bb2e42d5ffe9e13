"""The service layer: what every adapter (HTTP routes, WebSocket, Gradio UI) calls.

`Services` is built once by the composition root from `Settings` and holds the pool and the
stores; adapters receive it and hold no state of their own.
"""

from .services import Services, build_services
from .settings import Settings

__all__ = ["Services", "Settings", "build_services"]
