"""The :class:`Registry` type: a name → entry table that an entry joins where it is defined (LLM Foundry style).

This module imports nothing of loopreg, so any module may register into a registry without an import cycle.
The registries themselves are listed in :mod:`loopreg.registry`.

    >>> SHAPES = Registry("shape")
    >>> @SHAPES.register("square")
    ... def square(side: float) -> float:
    ...     return side * side
    >>> SHAPES["square"](3)
    9
"""

from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["Registry"]

Entry = TypeVar("Entry")


class Registry(dict):
    """A ``dict`` of named entries with a ``register(name)`` decorator; ``what`` names the kind of entry
    (e.g. ``"data kind"``) for error messages. Registering a taken name is a mistake, not an override."""

    def __init__(self, what: str, entries: dict | None = None) -> None:
        super().__init__(entries or {})
        self.what = what

    def register(self, name: str) -> Callable[[Entry], Entry]:
        """Decorator adding the decorated object under ``name``; returns it unchanged.

        >>> KINDS = Registry("kind")
        >>> KINDS.register("plain")(str) is str
        True
        """

        def add(entry: Entry) -> Entry:
            if name in self and self[name] is not entry:
                raise ValueError(f"{self.what} '{name}' is already registered ({self[name]!r})")
            self[name] = entry
            return entry

        return add

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self)})"
