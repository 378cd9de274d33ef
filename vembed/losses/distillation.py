"""Distillation from a frozen teacher's similarity distributions, mixed with a contrastive loss.

Student and teacher each score their own queries against their own candidate pools, built the same
way (every positive of the batch, then every hard negative; gathered across ranks alike), so row
``b`` and column ``c`` mean the same (query, candidate) pair for both. With ``T`` the distillation
temperature, ``S`` the student and ``R`` the teacher score matrices (dot products):

- ``kl``:  ``T^2 * KL(softmax(R_b / T) || softmax(S_b / T))`` per query (Hinton et al. 2015; the
  ``T^2`` keeps gradient sizes independent of ``T``);
- ``mse``: ``mean_c (S_bc - R_bc)^2`` per query (regress the teacher's similarity scores).

The result is ``(1 - alpha) * contrastive + alpha * distill`` with ``contrastive`` an InfoNCE (or any
given loss) on the student. Teacher embeddings come as extra inputs, keyword arguments
``teacher_query`` ``[B, Dt]``, ``teacher_positive`` ``[B, Dt]`` and, when the student has hard
negatives, ``teacher_negatives`` shaped like them with ``Dt``; or keys of the same names in the
model outputs. ``Dt`` may differ from the student's dim. Teacher inputs are detached.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vembed.config import VEmbedConfig
from vembed.losses.base import EmbeddingLoss, LossInputs, check_class_labels, check_embedding
from vembed.losses.candidates import collect_candidates
from vembed.losses.infonce import InfoNCELoss
from vembed.losses.registry import register_loss
from vembed.losses.scale import LogitParameters

TEACHER_KEYS = ("teacher_query", "teacher_positive", "teacher_negatives")


def _teacher_inputs(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor | None]:
    """The validated, detached teacher embeddings, shaped like the student's except for the dim."""
    missing = [k for k in TEACHER_KEYS[:2] if k not in inputs.extra]
    if missing:
        raise ValueError(
            f"distillation needs the teacher's embeddings {missing}: pass them as keyword arguments "
            "or as keys of the model outputs (see vembed.losses.distillation)"
        )
    student = {"teacher_query": inputs.query, "teacher_positive": inputs.positive}
    student["teacher_negatives"] = inputs.negatives
    teacher: dict[str, Tensor | None] = {}
    for key in TEACHER_KEYS:
        t, s = inputs.extra.get(key), student[key]
        if (t is None) != (s is None):
            side = "the student has negatives but no teacher_negatives" if t is None else "negatives are missing"
            raise ValueError(f"distillation: {side}; teacher and student need the same candidates")
        if t is None:
            teacher[key] = None
            continue
        check_embedding(key, t)
        if t.shape[:-1] != s.shape[:-1]:
            raise ValueError(
                f"'{key}' {list(t.shape)} must match the student's shape {list(s.shape)} except the last (dim)"
            )
        teacher[key] = t.detach()
    return teacher["teacher_query"], teacher["teacher_positive"], teacher["teacher_negatives"]


@register_loss("distillation")
class DistillationLoss(EmbeddingLoss):
    """``(1 - alpha) * contrastive + alpha * (KL or MSE of student vs teacher similarities)``."""

    extra_inputs = TEACHER_KEYS
    logit_inputs = InfoNCELoss.logit_inputs  # the contrastive term's scale

    def __init__(
        self,
        alpha: float = 0.5,
        distill_type: Literal["kl", "mse"] = "kl",
        temperature: float = 1.0,
        contrastive: EmbeddingLoss | None = None,
        gather_across_workers: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {alpha}")
        if distill_type not in ("kl", "mse"):
            raise ValueError(f"distill_type must be 'kl' or 'mse', got {distill_type!r}")
        if not temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.distill_type = distill_type
        self.temperature = temperature
        self.contrastive = contrastive if contrastive is not None else InfoNCELoss()
        self.gather_across_workers = gather_across_workers

    @classmethod
    def logit_parameters(cls, config: VEmbedConfig) -> LogitParameters | None:
        """The contrastive term's learnable temperature; none when ``distill_alpha`` is 1 (no contrastive term)."""
        return None if config.distill_alpha == 1.0 else InfoNCELoss.logit_parameters(config)

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> DistillationLoss:
        return cls(
            alpha=config.distill_alpha,
            distill_type=config.distill_type,
            temperature=config.distill_temperature,
            contrastive=InfoNCELoss.from_config(config),
            gather_across_workers=config.gather_across_workers,
        )

    def compute(self, inputs: LossInputs) -> Tensor:
        check_class_labels(inputs.labels, "distillation")
        teacher_query, teacher_positive, teacher_negatives = _teacher_inputs(inputs)
        gather = self.gather_across_workers
        student = collect_candidates(inputs.positive, inputs.negatives, anchor_dim=2, gather=gather)
        teacher = collect_candidates(teacher_positive, teacher_negatives, anchor_dim=2, gather=gather)
        student_scores = inputs.query @ student.embeddings.T
        teacher_scores = teacher_query @ teacher.embeddings.T
        if self.distill_type == "kl":
            t = self.temperature
            teacher_log_prob = torch.log_softmax(teacher_scores / t, dim=-1)
            student_log_prob = torch.log_softmax(student_scores / t, dim=-1)
            per_query = (teacher_log_prob.exp() * (teacher_log_prob - student_log_prob)).sum(dim=-1) * t**2
        else:
            per_query = (student_scores - teacher_scores).pow(2).mean(dim=-1)
        distill = student.share_of_mean(per_query)
        if self.alpha == 1.0:
            return distill
        return (1 - self.alpha) * self.contrastive.compute(inputs) + self.alpha * distill

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, distill_type={self.distill_type!r}, temperature={self.temperature}"
