"""Where a model lives: an existing local directory or a plausible Hugging Face hub id.

Kept free of torch and transformers so the command line can check a ``--model`` path in milliseconds, before any
heavy import or Ray start (:mod:`vembed.model.hf` re-exports both functions for the model code).
"""

from __future__ import annotations

import re
from pathlib import Path

# "org/name" or "name": what a Hugging Face hub id can look like (a local path that does not exist cannot).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def resolve_source(path_or_id: str | Path) -> str:
    """Return an existing local directory (as a string) or a plausible hub id; otherwise raise.

    Raises:
        FileNotFoundError: a path that does not exist (absolute, relative with ``./``, ``~``, or any string that cannot
            be a hub id), or an existing file where a directory is expected.
    """
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"model path {path} is a file; expected a model directory (config.json + weights)")
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text
    raise FileNotFoundError(
        f"model path not found: {path} (no such directory, and it is not a Hugging Face hub id like 'org/name')"
    )


def is_local(source: str) -> bool:
    """True when ``source`` is an existing local directory (not a hub id)."""
    return Path(source).is_dir()
