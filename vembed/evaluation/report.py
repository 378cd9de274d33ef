"""Evaluation reports: JSON, a Markdown table (before/after with deltas) and an optional Recall@K plot.

Metrics are the dicts of :mod:`vembed.evaluation.metrics`: flat ``{name: value}``, or nested per
Matryoshka dim ``{dim: {name: value}}``. Rates (every key not starting with ``num_``) are shown in percent
and deltas in percentage points (``(model - baseline) * 100``); counts (``num_*``) are shown as integers,
without a delta.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

Flat = Mapping[str, float]
Metrics = Mapping[str, float] | Mapping[int, Mapping[str, float]]

JSON_NAME, MARKDOWN_NAME, PNG_NAME = "metrics.json", "metrics.md", "recall_at_k.png"


def _is_count(name: str) -> bool:
    return name.startswith("num_")


def _sections(metrics: Metrics, what: str) -> dict[str | None, Flat]:
    """``{None: flat}`` for a flat dict, ``{"dim D": flat}`` per dim for a nested one; validates values."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(f"{what} must be a non-empty dict of metrics, got {metrics!r:.80}")
    nested = [isinstance(v, Mapping) for v in metrics.values()]
    if any(nested) and not all(nested):
        raise ValueError(
            f"{what} mixes per-dim dicts and plain values; pass either {{name: value}} or {{dim: {{name: value}}}}"
        )
    sections = {f"dim {key}": value for key, value in metrics.items()} if all(nested) else {None: metrics}
    for label, flat in sections.items():
        for name, value in flat.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                where = f"{what}[{label!r}][{name!r}]" if label else f"{what}[{name!r}]"
                raise ValueError(f"{where} must be a number, got {value!r}")
    return sections


def _cell(name: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{int(value)}" if _is_count(name) else f"{100 * value:.2f}"


def _delta_points(model: Flat, baseline: Flat) -> dict[str, float]:
    return {n: 100 * (model[n] - baseline[n]) for n in model if n in baseline and not _is_count(n)}


def _markdown(sections: dict, base_sections: dict | None, names: tuple[str, str], title: str) -> str:
    base_name, model_name = names
    lines = [f"# {title}", ""]
    if base_sections is None:
        lines += ["Rates in percent.", ""]
    else:
        lines += [f"Rates in percent; Δ is {model_name} − {base_name} in percentage points.", ""]
    for label, flat in sections.items():
        base = (base_sections or {}).get(label, {})
        if label is not None:
            lines += [f"## {label}", ""]
        if base_sections is None:
            lines += [f"| metric | {model_name} |", "|---|---:|"]
            lines += [f"| {n} | {_cell(n, v)} |" for n, v in flat.items()]
        else:
            lines += [f"| metric | {base_name} | {model_name} | Δ (points) |", "|---|---:|---:|---:|"]
            deltas = _delta_points(flat, base)
            for n in list(flat) + [n for n in base if n not in flat]:
                delta = f"{deltas[n]:+.2f}" if n in deltas else ""
                lines.append(f"| {n} | {_cell(n, base.get(n))} | {_cell(n, flat.get(n))} | {delta} |")
        lines.append("")
    return "\n".join(lines)


def _recall_curves(flat: Flat) -> tuple[list[int], list[float]]:
    points = sorted((int(m.group(1)), v) for n, v in flat.items() if (m := re.fullmatch(r"recall@(\d+)", n)))
    return [k for k, _ in points], [100 * v for _, v in points]


def _plot(path: Path, sections: dict, base_sections: dict | None, names: tuple[str, str], title: str) -> bool:
    """Recall@K curves for the model (solid) and baseline (dashed), one colour per section; False if unplottable."""
    try:
        from matplotlib.figure import Figure  # optional extra `plots`; pyplot-free, so no global backend change
    except ImportError:
        return False
    runs = [(names[1], sections, "-")] + ([(names[0], base_sections, "--")] if base_sections else [])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    all_ks: set[int] = set()
    for colour, label in enumerate(sections):
        for run_name, run_sections, style in runs:
            ks, values = _recall_curves(run_sections.get(label, {}))
            if ks:
                legend = run_name if label is None else f"{run_name} ({label})"
                ax.plot(ks, values, style, marker="o", color=f"C{colour}", label=legend)
                all_ks.update(ks)
    if not all_ks:
        return False
    ax.set(xlabel="K", ylabel="Recall@K (%)", title=title, xticks=sorted(all_ks))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _jsonable(metrics: Metrics | None) -> dict | None:
    if metrics is None:
        return None
    return {str(k): (_jsonable(v) if isinstance(v, Mapping) else v) for k, v in metrics.items()}


def _checked(metrics: Metrics, baseline: Metrics | None, names: tuple[str, str]) -> tuple[dict, dict | None]:
    """Validated sections of ``metrics`` and ``baseline`` (same shape) and the two column names."""
    sections = _sections(metrics, "metrics")
    base_sections = None if baseline is None else _sections(baseline, "baseline")
    if base_sections is not None and (None in sections) != (None in base_sections):
        raise ValueError("metrics and baseline must both be flat {name: value} or both per dim {dim: {name: value}}")
    if len(names) != 2 or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"names must be two non-empty strings (baseline, model), got {names!r}")
    return sections, base_sections


def render_markdown(
    metrics: Metrics,
    baseline: Metrics | None = None,
    names: tuple[str, str] = ("baseline", "model"),
    title: str = "Retrieval evaluation",
) -> str:
    """The Markdown table that :func:`write_report` writes to ``metrics.md`` (e.g. to print it)."""
    sections, base_sections = _checked(metrics, baseline, names)
    return _markdown(sections, base_sections, names, title)


def write_report(
    metrics: Metrics,
    out_dir: str | Path,
    baseline: Metrics | None = None,
    names: tuple[str, str] = ("baseline", "model"),
    title: str = "Retrieval evaluation",
) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.md`` and, when matplotlib is installed, ``recall_at_k.png`` to ``out_dir``.

    ``baseline`` (e.g. the zero-shot model) adds a before/after table with deltas in points; it must have
    the same shape (flat or per dim) as ``metrics``. ``names`` labels the (baseline, model) columns.
    Returns ``{"json": path, "markdown": path}`` plus ``"png": path`` only when the plot was written
    (matplotlib missing, or no ``recall@K`` keys, means no PNG).
    """
    sections, base_sections = _checked(metrics, baseline, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    deltas = None
    if base_sections is not None:
        per_section = {label: _delta_points(flat, base_sections.get(label, {})) for label, flat in sections.items()}
        deltas = per_section[None] if None in per_section else {str(k): per_section[f"dim {k}"] for k in metrics}
    document = {
        "title": title,
        "names": {"baseline": names[0], "model": names[1]},
        "metrics": _jsonable(metrics),
        "baseline": _jsonable(baseline),
        "delta_points": deltas,
    }
    written = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME}
    written["json"].write_text(json.dumps(document, indent=2) + "\n")
    written["markdown"].write_text(_markdown(sections, base_sections, names, title))
    if _plot(out / PNG_NAME, sections, base_sections, names, title):
        written["png"] = out / PNG_NAME
    return written
