"""Reasoning against perplexity (the paper's Fig. 1): the non-looped baselines' frontier and every other model.

A baseline is a model whose loop spec has no looped block (``(k⊗1)``); the baselines, sorted by perplexity,
draw the frontier. A looped, middle-looped or regularized model above that line reasons better than a
baseline of the same perplexity, which is the paper's claim 2 (and claim 3 for the regularized ones).

    >>> point = FrontierPoint("Base (8⊗1)", perplexity=6.9, score=41.0, stderr=1.2, baseline=True)
    >>> frontier_at([point, FrontierPoint("Base (2⊗1)", 7.5, 20.0, None, True)], 7.2)
    30.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopreg.errors import UserError

__all__ = ["FrontierPoint", "draw_frontier", "frontier_at", "plot_frontier"]


@dataclass(frozen=True)
class FrontierPoint:
    """One model: held-out perplexity, a group's score (accuracy, %) and its standard error (None: unknown)."""

    model: str
    perplexity: float
    score: float
    stderr: float | None
    baseline: bool


def frontier_at(points: Sequence[FrontierPoint], perplexity: float) -> float | None:
    """The baselines' score at ``perplexity``, linearly between the two baselines around it (None outside).

    Example: ``point.score - frontier_at(points, point.perplexity)`` -> how far above the frontier a model is
    """
    baselines = sorted((p.perplexity, p.score) for p in points if p.baseline)
    if len(baselines) < 2 or not baselines[0][0] <= perplexity <= baselines[-1][0]:
        return None
    x, y = zip(*baselines)
    return float(np.interp(perplexity, x, y))


def draw_frontier(axis: Axes, points: Sequence[FrontierPoint], ylabel: str) -> None:
    """Baselines as squares joined by the frontier line, every other model as a labelled circle."""
    baselines = sorted((p for p in points if p.baseline), key=lambda p: p.perplexity)
    if baselines:
        axis.plot([p.perplexity for p in baselines], [p.score for p in baselines], "k--", linewidth=1,
                  label="non-looped frontier")
    for index, point in enumerate(points):
        axis.errorbar(point.perplexity, point.score, yerr=point.stderr or 0, fmt="s" if point.baseline else "o",
                      color=f"C{index % 10}", capsize=2, label=point.model)
    axis.set_xlabel("held-out perplexity")
    axis.set_ylabel(ylabel)
    axis.invert_xaxis()  # lower perplexity to the right: better models up and right
    axis.legend(fontsize="xx-small", ncol=2)


def plot_frontier(points: Sequence[FrontierPoint], path: str | Path, ylabel: str) -> Path:
    """Write :func:`draw_frontier` as a PNG.

    Example: ``plot_frontier(points, "frontier.png", "reasoning primitives (%)")``
    """
    if not points:
        raise UserError("no model has both a perplexity and a score: nothing to plot")
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: no pyplot, no global backend, works headless
    draw_frontier(figure.subplots(), points, ylabel)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
