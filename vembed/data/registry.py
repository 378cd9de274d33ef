"""Collators by name: ``CollatorRegistry.get("default")(processor=..., mode="train")`` as in the seed guide.

Add your own with the decorator; a collator is any callable factory whose instances turn a list of records into a
batch dict::

    @CollatorRegistry.register("captions_only")
    class CaptionsOnly(DefaultCollator): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from vembed.data.collators import DefaultCollator

F = TypeVar("F", bound=Callable[..., Any])


class UnknownCollatorError(KeyError):
    """No collator is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class CollatorRegistry:
    """Name -> collator factory. Names are case-insensitive."""

    _collators: ClassVar[dict[str, Callable[..., Any]]] = {}

    @classmethod
    def register(cls, name: str) -> Callable[[F], F]:
        """Decorator registering a collator factory (usually a class) under ``name``."""
        key = name.strip().lower()
        if not key:
            raise ValueError("a collator name must be a non-empty string")

        def decorator(factory: F) -> F:
            if not callable(factory):
                raise TypeError(f"@CollatorRegistry.register({name!r}) must decorate a callable, got {factory!r}")
            existing = cls._collators.get(key)
            if existing is not None and existing is not factory:
                raise ValueError(f"collator name {key!r} is already registered to {existing!r}")
            cls._collators[key] = factory
            return factory

        return decorator

    @classmethod
    def get(cls, name: str) -> Callable[..., Any]:
        """The factory registered under ``name``; an unknown name lists the registered ones."""
        key = str(name).strip().lower()
        if key not in cls._collators:
            raise UnknownCollatorError(
                f"unknown collator {name!r}; registered collators: {', '.join(cls.names())} "
                "(add your own with @CollatorRegistry.register(name))"
            )
        return cls._collators[key]

    @classmethod
    def names(cls) -> list[str]:
        """Registered collator names, sorted."""
        return sorted(cls._collators)


CollatorRegistry.register("default")(DefaultCollator)
