"""The one call shape every vembed loss shares, and the input checks done once for all of them.

A loss is called either with tensors::

    loss(query, positive, negatives=None, labels=None, *, query_mask=None, positive_mask=None,
         negative_mask=None, **extra)

or, as in the seed guide's training loop, with the model's outputs and the batch::

    loss(outputs, batch)   # outputs: {"query", "positive", "negatives"?, "*_mask"?, logit_*?, extras?}
                           # batch: {"labels"?}

Learnable loss parameters live in the model, as in open_clip: a model built by ``build_model(config)`` holds the
configured loss's :class:`~vembed.losses.scale.LogitParameters` and returns ``logit_scale`` (and SigLIP's
``logit_bias``) in its outputs; the loss then uses those, so ``build_optimizer(model, config)`` trains them. Called
with tensors (``logit_scale=`` / ``logit_bias=`` may be passed too) or with outputs that carry none, a loss uses its
own ``logit_scale`` / ``logit_bias``.

Shapes (single-vector losses): ``query`` and ``positive`` ``[B, D]``; ``negatives`` shared
``[K, D]`` or per query ``[B, K, D]``; ``labels`` ``[B]``. Multi-vector losses (MaxSim) take
``[B, L, D]`` embeddings, ``[K, L, D]`` / ``[B, K, L, D]`` negatives and token masks shaped like the
embeddings without ``D``. Every loss scores with the dot product, which is the cosine similarity
for L2-normalised embeddings (the model's default).

Subclasses implement :meth:`EmbeddingLoss.compute` on a validated :class:`LossInputs`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vembed.config import VEmbedConfig
from vembed.losses.scale import LOGIT_KEYS, LogitParameters, LogitScale

EMBEDDING_KEYS = ("query", "positive", "negatives")
MASK_KEYS = ("query_mask", "positive_mask", "negative_mask")


@dataclass(frozen=True)
class LossInputs:
    """Validated loss inputs (see the module docstring for shapes)."""

    query: Tensor
    positive: Tensor
    negatives: Tensor | None = None
    labels: Tensor | None = None
    query_mask: Tensor | None = None
    positive_mask: Tensor | None = None
    negative_mask: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)
    #: the model's learnable loss parameters (0-dim), when its outputs carry them; None: the loss's own
    logit_scale: Tensor | None = None
    logit_bias: Tensor | None = None

    def scale(self, own: LogitScale) -> Tensor:
        """The logit scale to use: the model's (``logit_scale`` input) when given, else the loss's own."""
        return own() if self.logit_scale is None else self.logit_scale

    def bias(self, own: Tensor) -> Tensor:
        """The logit bias to use: the model's (``logit_bias`` input) when given, else the loss's own."""
        return own if self.logit_bias is None else self.logit_bias

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def per_query_negatives(self) -> bool:
        """True for ``[B, K, ...]`` negatives (one set per query), False for shared ``[K, ...]``."""
        return self.negatives is not None and self.negatives.dim() == self.query.dim() + 1

    def with_embeddings(self, transform: Callable[[Tensor], Tensor]) -> LossInputs:
        """A copy with ``transform`` applied to query, positive and negatives (masks, labels, extras kept)."""
        negatives = None if self.negatives is None else transform(self.negatives)
        return replace(self, query=transform(self.query), positive=transform(self.positive), negatives=negatives)


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(list(t.shape))


def check_embedding(name: str, t: Any) -> Tensor:
    """``t`` if it is a finite floating-point tensor; otherwise a TypeError/ValueError naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"loss input '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"loss input '{name}' must be a floating-point tensor, got dtype {t.dtype}")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"loss input '{name}' {_shape(t)} holds {bad} NaN/inf value(s); check the model outputs")
    return t


def validate_inputs(inputs: LossInputs, *, multi_vector: bool) -> LossInputs:
    """Check shapes, dtypes and finiteness; raise a ValueError/TypeError naming the input and its shape."""
    q = check_embedding("query", inputs.query)
    p = check_embedding("positive", inputs.positive)
    kind, ndim = ("multi-vector [B, L, D]", 3) if multi_vector else ("single-vector [B, D]", 2)
    for name, t in (("query", q), ("positive", p)):
        if t.dim() != ndim:
            raise ValueError(f"this loss takes {kind} embeddings, got '{name}' with shape {_shape(t)}")
    if q.shape[0] == 0:
        raise ValueError(f"loss inputs have an empty batch (query shape {_shape(q)})")
    if p.shape[0] != q.shape[0]:
        raise ValueError(
            f"query and positive have different batch sizes: query {_shape(q)} vs positive {_shape(p)}; "
            "every query needs exactly one positive"
        )
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"query and positive have different embedding dims: query {_shape(q)} vs positive {_shape(p)}")
    n = inputs.negatives
    if n is not None:
        check_embedding("negatives", n)
        if n.dim() not in (ndim, ndim + 1):
            raise ValueError(
                f"negatives must be shared [K, ...] or per-query [B, K, ...] {kind} embeddings, got {_shape(n)}"
            )
        if n.shape[-1] != q.shape[-1]:
            raise ValueError(f"negatives dim {n.shape[-1]} != query dim {q.shape[-1]} (negatives {_shape(n)})")
        if n.dim() == ndim + 1 and n.shape[0] != q.shape[0]:
            raise ValueError(f"per-query negatives {_shape(n)} must have batch size {q.shape[0]} like query")
    if inputs.labels is not None:
        if not isinstance(inputs.labels, Tensor) or inputs.labels.shape != (q.shape[0],):
            got = _shape(inputs.labels) if isinstance(inputs.labels, Tensor) else type(inputs.labels).__name__
            raise ValueError(f"labels must be a tensor of shape [{q.shape[0]}] (one per query), got {got}")
    masks_given = [k for k in MASK_KEYS if getattr(inputs, k) is not None]
    if masks_given and not multi_vector:
        raise ValueError(f"token masks {masks_given} only apply to multi-vector losses (e.g. maxsim)")
    for name, mask, emb in (
        ("query_mask", inputs.query_mask, q),
        ("positive_mask", inputs.positive_mask, p),
        ("negative_mask", inputs.negative_mask, n),
    ):
        if mask is None:
            continue
        if emb is None:
            raise ValueError(f"'{name}' was given without the embeddings it masks")
        if not isinstance(mask, Tensor) or mask.shape != emb.shape[:-1]:
            got = _shape(mask) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"'{name}' must have shape {list(emb.shape[:-1])} (its embeddings without D), got {got}")
    return inputs


def _check_logit_inputs(given: Mapping[str, Any], accepted: tuple[str, ...], loss_name: str) -> None:
    """The model's learnable loss parameters must be the ones this loss reads, each a finite 1-element float."""
    if not given:
        return
    if set(given) != set(accepted):
        raise ValueError(
            f"{loss_name} reads {list(accepted) or 'no learnable parameters'} from the model outputs, got "
            f"{sorted(given)}: the model was built for another loss; build both from one config "
            "(build_model(config), LossFactory.create(config))"
        )
    for name, value in given.items():
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() != 1:
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loss input '{name}' must be a 1-element floating-point tensor, got {got}")
        if not torch.isfinite(value).all() or (name == "logit_scale" and not bool(value > 0)):
            raise ValueError(f"loss input '{name}' is {float(value):.4g}; it must be finite (and a scale > 0)")


def learnable_temperature_parameters(config: VEmbedConfig) -> LogitParameters | None:
    """The model-held scale of a softmax loss: ``temperature`` as a start, when ``learnable_temperature``."""
    return LogitParameters(config.temperature) if config.learnable_temperature else None


def check_class_labels(labels: Tensor | None, loss_name: str) -> None:
    """Contrastive losses read labels as class ids (same id = positives of each other): integers only."""
    if labels is not None and (labels.is_floating_point() or labels.is_complex()):
        raise TypeError(f"{loss_name} reads labels as integer class ids, got dtype {labels.dtype}")


class EmbeddingLoss(nn.Module, abc.ABC):
    """Base of every vembed loss: parses either call form, validates once, then calls :meth:`compute`."""

    #: True for losses over token embeddings ``[B, L, D]`` (late interaction).
    multi_vector: ClassVar[bool] = False
    #: Extra tensor inputs (keyword arguments or keys of ``outputs``) this loss accepts.
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: The learnable parameters (:data:`~vembed.losses.scale.LOGIT_KEYS`) this loss reads from a model's outputs.
    logit_inputs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> EmbeddingLoss:
        """Build the loss from a validated config; losses with settings override this."""
        return cls()

    @classmethod
    def logit_parameters(cls, config: VEmbedConfig) -> LogitParameters | None:
        """The learnable parameters a model trained with this loss (as configured) holds; None when it learns none.

        ``build_model(config)`` attaches them to the model; losses with a learnable scale or bias override this.
        """
        return None

    def own_logit_parameters(self) -> list[nn.Parameter]:
        """This loss's own learnable scale and bias: unused (and not to be optimised) when the model holds them."""
        params: list[nn.Parameter] = []
        for module in self.modules():
            if isinstance(module, LogitScale) and module.learnable:
                params.append(module.log_scale)
            bias = getattr(module, "logit_bias", None)
            if isinstance(bias, nn.Parameter):
                params.append(bias)
        return params

    def forward(
        self,
        query: Tensor | Mapping[str, Any],
        positive: Tensor | Mapping[str, Any] | None = None,
        negatives: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        query_mask: Tensor | None = None,
        positive_mask: Tensor | None = None,
        negative_mask: Tensor | None = None,
        **extra: Tensor,
    ) -> Tensor:
        """Scalar loss; see the module docstring for the two call forms and the shapes."""
        if isinstance(query, Mapping):
            if negatives is not None or labels is not None or extra:
                raise TypeError("call a loss either as loss(outputs, batch) or with tensors, not both")
            inputs = self._inputs_from_mappings(query, positive)
        else:
            if positive is None:
                raise TypeError("loss(query, positive, ...) needs a 'positive' tensor")
            logits = {k: extra.pop(k) for k in LOGIT_KEYS if extra.get(k) is not None}
            unknown = sorted(set(extra) - set(self.extra_inputs))
            if unknown:
                accepted = list(self.extra_inputs) or "none"
                raise TypeError(
                    f"{type(self).__name__} got unexpected inputs {unknown}; extra inputs accepted: {accepted}"
                )
            inputs = LossInputs(
                query, positive, negatives, labels, query_mask, positive_mask, negative_mask, extra, **logits
            )
        given = {k: getattr(inputs, k) for k in LOGIT_KEYS if getattr(inputs, k) is not None}
        _check_logit_inputs(given, self.logit_inputs, type(self).__name__)
        return self.compute(validate_inputs(inputs, multi_vector=self.multi_vector))

    def _inputs_from_mappings(self, outputs: Mapping[str, Any], batch: Any) -> LossInputs:
        if batch is not None and not isinstance(batch, Mapping):
            raise TypeError(f"loss(outputs, batch): batch must be a mapping, got {type(batch).__name__}")
        missing = [k for k in ("query", "positive") if k not in outputs]
        if missing:
            raise ValueError(f"model outputs lack {missing}; got keys {sorted(outputs)}")
        # single-vector losses ignore any token masks a model returns alongside pooled embeddings
        roles = {k: outputs.get(k) for k in EMBEDDING_KEYS + (MASK_KEYS if self.multi_vector else ())}
        extra = {k: outputs[k] for k in self.extra_inputs if k in outputs}
        logits = {k: outputs[k] for k in LOGIT_KEYS if outputs.get(k) is not None}  # the model's learnable ones
        labels = (batch or {}).get("labels")
        return LossInputs(**roles, labels=labels, extra=extra, **logits)

    @abc.abstractmethod
    def compute(self, inputs: LossInputs) -> Tensor:
        """The scalar loss on validated inputs."""
