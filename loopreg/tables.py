"""Console tables for the command-line tools (rich).

    >>> print_table("export", [("checkpoint", "runs/x"), ("spec", "4x(1,4,1)")])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["print_table"]


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column rich table of ``(name, value)`` rows."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # long paths wrap instead of being cut
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
