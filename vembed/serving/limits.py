"""Request limits: body size, items per request, characters per text, the served model's name.

Each check raises an :class:`APIError` naming the limit, the offending field and the configured value, so a
client can tell what to change. Limits on images live with the image reading in ``vembed.serving.sources``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vembed.serving.errors import APIError
from vembed.serving.settings import ServeArgs


def check_model(requested: Optional[str], served: str) -> None:
    """A ``model`` other than the served one is a 404 ``model_not_found`` (as in the OpenAI API)."""
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"the model {requested!r} does not exist on this server; it serves {served!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def check_item_count(count: int, args: ServeArgs, param: str) -> None:
    """At least one and at most ``max_items`` inputs per request."""
    if count == 0:
        raise APIError(400, f"{param} is empty; send at least one item", param=param, code="empty_input")
    if count > args.max_items:
        raise APIError(
            413,
            f"{param} has {count} items; this server accepts at most {args.max_items} per request (max_items)",
            param=param,
            code="too_many_items",
        )


def item_param(param: str, i: int, offsets: Optional[Sequence[int]] = None) -> str:
    """``input[7]``: the request field of the ``i``-th checked item; ``offsets`` maps it to its index in the request
    when only some items are checked (texts interleaved with images)."""
    return f"{param}[{offsets[i] if offsets is not None else i}]"


def check_texts(texts: Sequence[str], args: ServeArgs, param: str, offsets: Optional[Sequence[int]] = None) -> None:
    """Every text non-blank and at most ``max_text_chars`` characters (``offsets``: see :func:`item_param`)."""
    for i, text in enumerate(texts):
        where = item_param(param, i, offsets)
        if not text.strip():
            raise APIError(
                400, f"{where} is empty; every text needs a non-space character", param=where, code="empty_input"
            )
        if len(text) > args.max_text_chars:
            raise APIError(
                413,
                f"{where} has {len(text)} characters; the limit is {args.max_text_chars} (max_text_chars)",
                param=where,
                code="text_too_long",
            )


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether it declares its length or streams.

    A declared ``Content-Length`` is refused before anything is read; a chunked body is counted as it arrives
    and the route fails with the same 413 when it crosses the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int) -> APIError:
        return APIError(
            413,
            f"request body of {size} bytes exceeds this server's limit of {self.max_bytes} bytes (max_request_bytes)",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(int(declared)).response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(received)
            return message

        await self.app(scope, counting_receive, send)
