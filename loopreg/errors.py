"""The one user-error type: a mistake in what the user gave (a recipe key, an override, a CLI argument, a
file or a value), reported as one line that names the key path, file or value at fault exactly once.

It is caught in one place for the CLI (:func:`loopreg.cli.main`) and one for the recipe entry
(:func:`loopreg.train.main`); both print ``error: <line>`` and exit 2, without a traceback
(:func:`report_user_error`; ``LOOPREG_DEBUG=1`` prints the traceback too). Nothing else is caught: an internal
error keeps its traceback.

    >>> str(RecipeError("must be >= 0, got -1", key="algorithms.loop_regularizer.lam"))
    'algorithms.loop_regularizer.lam: must be >= 0, got -1'
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["UserError", "RecipeError", "DataError", "CheckpointError", "ArgumentParser", "did_you_mean", "under_key",
           "writing", "report_user_error"]


class UserError(ValueError):
    """A user error; ``str(err)`` is one line, ``err.key`` the key path it names (``None``: none, or it is
    already part of the message)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        lines = str(message).strip().splitlines()
        if len(lines) > 1 and " in DataLoader worker process " in lines[0]:
            # PyTorch re-raises a worker's exception as ``type(err)(<its traceback>)``: the error's own line is
            # the last one, "loopreg.errors.DataError: <the line>"
            lines = [lines[-1].removeprefix(f"{type(self).__module__}.{type(self).__qualname__}: ")]
        self.message = lines[0] if lines else str(message)
        self.key = key
        super().__init__(f"{key}: {self.message}" if key else self.message)

    def at(self, key: str) -> UserError:
        """This error under ``key``; unchanged when it already names its key (as ``err.key``, or as the start of
        its message: ``key.sub: ...``), so a path is never doubled.

        >>> str(RecipeError("bad", key="a.b").at("a"))
        'a.b: bad'
        >>> str(RecipeError("a.b must be >= 0").at("a")), str(RecipeError("must be >= 0").at("a"))
        ('a.b must be >= 0', 'a: must be >= 0')
        """
        if self.key is not None or self.message.startswith(tuple(key + end for end in ".:= [")):
            return self
        return type(self)(self.message, key)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors: one line naming the argument, exit 2, no usage dump.

    >>> ArgumentParser(prog="loopreg eval").parse_args(["--nope"])  # doctest: +SKIP
    UserError: loopreg eval: unrecognized arguments: --nope
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


class RecipeError(UserError):
    """A recipe or an override is wrong (an unknown key, a bad value, a combination that cannot work)."""


class DataError(UserError):
    """A data source is missing, unreadable or does not fit the recipe."""


class CheckpointError(UserError):
    """A checkpoint to load or resume from is missing or unreadable."""


def did_you_mean(name: str, valid: list[str], parent: str = "") -> str:
    """The `` (did you mean '...'?)`` hint for a mistyped ``name`` among ``valid`` (empty when nothing is close);
    ``parent`` prefixes the suggestion with its key path.

    >>> did_you_mean("d_modle", ["d_model", "d_ff"], "model")
    " (did you mean 'model.d_model'?)"
    """
    close = difflib.get_close_matches(name, valid, n=1)
    prefix = f"{parent}." if parent else ""
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


@contextmanager
def under_key(key: str, *wrapped: type[Exception], error: type[UserError] = RecipeError) -> Iterator[None]:
    """Report what fails inside under the recipe key ``key``: a :class:`UserError` gets the key unless it names
    its own (:meth:`UserError.at`), a plain one becoming an ``error`` (a ``DataError`` stays one), and an exception
    of a ``wrapped`` type (a component's own ``ValueError``, a missing file's ``OSError``) becomes an ``error``
    whose line is its first line.

    >>> with under_key("optimizer", ValueError):  # doctest: +SKIP
    ...     torch.optim.AdamW(params, lr=-1)
    RecipeError: optimizer: Invalid learning rate: -1
    """
    try:
        yield
    except UserError as err:
        raise (error(err.message, err.key) if type(err) is UserError else err).at(key) from None
    except wrapped as err:
        raise error(str(err), key=key) from None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report an ``OSError`` raised inside, while writing the output ``path`` the user named (a folder without
    write permission, a full disk), as a one-line :class:`UserError` naming it.

    >>> with writing("/proc/report.md"):  # doctest: +SKIP
    ...     Path("/proc/report.md").write_text("...")
    UserError: cannot write /proc/report.md: No such file or directory
    """
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def report_user_error(err: UserError) -> int:
    """Print ``err`` as its one ``error:`` line on stderr and return the exit status, 2. With ``LOOPREG_DEBUG=1``
    in the environment its traceback comes first, with the library error it replaced (``raise ... from None``
    hides it otherwise)."""
    if os.environ.get("LOOPREG_DEBUG") == "1":
        err.__suppress_context__ = False
        traceback.print_exception(err)
    print(f"error: {err}", file=sys.stderr)
    return 2
