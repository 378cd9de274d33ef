"""Overload protection: past a replica's capacity, a request gets an immediate 503 with an OpenAI-shaped JSON
error and ``Retry-After``, instead of waiting in an unbounded queue until the client times out.

A replica admits ``max_ongoing_requests`` (what its batches work on) plus ``max_queued_requests`` (what may wait
for a batch slot); Ray Serve delivers a few more than that to the replica (see
:meth:`ServeArgs.deployment_options`) so that the excess reaches this middleware and is refused here in JSON
rather than by the Serve proxy (whose own backpressure answer is plain text). The probes (``/health``, ``/ready``)
are never refused, so an overloaded replica is not mistaken for a dead one.
"""

from __future__ import annotations

from typing import Any

from vembed.serving.errors import APIError

EXEMPT_PATHS = ("/health", "/ready")


class AdmissionLimit:
    """ASGI middleware: at most ``max_in_flight`` HTTP requests in this replica at once; the rest get 503."""

    def __init__(self, app: Any, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.rejected = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "").endswith(EXEMPT_PATHS):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            self.rejected += 1
            error = APIError(
                503,
                f"the server is overloaded ({self.in_flight} requests in this replica, at most {self.max_in_flight}"
                "); retry after a moment",
                code="server_overloaded",
            )
            response = error.response()
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
