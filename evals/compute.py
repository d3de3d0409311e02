"""Accuracy against thinking iterations (issue #17): the plot of ``loopreg report --compute``.

Each point is one task of one results file: a run with an adaptive exit rule (``loopreg eval --exit``)
sits at its mean thinking iterations per token, a fixed-loop run at its loop count (the reference).

    >>> points = [ComputePoint("phop@loops8", "phop", None, "per_application", 8.0, 0.91),
    ...           ComputePoint("phop@loops8", "phop", "kl:0.01", "per_application", 5.2, 0.90)]
    >>> len(compute_figure(points).axes)
    1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopreg.errors import UserError

__all__ = ["ComputePoint", "compute_figure", "plot_compute"]


@dataclass(frozen=True)
class ComputePoint:
    """One task's score at the mean thinking iterations one run spent on it; ``rule`` None: fixed loops.

    Example: ``ComputePoint("phop@loops8", "phop", "latent:0.05", "shared", mean_loops=4.7, score=0.88)``
    """

    model: str
    task: str
    rule: str | None
    kv_policy: str
    mean_loops: float
    score: float

    @property
    def series(self) -> str:
        """The line this point belongs to: task, exit criterion and a non-default KV policy."""
        criterion = self.rule.partition(":")[0]
        kv = "" if self.kv_policy == "per_application" else f", kv {self.kv_policy}"
        return f"{self.task} ({criterion}{kv})"


def compute_figure(points: Sequence[ComputePoint]) -> Figure:
    """One panel per model: accuracy (%) against mean thinking iterations, one line per task and exit
    criterion (thresholds sorted by iterations), the fixed-loop runs as stars in their task's colour.

    Example: ``compute_figure(points).savefig("acc_vs_loops.png")``
    """
    models = list(dict.fromkeys(p.model for p in points))
    if not models:
        raise UserError("no results to plot")
    columns = min(2, len(models))
    rows = math.ceil(len(models) / columns)
    figure = Figure(figsize=(8.0 * columns, 4.0 * rows), layout="constrained")  # room for the legend on the right
    FigureCanvasAgg(figure)  # Agg explicitly: no pyplot, no global backend, works headless
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colors = {task: f"C{index}" for index, task in enumerate(dict.fromkeys(p.task for p in points))}
    for axis, model in zip(axes, models):
        mine = [p for p in points if p.model == model]
        for series in dict.fromkeys(p.series for p in mine if p.rule is not None):
            line = sorted((p for p in mine if p.rule is not None and p.series == series), key=lambda p: p.mean_loops)
            axis.plot([p.mean_loops for p in line], [100 * p.score for p in line], marker="o", markersize=3,
                      color=colors[line[0].task], linestyle="--" if line[0].rule.startswith("latent") else "-",
                      label=series)
        for point in (p for p in mine if p.rule is None):
            shared = point.kv_policy != "per_application"
            axis.scatter([point.mean_loops], [100 * point.score], marker="x" if shared else "*", s=90,
                         color=colors[point.task], zorder=3,
                         label=f"{point.task} (fixed{', kv ' + point.kv_policy if shared else ''})")
        axis.set_xlabel("mean thinking iterations per token")
        axis.set_ylabel("accuracy (%)")
        axis.set_title(model)
        axis.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, not on them
    for axis in axes[len(models):]:  # the last row's unused cell
        figure.delaxes(axis)
    return figure


def plot_compute(points: Sequence[ComputePoint], path: str | Path) -> Path:
    """Write :func:`compute_figure` as a PNG.

    Example: ``plot_compute(points, "acc_vs_loops.png")``
    """
    path = Path(path)
    compute_figure(points).savefig(path, dpi=120)
    return path
