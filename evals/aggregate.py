"""Per-task scores -> per-group macro averages, with missing tasks flagged; centered accuracy; % Gap.

Scores are fractions in ``[0, 1]``. A group average is the plain mean of its tasks' scores (paper
Sec. 3.1); ``all_tasks`` is the mean over the 15 tasks of closed_book, open_book and math_word. A task
without a score (data absent, or not evaluated) is listed in ``missing`` and the group's label says
how many tasks it really covers, e.g. ``open_book (3/5 tasks)``.

    >>> round(percent_gap(looped=34.3, iso_param=26.7, iso_flop=29.3), 1)  # Table 3, (12⊗2) math word problems
    292.3
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .catalog import GroupSpec

__all__ = ["GroupScore", "TaskScore", "aggregate_group", "aggregate_groups", "centered_accuracy", "percent_gap"]


def centered_accuracy(score: float, random_baseline: float) -> float:
    """``(score - b) / (1 - b)``: 0 at chance, 1 at perfect (LLM Foundry's Eval Gauntlet).

    >>> centered_accuracy(0.625, 0.25)
    0.5
    """
    return (score - random_baseline) / (1.0 - random_baseline)


def percent_gap(looped: float, iso_param: float, iso_flop: float) -> float:
    """Paper Eq. 1 in percent: the share of the iso-param -> iso-FLOP gap that the looped model closes.

    Apply it to raw perplexities as well (not log-perplexity). ``nan`` when the baselines are equal.

    >>> round(percent_gap(looped=7.90, iso_param=8.16, iso_flop=7.40))  # Table 3 perplexity, (12⊗2)
    34
    """
    denominator = iso_flop - iso_param
    return math.nan if denominator == 0 else 100.0 * (looped - iso_param) / denominator


@dataclass(frozen=True)
class TaskScore:
    """One task's result. ``score is None`` (with ``missing`` saying why) when it could not be scored.

    Example: ``TaskScore(score=0.31, stderr=0.015, n=1000, metric="numeric", group="math_word")``
    """

    score: float | None
    stderr: float | None
    n: int
    metric: str
    group: str
    random_baseline: float = 0.0
    missing: str | None = None

    def value(self, centered: bool = False) -> float | None:
        """The score, or its centered accuracy; ``None`` for a missing task."""
        if self.score is None or not centered:
            return self.score
        return centered_accuracy(self.score, self.random_baseline)


@dataclass(frozen=True)
class GroupScore:
    """A group's macro average over the tasks that have scores; ``missing`` lists the others.

    ``stderr`` combines the task stderrs as independent: ``sqrt(sum se_i^2) / m``.
    """

    name: str
    score: float | None
    stderr: float | None
    n_tasks: int
    n_defined: int
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.n_tasks == self.n_defined

    @property
    def coverage(self) -> str:
        """``""`` when complete, else e.g. ``"3/5 tasks"``."""
        return "" if self.complete else f"{self.n_tasks}/{self.n_defined} tasks"

    @property
    def label(self) -> str:
        """The group name, flagged when incomplete: ``open_book (3/5 tasks)``."""
        return f"{self.name} ({self.coverage})" if self.coverage else self.name


def aggregate_group(group: GroupSpec, tasks: Mapping[str, TaskScore], centered: bool = False) -> GroupScore:
    """Macro-average ``group`` over ``tasks``; a task absent from ``tasks`` counts as missing.

    Example: ``aggregate_group(groups["open_book"], scores).label`` -> ``'open_book (3/5 tasks)'``
    """
    values, errors, missing = [], [], []
    for name in group.tasks:
        result = tasks.get(name)
        value = None if result is None else result.value(centered)
        if value is None:
            missing.append(name)
            continue
        values.append(value)
        # centering rescales the score by 1/(1-b), and its stderr with it
        scale = 1.0 / (1.0 - result.random_baseline) if centered else 1.0
        errors.append(None if result.stderr is None else result.stderr * scale)
    count = len(values)
    score = sum(values) / count if count else None
    stderr = math.sqrt(sum(e * e for e in errors)) / count if count and None not in errors else None
    return GroupScore(group.name, score, stderr, count, len(group.tasks), tuple(missing))


def aggregate_groups(groups: Mapping[str, GroupSpec], tasks: Mapping[str, TaskScore],
                     centered: bool = False) -> dict[str, GroupScore]:
    """:func:`aggregate_group` for every group, keyed by group name.

    Example: ``aggregate_groups(load_groups(), scores)["all_tasks"].label`` -> ``'all_tasks (12/15 tasks)'``
    """
    return {name: aggregate_group(group, tasks, centered) for name, group in groups.items()}
