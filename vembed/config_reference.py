"""The configuration reference (``docs/configuration.md``), generated from ``configs/defaults.yaml``.

``configs/defaults.yaml`` is the single source: every key, its default and its comment. This module renders it
as Markdown tables, one per ``# ---- section ----``; ``tests/test_config_reference.py`` fails when the committed
reference and the defaults drift apart. Regenerate with::

    python -m vembed.config_reference > docs/configuration.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from vembed.config import DEFAULTS_PATH

REFERENCE_PATH = Path("docs") / "configuration.md"
_SECTION = re.compile(r"^#\s*-+\s*(.+?)\s*-+\s*$")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*?)\s*(?:#\s?(.*))?$")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_reference(defaults_text: str | None = None) -> str:
    """Markdown for every key of the defaults file (its text, or ``configs/defaults.yaml``)."""
    text = defaults_text if defaults_text is not None else DEFAULTS_PATH.read_text()
    out = [
        "# Configuration reference",
        "",
        "Generated from `configs/defaults.yaml` by `python -m vembed.config_reference > docs/configuration.md`;",
        "do not edit by hand. A run's configuration is defaults < a YAML file < `--config_override key=value`.",
    ]
    current: list[str] | None = None
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            out += ["", f"## {section.group(1)}", "", "| key | default | meaning |", "|---|---|---|"]
            current = out
            continue
        key = _KEY.match(line)
        if key and current is not None:
            name, default, comment = key.group(1), key.group(2), key.group(3) or ""
            out.append(f"| `{name}` | `{_cell(default)}` | {_cell(comment.strip())} |")
        elif line.startswith(" ") and line.strip().startswith("#") and current is not None and out[-1].endswith("|"):
            out[-1] = out[-1][: -len(" |")] + " " + _cell(line.strip().lstrip("#").strip()) + " |"  # continuation
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
