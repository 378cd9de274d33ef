"""Every failed request becomes a JSON error in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Handlers here turn our :class:`APIError`, FastAPI's validation errors (malformed JSON, wrong types), Starlette's
HTTP errors (unknown route, wrong method) and anything unexpected into that shape, so no client ever sees an HTML
page or a bare 500, and an exception never escapes into the replica.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("vembed.serving")

# status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",  # OpenAI: an unknown model is invalid_request_error / model_not_found
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(StarletteHTTPException):
    """A request the server refuses, with the HTTP status and the OpenAI-style error fields.

    It is an HTTPException so FastAPI passes it through unchanged even when raised while the body is read.
    """

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(status_code=status, detail=message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def param_path(loc: Sequence[Any]) -> Optional[str]:
    """``("body", "input", 2, "ImageItem", "image")`` -> ``"input[2].image"`` (the field a client has to fix).

    Pydantic adds the tried union member to a location (``str``, ``ImageItem``, ``list[...]``); those are dropped.
    """
    text = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "form") else loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not ("[" in part or "-" in part or part[:1].isupper() or part in TYPE_NAMES):
            text += f".{part}" if text else part
    return text or None


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """Pydantic/FastAPI validation errors as one 400 (OpenAI answers schema errors with 400, not 422).

    The deepest errors are reported: for a union such as ``str | list[str | ImageItem]`` that is the branch the
    client came closest to, e.g. ``input[2].image: Input should be a valid string``.
    """
    if not errors:
        return APIError(400, "invalid request body", code="invalid_request")
    if errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    if tuple(errors[0].get("loc", ())) == ("body",):
        return APIError(
            400, "request body must be a JSON object sent as Content-Type: application/json", code="invalid_json"
        )
    depth = max(len(e.get("loc", ())) for e in errors)
    deepest = [e for e in errors if len(e.get("loc", ())) == depth]
    param = param_path(deepest[0].get("loc", ()))
    messages = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in deepest))
    message = " or ".join(messages)
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error response the OpenAI shape."""

    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, code="http_error").response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        body = {"error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
