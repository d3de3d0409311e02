"""Per-example answer scoring and the bootstrap standard error of a task mean.

Every metric maps ``(prediction, gold answers)`` to a score in ``[0, 1]``, taking the best gold answer:

* ``exact_match`` and ``f1``: SQuAD answer normalization (lower-case, drop punctuation, drop the
  articles a/an/the, collapse whitespace), computed by torchmetrics' SQuAD metric. Note that this
  normalization turns ``"1,000"`` into ``"1000"`` and ``"2.50"`` into ``"250"``.
* ``numeric``: the first number in the prediction (``"1,000"`` -> 1000, ``"2.50"`` -> 2.5, ``"-3"``)
  against each gold number, equal within ``rel_tol=1e-4`` or ``abs_tol=1e-6``.
* ``exact``: the whitespace-stripped strings are identical (synthetic tasks, whose one-letter answers
  SQuAD normalization would erase: it drops the article ``"a"``).

    >>> score("numeric", "It costs $1,000.", ["1000"])
    1.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "METRICS",
    "bootstrap_stderr",
    "exact",
    "exact_match",
    "f1",
    "numeric_match",
    "parse_number",
    "score",
]

# A thousands-separated integer ("1,000") or a plain one, an optional decimal part, an optional sign;
# or a bare decimal (".5").
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _squad(prediction: str, answers: Sequence[str], key: str) -> float:
    # imported here: torchmetrics takes seconds to import and only scoring needs it (not YAML or reports)
    from torchmetrics.functional.text import squad

    result = squad({"prediction_text": prediction, "id": "0"}, {"answers": {"text": list(answers)}, "id": "0"})
    return result[key].item() / 100.0  # torchmetrics reports percentages


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the SQuAD-normalized prediction equals a normalized gold answer.

    >>> exact_match("The Beatles!", ["beatles"])
    1.0
    """
    return _squad(prediction, answers, "exact_match")


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Best SQuAD token-overlap F1 against the gold answers.

    >>> f1("big cat", ["the big dog"])
    0.5
    """
    return _squad(prediction, answers, "f1")


def exact(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the stripped prediction is one of the stripped gold answers, character for character.

    >>> exact(" a", ["a"])
    1.0
    """
    return float(prediction.strip() in {answer.strip() for answer in answers})


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (thousands commas allowed), or ``None`` when there is none.

    >>> parse_number("He paid $1,234.50, not -3.")
    1234.5
    """
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def numeric_match(prediction: str, answers: Sequence[str], rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> float:
    """1.0 when the first number of ``prediction`` is close to the first number of a gold answer.

    >>> numeric_match("0.6667 apples", ["0.6666666666666666"])
    1.0
    """
    predicted = parse_number(prediction)
    if predicted is None:
        return 0.0
    golds = (parse_number(answer) for answer in answers)
    return float(any(gold is not None and math.isclose(predicted, gold, rel_tol=rel_tol, abs_tol=abs_tol)
                     for gold in golds))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "f1": f1,
    "numeric": numeric_match,
    "exact": exact,
}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction with the metric named ``metric`` (a key of :data:`METRICS`).

    >>> score("exact_match", "an apple", ["Apple"])
    1.0
    """
    return METRICS[metric](prediction, answers)


def bootstrap_stderr(scores: Sequence[float], resamples: int = 1000, seed: int = 0) -> float:
    """Standard error of the mean of ``scores``: the std of ``resamples`` seeded bootstrap means.

    >>> bootstrap_stderr([1.0, 1.0, 1.0])
    0.0
    """
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_stderr needs at least one score")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    return float(means.std(ddof=1))
