"""The one user-error type: a mistake in what the user gave (a recipe key, an override, a CLI argument, a
file or a value), reported as one line that names the key path, file or value at fault exactly once.

It is caught in one place for the CLI (:func:`loopreg.cli.main`) and one for the recipe entry
(:func:`loopreg.train.main`); both print ``error: <line>`` and exit 2, without a traceback.

    >>> str(RecipeError("must be >= 0, got -1", key="algorithms.loop_regularizer.lam"))
    'algorithms.loop_regularizer.lam: must be >= 0, got -1'
"""

from __future__ import annotations

__all__ = ["UserError", "RecipeError", "DataError", "CheckpointError"]


class UserError(ValueError):
    """A user error; ``str(err)`` is one line, ``err.key`` the key path it names (``None``: none, or it is
    already part of the message)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        lines = str(message).strip().splitlines()
        self.message = lines[0] if lines else str(message)
        self.key = key
        super().__init__(f"{key}: {self.message}" if key else self.message)

    def at(self, key: str) -> UserError:
        """This error under ``key``; unchanged when it already names its key, so a path is never doubled.

        >>> str(RecipeError("bad", key="a.b").at("a"))
        'a.b: bad'
        """
        return self if self.key is not None else type(self)(self.message, key)


class RecipeError(UserError):
    """A recipe or an override is wrong (an unknown key, a bad value, a combination that cannot work)."""


class DataError(UserError):
    """A data source is missing, unreadable or does not fit the recipe."""


class CheckpointError(UserError):
    """A checkpoint to load or resume from is missing or unreadable."""
