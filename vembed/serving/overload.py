"""Overload answers in JSON: Serve's own backpressure 503 becomes an OpenAI-shaped error.

Ray Serve enforces the deployment's ``max_ongoing_requests`` (per replica) and ``max_queued_requests`` (waiting in
front of the replicas) itself and answers the excess with a plain-text 503 (``Retry-After`` from
``backpressure_config``). That answer is written by Serve's HTTP proxy (or, in throughput-optimised mode, by the
replica's direct-ingress server) before vembed's app sees the request, so vembed does not count requests itself:
it rewrites that answer. :func:`proxy_middlewares` is Serve's HTTP proxy callback::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=vembed.serving.overload:proxy_middlewares

set in the environment of every Ray node (``vembed serve`` sets it for the Ray it starts; the Dockerfile sets it
for the cluster images). Without it the 503 still comes, as plain text.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware import Middleware

from vembed.serving.errors import APIError

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "vembed.serving.overload:proxy_middlewares"
REWRITTEN = (429, 503)


class JSONOverload:
    """ASGI middleware: a plain-text 429/503 (Serve's backpressure or unavailability answer) becomes JSON.

    Answers that are already JSON (every answer of vembed's own app) pass through untouched, as does everything
    else; ``Retry-After`` is kept.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        body = bytearray()

        async def rewrite(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if message["status"] in REWRITTEN and not headers.get(b"content-type", b"").startswith(
                    b"application/json"
                ):
                    held.update(message)
                    return
            elif held and message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                await self._send_json(send, held, body.decode("utf-8", "replace"))
                held.clear()
                return
            await send(message)

        await self.app(scope, receive, rewrite)

    @staticmethod
    async def _send_json(send: Any, start: dict[str, Any], text: str) -> None:
        status = start["status"]
        overloaded = "backpressure" in text.lower() or status == 429
        message = "the server is overloaded; retry after a moment" if overloaded else "the service is unavailable"
        error = APIError(
            status,
            f"{message} (Ray Serve: {text.strip() or 'no detail'})",
            code="server_overloaded" if overloaded else "service_unavailable",
        )
        response = error.response()
        for name, value in start.get("headers") or []:
            if name.lower() == b"retry-after":
                response.headers["Retry-After"] = value.decode()
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the JSON overload answer."""
    return [Middleware(JSONOverload)]
