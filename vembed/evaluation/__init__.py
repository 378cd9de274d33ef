"""Evaluation numerics: exact chunked search, retrieval metrics and reports.

Import-light on purpose (torch and numpy only; no Ray, no model code) so that training-time validation
and the evaluators share one implementation of every metric.
"""

from vembed.evaluation.metrics import (
    LabelRelevance,
    ListRelevance,
    metrics_from_ranks,
    metrics_per_dim,
    relevant_ranks,
    retrieval_metrics,
)
from vembed.evaluation.report import render_markdown, write_report
from vembed.evaluation.search import maxsim_scores, maxsim_topk, search_topk

__all__ = [
    "LabelRelevance",
    "ListRelevance",
    "maxsim_scores",
    "maxsim_topk",
    "metrics_from_ranks",
    "metrics_per_dim",
    "relevant_ranks",
    "render_markdown",
    "retrieval_metrics",
    "search_topk",
    "write_report",
]
