"""Optional API key: ``Authorization: Bearer <key>``, the key read from a file or an environment variable.

The key is read inside each replica (not passed through the Serve config, where it would be visible), so a
KubeRay secret mounted as a file or exported as an env var reaches the replicas without appearing in any manifest.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import Optional

from vembed.serving.errors import APIError
from vembed.serving.settings import ServeArgs

logger = logging.getLogger("vembed.serving")


def load_api_key(args: ServeArgs) -> Optional[str]:
    """The configured key (file first, then env var), or ``None`` when the server is open.

    Raises ``FileNotFoundError``/``ValueError`` when a configured key file is missing or empty, and ``ValueError``
    when ``require_api_key`` is set but no key is found, so a misconfigured server fails at start, not open.
    """
    key: Optional[str] = None
    if args.api_key_file:
        path = Path(args.api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file {str(path)!r} does not exist; create it or unset api_key_file")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"api_key_file {str(path)!r} is empty; write the API key into it")
    elif args.api_key_env:
        key = os.environ.get(args.api_key_env, "").strip() or None
    if key is None and args.require_api_key:
        raise ValueError(
            "require_api_key is set but no API key was found: set api_key_file, "
            f"or export {args.api_key_env or 'the variable named by api_key_env'}"
        )
    if key is None:
        logger.warning("vembed serve: no API key configured, every client is accepted")
    return key


def check_api_key(token: Optional[str], api_key: Optional[str]) -> None:
    """Raise a 401 :class:`APIError` unless the bearer ``token`` equals ``api_key`` (no-op when the server is open).

    ``token`` is the credential of an ``Authorization: Bearer <token>`` header, ``None`` when the header is absent
    or uses another scheme. The comparison takes constant time.
    """
    if api_key is None:
        return
    if not token:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="missing_api_key")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")
