"""Every route Gradio mounts in Shoal, and what Shoal decided about each: open (to whom, why) or
closed (404). `GradioGuard` (server/gradio_guard.py) answers with this table; a route Gradio adds
in an upgrade and this table does not name is closed until someone decides, and
tests/security/test_gradio_surface.py fails until it is named.

"anyone" means whoever may use the web UI: anyone with keys off, a user with keys on (the
identity middleware asks for a key before a request gets here). Routes are keyed by the path
Gradio declares, so they match exactly as Gradio's own router matches them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from starlette.routing import Mount, compile_path


@dataclass(frozen=True)
class Decision:
    owner: str  # "anyone", or "closed"
    why: str
    only: str | None = None  # open only for request paths matching this (else closed)
    checked: str | None = None  # what the guard checks on the way in: "events" or "upload" or "file"

    @property
    def closed(self) -> bool:
        return self.owner == "closed"


def _open(why: str, only: str | None = None, checked: str | None = None) -> Decision:
    return Decision("anyone", why, only, checked)


def _closed(why: str) -> Decision:
    return Decision("closed", why)


_UNUSED = "not used by Shoal's page or by gradio_client"
_RUN_HISTORY = _closed("run history is off (it would keep chats in the browser, or in a bucket the caller names)")
_AUTH = _closed("Gradio's own password login, unused: Shoal signs in at its own /login")
_VIBE = _closed("Gradio's vibe editor: edits and runs app code; never for a served app")
_STREAMS = _closed("streaming media in or out: no Shoal component streams")
_EVENTS = ("Files named in an event's data must be this client's own recent uploads (403); the same "
           "rule as for the page's events")

ROUTES: dict[str, Decision] = {
    # ---- the page
    "/": _open("the web UI's page"),
    "/config": _open("the page and gradio_client read the layout and the events from it"),
    "/config/": _open("as /config"),
    "/assets/{path:path}": _open("the page's scripts and styles (Gradio's package files, no traversal)"),
    "/static/{path:path}": _open("Gradio's fonts and static scripts (package files, no traversal)"),
    "/favicon.ico": _open("the tab's icon (Shoal's logo)"),
    "/theme.css": _open("the page's theme"),
    "/robots.txt": _open("tells crawlers what they may read"),
    "/gradio_api/theme.css": _closed("the page reads /theme.css"),
    "/svelte/{path:path}": _closed("server-side rendering only (off)"),
    "/manifest.json": _closed("installable-app manifest: PWA is off"),
    "/pwa_icon": _closed("PWA is off"),
    "/pwa_icon/{size}": _closed("PWA is off; it resized images on request (CPU for anyone)"),
    "/openapi.json": _closed("shadowed: Shoal's own /openapi.json answers first"),
    # ---- events: the one door to the UI's handlers
    "/gradio_api/queue/join": _open("the page's events and gradio_client's calls. " + _EVENTS, checked="events"),
    "/gradio_api/queue/data": _open("the event stream of the caller's page (by its session hash)"),
    "/gradio_api/run/{api_name}": _open(
        "only /gradio_api/run/predict: the page's door for its few unqueued events (queued ones are 404, "
        "demo.queue(api_open=False)). " + _EVENTS, only=r"/gradio_api/run/predict", checked="events"),
    "/gradio_api/run/{api_name}/": _closed("see /gradio_api/run/{api_name}"),
    "/gradio_api/api/{api_name}": _closed("the old name of /gradio_api/run/"),
    "/gradio_api/api/{api_name}/": _closed("the old name of /gradio_api/run/"),
    "/gradio_api/call/v2/{api_name}": _open("the curl recipe of the page's 'Use via API' (named endpoints "
                                            "only). " + _EVENTS, checked="events"),
    "/gradio_api/call/v2/{api_name}/": _closed("see /gradio_api/call/v2/{api_name}"),
    "/gradio_api/call/{api_name}/{event_id}": _open("the result stream of a call/v2 (the curl recipe's second "
                                                    "step)"),
    "/gradio_api/call/v2/{api_name}/{event_id}": _closed(_UNUSED),
    "/gradio_api/call/{api_name}": _closed("the older form of call/v2 (" + _UNUSED + ")"),
    "/gradio_api/call/{api_name}/": _closed("the older form of call/v2"),
    "/gradio_api/cancel": _open("the Stop buttons (names the caller's own session hash and event)"),
    "/gradio_api/reset": _open("posted by the page on Stop; a no-op in Gradio 6"),
    "/gradio_api/reset/": _closed("see /gradio_api/reset"),
    "/gradio_api/heartbeat/{session_hash}": _open("the page's heartbeat: a closed tab stops its generation"),
    "/gradio_api/info": _open("gradio_client and the 'Use via API' page list the named endpoints"),
    "/gradio_api/info/": _open("as /gradio_api/info"),
    "/gradio_api/component_server": _closed("no Shoal component has server functions"),
    "/gradio_api/component_server/": _closed("no Shoal component has server functions"),
    "/gradio_api/queue/status": _closed(_UNUSED),
    "/gradio_api/startup-events": _closed("the mounted app starts its queue in the server's lifespan"),
    # ---- files
    "/gradio_api/upload": _open("the Files panel and chat import. Counted against the client's upload "
                                "budget (--upload-budget-mb, --upload-budget-files per --upload-window; 429); "
                                "deleted once used, or after --upload-ttl if no event uses them",
                                checked="upload"),
    "/gradio_api/upload_progress": _open("the page shows an upload's progress"),
    "/gradio_api/file={path_or_url:path}": _open(
        "serves what Gradio made for the page (chat exports) and a client's own uploads (only to that "
        "client); never a URL (no fetching for others), never the data dir, the model cache or secrets",
        checked="file"),
    "/gradio_api/file/{path:path}": _closed("the old name of /gradio_api/file="),
    "/gradio_api/deep_link": _closed("dumped a session's state (the cached paths of its files) and wrote a file "
                                     "on every call; Shoal has no deep links"),
    "/gradio_api/proxy={url_path:path}": _closed("proxies files of Spaces loaded with gr.load: none"),
    "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}": _closed("no custom components"),
    "/gradio_api/process_recording": _closed("audio/video recording (ran ffmpeg on uploads): no such input"),
    "/gradio_api/stream/{event_id}": _STREAMS,
    "/gradio_api/stream/{event_id}/close": _STREAMS,
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8": _STREAMS,
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}": _STREAMS,
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file": _STREAMS,
    # ---- Gradio features Shoal does not use
    "/login": _AUTH,
    "/login/": _AUTH,
    "/logout": _AUTH,
    "/gradio_api/user": _AUTH,
    "/gradio_api/user/": _AUTH,
    "/gradio_api/login_check": _AUTH,
    "/gradio_api/login_check/": _AUTH,
    "/gradio_api/token": _AUTH,
    "/gradio_api/token/": _AUTH,
    "/gradio_api/app_id": _closed(_UNUSED),
    "/gradio_api/app_id/": _closed(_UNUSED),
    "/gradio_api/openapi.json": _closed(_UNUSED),
    "/gradio_api/dev/reload": _closed("development reload only"),
    "/monitoring": _closed("Gradio's monitoring dashboard (every user's event statistics)"),
    "/monitoring/summary": _closed("every user's event statistics"),
    "/monitoring/{key}": _closed("Gradio's monitoring dashboard"),
    "/gradio_api/runs": _RUN_HISTORY,
    "/gradio_api/runs/": _RUN_HISTORY,
    "/gradio_api/run-history/connect": _RUN_HISTORY,
    "/gradio_api/run-history/buckets": _RUN_HISTORY,
    "/gradio_api/run-history/records": _RUN_HISTORY,
    "/gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}": _RUN_HISTORY,
    "/gradio_api/vibe-edit": _VIBE,
    "/gradio_api/vibe-edit/": _VIBE,
    "/gradio_api/undo-vibe-edit": _VIBE,
    "/gradio_api/undo-vibe-edit/": _VIBE,
    "/gradio_api/vibe-code": _VIBE,
    "/gradio_api/vibe-code/": _VIBE,
    "/gradio_api/vibe-starter-queries": _VIBE,
    "/gradio_api/vibe-starter-queries/": _VIBE,
}

# Paths Shoal's own routes answer before the mounted app is asked (its /openapi.json, its sign-in).
SHADOWED = frozenset({"/openapi.json", "/login"})

UNDECIDED = _closed("a route this Shoal version has not decided about (a newer Gradio?)")


@dataclass(frozen=True)
class MountedRoute:
    path: str  # as Gradio declares it, prefix included
    methods: frozenset[str]
    regex: re.Pattern

    @property
    def decision(self) -> Decision:
        return ROUTES.get(self.path, UNDECIDED)


def mounted_routes(app) -> list[MountedRoute]:
    """The routes of a Gradio (FastAPI) app, flattened, in the order its router tries them."""
    return [MountedRoute(path, frozenset(methods), compile_path(path)[0]) for path, methods in _walk(app.routes)]


def _walk(routes, prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    for route in routes:
        if isinstance(route, Mount):
            yield from _walk(route.routes, prefix + route.path)
        elif hasattr(route, "original_router"):  # FastAPI's included router (its routes keep their own paths)
            yield from _walk(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "path"):
            yield prefix + route.path, set(getattr(route, "methods", None) or {"GET"})


def decide(routes: list[MountedRoute], method: str, path: str) -> Decision:
    """The decision for a request, as Gradio's router would pick its route: the first whose path
    and method match. No route at all: closed."""
    for route in routes:
        if route.regex.match(path) and method in route.methods:
            decision = route.decision
            if decision.only and not re.fullmatch(decision.only, path):
                return _closed("not this path")
            return decision
    return UNDECIDED
