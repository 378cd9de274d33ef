"""Evaluation: exact chunked search, retrieval metrics, evaluators and reports.

The numerics (:mod:`~vembed.evaluation.metrics`, :mod:`~vembed.evaluation.search`) use torch and numpy only (no Ray,
no model code), so training-time validation and the evaluators share one implementation of every metric. Names load
on first use, so importing ``vembed.evaluation.cli`` (for ``vembed --help``) does not import torch.
"""

from __future__ import annotations

from vembed.lazy import lazy_getattr

_EXPORTS = {
    "LabelRelevance": "vembed.evaluation.metrics",
    "ListRelevance": "vembed.evaluation.metrics",
    "metrics_from_ranks": "vembed.evaluation.metrics",
    "metrics_per_dim": "vembed.evaluation.metrics",
    "relevant_ranks": "vembed.evaluation.metrics",
    "retrieval_metrics": "vembed.evaluation.metrics",
    "maxsim_scores": "vembed.evaluation.search",
    "maxsim_topk": "vembed.evaluation.search",
    "search_topk": "vembed.evaluation.search",
    "write_report": "vembed.evaluation.report",
    "render_markdown": "vembed.evaluation.report",
    "EvalSet": "vembed.evaluation.evalset",
    "load_eval_set": "vembed.evaluation.evalset",
    "evaluate_predictor": "vembed.evaluation.evaluator",
    "evaluate_model_path": "vembed.evaluation.evaluator",
    "evaluate_with_ray": "vembed.evaluation.embedded",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("vembed.evaluation", _EXPORTS)
