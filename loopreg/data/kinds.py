"""Every built-in data kind and tokenizer kind, registered: importing this module imports the modules that
define them (each registers itself into :data:`~loopreg.data.DATA_KINDS` / :data:`~loopreg.data.TOKENIZERS`).
Recipe validation looks kinds up here, without importing the algorithms :mod:`loopreg.registry` lists.

    >>> sorted(DATA_KINDS)
    ['mds', 'mixture', 'paired', 'synthetic', 'text']
"""

from __future__ import annotations

from loopreg.data import DATA_KINDS, TOKENIZERS
from loopreg.data import mds, mixture, paired, tasks, text  # noqa: F401  (they register the built-in kinds)

__all__ = ["DATA_KINDS", "TOKENIZERS"]
