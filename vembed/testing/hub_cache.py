"""A Hugging Face hub cache laid out on disk from a local model directory, for offline tests of hub-id loading.

``huggingface_hub`` and ``transformers`` resolve a hub id such as ``org/name`` through the cache at
``HF_HUB_CACHE``: ``models--org--name/refs/main`` names a commit, ``snapshots/<commit>/`` holds the files and
``.no_exist/<commit>/<file>`` records files known to be absent from the repo. With ``HF_HUB_OFFLINE=1`` that is all
they read, so a cache written here behaves like a previously downloaded repo, without any network.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache_dir: str | Path, repo_id: str, source: str | Path, known_missing: Iterable[str] = ()) -> Path:
    """Copy the files of ``source`` into ``cache_dir`` as the cached snapshot of ``repo_id``; returns the snapshot.

    ``known_missing`` are file names recorded as absent from the repo (what the hub client writes after a 404).
    """
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    for name in known_missing:
        marker = repo / ".no_exist" / FAKE_COMMIT / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return snapshot
