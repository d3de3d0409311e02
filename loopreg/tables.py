"""Console tables for the command-line tools (rich).

    >>> print_table("export", [("checkpoint", "runs/x"), ("spec", "4x(1,4,1)")])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["print_table"]


def print_table(title: str, rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> None:
    """A rich table of ``(name, value, ...)`` rows, the first column bold; with ``header``, under column names.

    >>> print_table("scores", [("arc_easy", "0.41", "0.44")], header=["task", "loops=1", "loops=2"])  # doctest: +SKIP
    """
    table = Table(title=title, show_header=header is not None, title_justify="left")
    width = len(header) if header is not None else max((len(row) for row in rows), default=2)
    for index in range(width):
        table.add_column(header[index] if header is not None else "", style="bold" if index == 0 else None,
                         overflow="fold")  # long paths wrap instead of being cut
    for row in rows:
        table.add_row(*row)
    Console().print(table)
