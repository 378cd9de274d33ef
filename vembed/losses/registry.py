"""Loss registry: ``@register_loss("name")`` adds a loss class; ``get_loss_class("name")`` finds it.

Users add their own loss by subclassing :class:`~vembed.losses.base.EmbeddingLoss`, decorating it
and setting ``loss_type`` to its name (override ``from_config`` to read settings).
"""

from __future__ import annotations

from collections.abc import Callable

from vembed.losses.base import EmbeddingLoss

_LOSSES: dict[str, type[EmbeddingLoss]] = {}


class UnknownLossError(ValueError):
    """No loss is registered under the requested name."""


def register_loss(name: str) -> Callable[[type[EmbeddingLoss]], type[EmbeddingLoss]]:
    """Class decorator registering an :class:`EmbeddingLoss` subclass under ``name`` (case-insensitive)."""
    key = name.strip().lower()
    if not key:
        raise ValueError("a loss name must be a non-empty string")

    def decorator(cls: type[EmbeddingLoss]) -> type[EmbeddingLoss]:
        if not (isinstance(cls, type) and issubclass(cls, EmbeddingLoss)):
            raise TypeError(f"@register_loss({name!r}) must decorate an EmbeddingLoss subclass, got {cls!r}")
        existing = _LOSSES.get(key)
        if existing is not None and existing is not cls:
            raise ValueError(f"loss name {key!r} is already registered to {existing.__module__}.{existing.__name__}")
        _LOSSES[key] = cls
        return cls

    return decorator


def get_loss_class(name: str) -> type[EmbeddingLoss]:
    """The loss class registered under ``name``; an unknown name lists the known ones."""
    key = str(name).strip().lower()
    if key not in _LOSSES:
        raise UnknownLossError(
            f"unknown loss_type {name!r}; registered losses: {', '.join(available_losses())} "
            "(add your own with vembed.losses.register_loss)"
        )
    return _LOSSES[key]


def available_losses() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_LOSSES)
