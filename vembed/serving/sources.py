"""Image strings from requests -> encoded bytes -> PIL images, within the server's limits.

Only inline data is read by default (a data URL or bare base64). A ``file://`` path is read only when
``allowed_image_root`` is set and the resolved path (symlinks followed) lies inside it; an ``http(s)://`` URL is
fetched only when it starts with one of ``allowed_url_prefixes``, without following redirects, reading at most
``max_image_bytes``. Decoding goes through :func:`vembed.data.images.decode_image`, the one decode path that
training and batch embedding use, which refuses non-images and decompression bombs.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

from vembed.data.images import BadImageError, ImageTooLargeError, decode_image
from vembed.serving.errors import APIError
from vembed.serving.settings import ServeArgs

INLINE_HELP = "send the image inline as a data URL ('data:image/png;base64,...') or as base64"


def read_image_source(source: str, args: ServeArgs, param: str) -> bytes:
    """The encoded bytes an image string refers to; 4xx :class:`APIError` for anything not allowed or too large."""
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(
                400,
                f"{param}: data URLs must be base64 ('data:<type>;base64,<data>')",
                param=param,
                code="invalid_image",
            )
        return _b64decode(payload, args, param)
    if source.startswith("file://"):
        return _read_file(source[len("file://") :], args, param)
    if source.startswith(("http://", "https://")):
        return _fetch_url(source, args, param)
    return _b64decode(source, args, param)


def load_request_image(data: bytes, args: ServeArgs, param: str) -> Image.Image:
    """Decode encoded image bytes (already within ``max_image_bytes``) to an RGB PIL image."""
    check_image_bytes(len(data), args, param)
    try:
        return decode_image(data, source=param, max_pixels=args.max_image_pixels)
    except BadImageError as exc:
        status, code = (413, "image_too_large") if isinstance(exc, ImageTooLargeError) else (400, "invalid_image")
        raise APIError(status, str(exc), param=param, code=code) from exc  # the message starts with param


def check_image_bytes(size: int, args: ServeArgs, param: str) -> None:
    """413 when an encoded image is larger than ``max_image_bytes``."""
    if size > args.max_image_bytes:
        raise APIError(
            413,
            f"{param}: image of {size} bytes exceeds the limit of {args.max_image_bytes} bytes (max_image_bytes)",
            param=param,
            code="image_too_large",
        )


def _b64decode(payload: str, args: ServeArgs, param: str) -> bytes:
    compact = "".join(payload.split())  # tolerate line-wrapped base64
    # Refuse oversize payloads before allocating the decoded bytes.
    check_image_bytes(len(compact) * 3 // 4 - compact[-2:].count("="), args, param)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400,
            f"{param}: not a data URL or valid base64 (server file paths need 'file://' and allowed_image_root); "
            + INLINE_HELP,
            param=param,
            code="invalid_image",
        ) from None


def _read_file(raw_path: str, args: ServeArgs, param: str) -> bytes:
    if not args.allowed_image_root:
        raise APIError(
            403,
            f"{param}: this server does not read server-side files; {INLINE_HELP}",
            param=param,
            code="file_access_disabled",
        )
    root = Path(args.allowed_image_root).resolve()
    path = (root / raw_path).resolve()  # an absolute raw_path replaces root, then must still lie inside it
    if not path.is_relative_to(root):
        raise APIError(
            403, f"{param}: {raw_path!r} is outside the allowed image root", param=param, code="path_not_allowed"
        )
    if not path.is_file():
        raise APIError(
            400,
            f"{param}: no image file at {raw_path!r} under the allowed image root",
            param=param,
            code="image_not_found",
        )
    check_image_bytes(path.stat().st_size, args, param)
    return path.read_bytes()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could leave the allow-listed prefix, so none is followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers, fp)


def _escapes_prefix(url: str) -> bool:
    """Dot segments (``/allowed/../private``, also percent-encoded), backslashes or credentials could make the
    server fetch outside an allowed prefix that the raw string starts with."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path)
    return "@" in parts.netloc or "\\" in url or any(seg in (".", "..") for seg in path.split("/"))


def _fetch_url(url: str, args: ServeArgs, param: str) -> bytes:
    if _escapes_prefix(url) or not any(url.startswith(prefix) for prefix in args.allowed_url_prefixes):
        raise APIError(
            403, f"{param}: this server does not fetch this URL; {INLINE_HELP}", param=param, code="url_not_allowed"
        )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=args.url_timeout_s) as response:
            data = response.read(args.max_image_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise APIError(400, f"{param}: could not fetch {url}: {exc}", param=param, code="image_fetch_failed") from None
    check_image_bytes(len(data), args, param)
    return data
