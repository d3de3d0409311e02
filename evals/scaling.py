"""Depth scaling law (paper Sec. 3.4, Fig. 3): ``Acc = α·ln(D) + β`` per group and model family.

``D`` is the effective depth (layer applications = the FLOPs column in layer units) and the logarithm
is the **natural** log (the paper does not give a base; it only rescales α, not the α ratio).
Families: non-looped models (distinct layers == D) form one; looped models with k distinct layers form
``looped (k⊗L)``, which also includes the plain ``(k⊗1)`` model, its L = 1 member.

    >>> fit = fit_log_depth([4, 8, 16], [0.1 + 0.05 * math.log(d) for d in (4, 8, 16)])
    >>> round(fit.alpha, 3), round(fit.beta, 3), round(fit.r2, 3)
    (0.05, 0.1, 1.0)
    >>> fit_log_depth([4, 8], [0.1, 0.2]).r2_label  # two depths: any line through them is exact
    'n=2 depths: exact fit, R² not meaningful'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopreg.errors import UserError

__all__ = ["MIN_R2_DEPTHS", "NON_LOOPED", "DepthPoint", "LogDepthFit", "alpha_ratios", "families", "fit_log_depth",
           "fit_scaling", "plot_scaling", "plotted_groups", "scaling_figure"]

NON_LOOPED = "non-looped (D⊗1)"
MIN_R2_DEPTHS = 3  # below this many distinct depths a line fits exactly and R² is 1 by construction


@dataclass(frozen=True)
class DepthPoint:
    """One evaluated model: its distinct layers, its effective depth D and its group scores.

    Example: ``DepthPoint("loop-4x6", params_units=4, depth=24, scores={"math_word": 0.248})``
    """

    model: str
    params_units: int
    depth: int
    scores: Mapping[str, float]


@dataclass(frozen=True)
class LogDepthFit:
    """Least-squares ``score = alpha·ln(depth) + beta`` over ``n`` points at ``depths`` distinct depths.

    ``r2`` is ``None`` below :data:`MIN_R2_DEPTHS` distinct depths: a line through two depths fits them
    exactly, so its R² is 1 by construction and says nothing about the law (see :attr:`exact`).

    Example: ``LogDepthFit(alpha=0.05, beta=0.1, r2=None, n=2, depths=2).exact`` -> ``True``
    """

    alpha: float
    beta: float
    r2: float | None
    n: int
    depths: int

    @property
    def exact(self) -> bool:
        """Fewer than :data:`MIN_R2_DEPTHS` distinct depths: an exact fit whose R² is not meaningful."""
        return self.depths < MIN_R2_DEPTHS

    @property
    def r2_label(self) -> str:
        """R² for a legend, or why there is none: ``'R²=0.99'`` / ``'n=2 depths: exact fit, R² not meaningful'``."""
        return f"n={self.depths} depths: exact fit, R² not meaningful" if self.r2 is None else f"R²={self.r2:.2f}"

    def predict(self, depth: float | np.ndarray) -> float | np.ndarray:
        """The fitted score at ``depth``."""
        return self.alpha * np.log(depth) + self.beta


def fit_log_depth(depths: Sequence[float], scores: Sequence[float]) -> LogDepthFit:
    """Fit ``score = α·ln(depth) + β``; needs at least two distinct depths, and three for an R².

    Example: ``fit_log_depth([4, 8, 12, 24], [0.20, 0.25, 0.27, 0.31]).alpha``
    """
    log_depth, y = np.log(np.asarray(depths, dtype=float)), np.asarray(scores, dtype=float)
    distinct = len(np.unique(log_depth))
    if distinct < 2:
        raise ValueError(f"a log-depth fit needs at least two distinct depths, got {sorted(set(depths))}")
    alpha, beta = np.polyfit(log_depth, y, 1)
    r2 = None
    if distinct >= MIN_R2_DEPTHS:
        residual = float(np.sum((y - (alpha * log_depth + beta)) ** 2))
        total = float(np.sum((y - y.mean()) ** 2))
        r2 = 1.0 - residual / total if total > 0 else 1.0  # all-equal scores: the flat line fits exactly
    return LogDepthFit(float(alpha), float(beta), r2, len(y), distinct)


def families(points: Sequence[DepthPoint]) -> dict[str, list[DepthPoint]]:
    """Split points into ``non-looped (D⊗1)`` and one ``looped (k⊗L)`` family per looped block size k.

    Example: ``families(points).keys()`` -> ``['non-looped (D⊗1)', 'looped (4⊗L)']``
    """
    grouped: dict[str, list[DepthPoint]] = {}
    non_looped = [p for p in points if p.params_units == p.depth]
    if non_looped:
        grouped[NON_LOOPED] = non_looped
    for k in sorted({p.params_units for p in points if p.params_units < p.depth}):
        grouped[f"looped ({k}⊗L)"] = [p for p in points if p.params_units == k]
    return grouped


def fit_scaling(points: Sequence[DepthPoint], groups: Sequence[str]) -> dict[str, dict[str, LogDepthFit]]:
    """``{group: {family: fit}}``; a family with fewer than two depths scored in a group is left out.

    Example: ``fit_scaling(points, ["math_word"])["math_word"]["looped (4⊗L)"].alpha``
    """
    fits: dict[str, dict[str, LogDepthFit]] = {}
    for group in groups:
        fits[group] = {}
        for family, members in families(points).items():
            scored = [p for p in members if p.scores.get(group) is not None]
            if len({p.depth for p in scored}) >= 2:
                fits[group][family] = fit_log_depth([p.depth for p in scored], [p.scores[group] for p in scored])
    return fits


def alpha_ratios(fits: Mapping[str, LogDepthFit]) -> dict[str, float]:
    """``α_looped / α_non-looped`` for each looped family of one group (the paper: 1.19 for primitives).

    Example: ``alpha_ratios(fit_scaling(points, ["reasoning_primitives"])["reasoning_primitives"])``
    """
    base = fits.get(NON_LOOPED)
    if base is None:
        return {}
    return {family: (fit.alpha / base.alpha if base.alpha else math.nan)
            for family, fit in fits.items() if family != NON_LOOPED}


def plotted_groups(points: Sequence[DepthPoint], groups: Sequence[str]) -> list[str]:
    """The ``groups`` (in order) that at least one point has a score for: the panels :func:`plot_scaling` draws.

    Example: ``plotted_groups(points, ["math_word", "closed_book"])`` -> ``['math_word']``
    """
    return [group for group in groups if any(p.scores.get(group) is not None for p in points)]


def scaling_figure(points: Sequence[DepthPoint], fits: Mapping[str, Mapping[str, LogDepthFit]],
                   titles: Mapping[str, str] | None = None) -> Figure:
    """One panel per group that has scores (groups without any are left out, the grid fits the rest):
    accuracy (%) vs effective depth on a log axis, points and fits (legend α and β in accuracy points per
    unit of ln D; R², or, dashed, that the fit is exact because it has fewer than three depths).

    Example: ``len(scaling_figure(points, fit_scaling(points, groups)).axes)`` -> panels drawn
    """
    titles = titles or {}
    groups = plotted_groups(points, list(fits))
    if not groups:
        raise UserError(f"no model has a score in any of the groups {', '.join(fits)}: nothing to plot")
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: no pyplot, no global backend, works headless
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    family_points = families(points)
    depths = sorted({p.depth for p in points})
    for axis, group in zip(axes, groups):
        for index, (family, members) in enumerate(family_points.items()):
            color = f"C{index}"
            scored = [p for p in members if p.scores.get(group) is not None]
            axis.scatter([p.depth for p in scored], [100 * p.scores[group] for p in scored], color=color)
            fit = fits[group].get(family)
            if fit is not None:
                grid = np.geomspace(min(p.depth for p in scored), max(p.depth for p in scored), 50)
                axis.plot(grid, 100 * fit.predict(grid), color=color, linestyle="--" if fit.exact else "-",
                          label=f"{family}: α={100 * fit.alpha:.2f}, β={100 * fit.beta:.1f}, {fit.r2_label}")
        axis.set_xscale("log")
        axis.set_xlim(min(depths) / 1.15, max(depths) * 1.15)
        axis.set_xticks(depths, [str(d) for d in depths])
        axis.minorticks_off()
        axis.set_xlabel("effective depth D (log scale)")
        axis.set_ylabel("accuracy (%)")
        axis.set_title(titles.get(group, group))
        if fits[group]:
            axis.legend(fontsize="x-small")
    for axis in axes[len(groups):]:  # the last row's unused cells
        figure.delaxes(axis)
    return figure


def plot_scaling(points: Sequence[DepthPoint], fits: Mapping[str, Mapping[str, LogDepthFit]], path: str | Path,
                 titles: Mapping[str, str] | None = None) -> Path:
    """Write :func:`scaling_figure` as a PNG.

    Example: ``plot_scaling(points, fit_scaling(points, groups), "scaling.png")``
    """
    path = Path(path)
    scaling_figure(points, fits, titles).savefig(path, dpi=120)
    return path
