"""The :class:`Registry` type: a name → entry table that an entry joins where it is defined (LLM Foundry style).

This module imports nothing of loopreg but the leaf :mod:`loopreg.errors`, so any module may register into a
registry without an import cycle. The registries themselves are listed in :mod:`loopreg.registry`.

    >>> SHAPES = Registry("shape")
    >>> @SHAPES.register("square")
    ... def square(side: float) -> float:
    ...     return side * side
    >>> SHAPES["square"](3)
    9
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from loopreg.errors import RecipeError, did_you_mean

__all__ = ["Registry", "lookup"]

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

    def lookup(self, name: str, path: str) -> Any:
        """The entry ``name``, or a one-line :class:`~loopreg.errors.RecipeError` naming the recipe key ``path``
        and the valid names (did-you-mean).

        >>> Registry("kind", {"text": str}).lookup("txt", "train_data.kind")
        Traceback (most recent call last):
        loopreg.errors.RecipeError: unknown train_data.kind 'txt' (did you mean 'text'?); valid: text
        """
        return lookup(self, name, path)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self)})"


def lookup(entries: Mapping[str, Any], name: str, path: str) -> Any:
    """``entries[name]``, or a one-line :class:`~loopreg.errors.RecipeError` naming the key path and the valid
    names: the look-up of every registry (a :class:`Registry` or a plain mapping)."""
    if name not in entries:
        raise RecipeError(f"unknown {path} '{name}'{did_you_mean(name, list(entries))}; "
                          f"valid: {', '.join(sorted(entries))}")
    return entries[name]
