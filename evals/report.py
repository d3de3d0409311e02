"""Results files (schema ``loopreg.eval/1``) and the tables built from many of them.

A results file is the JSON one eval run writes::

    {"schema": "loopreg.eval/1", "model": "loop-12x2", "spec": "12x2", "loops": 2,
     "params_units": 12, "flops_units": 24, "perplexity": 7.90 | null,
     "exit": "kl:0.01" | null, "kv_policy": "per_application" | "shared" | null,
     "perplexity_loops": {"mean_loops", "executed_loops"} | null  (perplexity under the exit rule),
     "tasks":  {"svamp": {"score", "stderr", "n", "metric", "group", "random_baseline", "missing",
                          "mean_loops", "executed_loops"  (only with an exit rule)}, ...},
     "groups": {"math_word": {"score", "stderr", "n_tasks", "n_defined", "missing"}, ...}}

Scores are fractions in [0, 1]; tables print percentages. Tables recompute group averages from the
task scores with the current group YAMLs (``groups`` in a file is a convenience copy).

:func:`report_main` is the ``loopreg report`` command: a table shaped like the paper's Table 3 (rows =
models with Params/FLOPs; columns = perplexity, closed-book, open-book, math, All, primitives), ``% Gap``
rows for ``--pair ISO_PARAM:LOOPED`` against ``--baseline ISO_FLOP``, or with ``--scaling`` the
log-depth fits and their plot, or with ``--compute`` accuracy against mean thinking iterations for runs
with an adaptive exit rule (``loopreg eval --exit``), or with ``--frontier GROUP`` a group's score against
held-out perplexity beside the non-looped baselines' frontier (Fig. 1); ``--markdown`` / ``--json`` export
any of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loopreg.errors import ArgumentParser, UserError, writing
from loopreg.spec import LoopSpec

from .aggregate import GroupScore, TaskScore, aggregate_group, aggregate_groups, percent_gap
from .frontier import FrontierPoint, frontier_at, plot_frontier
from .scaling import DepthPoint, alpha_ratios, fit_scaling, plot_scaling, plotted_groups
from .catalog import GroupSpec, load_groups

__all__ = [
    "DEFAULT_COLUMNS",
    "EvalDataError",
    "RESULTS_SCHEMA",
    "EvalResults",
    "LoopUsage",
    "ModelInfo",
    "ReportRow",
    "ReportTable",
    "compute_report",
    "frontier_points",
    "frontier_report",
    "load_results",
    "report_main",
    "scaling_report",
    "table3",
    "to_json",
    "to_markdown",
    "to_rich",
    "write_results",
]

RESULTS_SCHEMA = "loopreg.eval/1"
REPORT_SCHEMA = "loopreg.report/1"
DEFAULT_COLUMNS = ("closed_book", "open_book", "math_word", "all_tasks", "reasoning_primitives")
MISSING_CELL = "—"


# ---------------------------------------------------------------------------------------- results files
class EvalDataError(UserError):
    """A results file is unusable; ``str()`` is one line naming the file.

    Example: ``runs/eval/x.json: not a results file: schema is 'other', expected 'loopreg.eval/1'``
    """

    def __init__(self, task: str | None, source: str | Path, problem: str) -> None:
        super().__init__(f"{f'task {task}: ' if task else ''}{source}: {' '.join(str(problem).split())}")


@dataclass(frozen=True)
class LoopUsage:
    """Thinking iterations per token of one task under an exit rule (:class:`loopreg.adaptive.ExitStats`):
    ``mean_loops`` where the tokens exited, ``executed_loops`` what the batches really computed.

    Example: ``LoopUsage(mean_loops=4.2, executed_loops=6.9)``
    """

    mean_loops: float
    executed_loops: float


@dataclass(frozen=True)
class ModelInfo:
    """What a results file says about the model; ``params_units``/``flops_units`` are in layer units.

    >>> ModelInfo.from_spec("middle", "4x(1,4,1)").flops_units
    24
    """

    name: str
    spec: str | None = None
    loops: int | None = None
    params_units: int | None = None
    flops_units: int | None = None
    perplexity: float | None = None
    exit: str | None = None  # the adaptive exit rule (``kl:0.01``); None: every token runs every loop
    kv_policy: str | None = None  # None: the exact per_application cache
    perplexity_loops: LoopUsage | None = None  # the thinking iterations of the perplexity run, with an exit rule

    @property
    def fixed(self) -> bool:
        """A fixed-loop run with the exact cache: the reference of the ``--compute`` report."""
        return self.exit is None and self.kv_policy in (None, "per_application")

    @property
    def label(self) -> str:
        """``name``, plus the exit rule and a non-default KV policy: one results file's unique row name.

        >>> ModelInfo("phop@loops8", exit="kl:0.01", kv_policy="shared").label
        'phop@loops8+exit=kl:0.01+kv=shared'
        """
        extras = ([f"exit={self.exit}"] if self.exit else []) + \
            ([f"kv={self.kv_policy}"] if self.kv_policy not in (None, "per_application") else [])
        return "+".join([self.name, *extras])

    @classmethod
    def from_spec(cls, name: str, spec: str, perplexity: float | None = None) -> ModelInfo:
        """Fill spec, loops (the largest loop count of any block) and Params/FLOPs from a loop spec."""
        parsed = LoopSpec.parse(spec)
        return cls(name, str(parsed), max(block.loops for block in parsed.blocks), parsed.params_units,
                   parsed.flops_units, perplexity)

    @property
    def units(self) -> str:
        """The paper's Params/FLOPs cell, e.g. ``12x/24x``."""
        if self.params_units is None or self.flops_units is None:
            return MISSING_CELL
        return f"{self.params_units}x/{self.flops_units}x"


@dataclass(frozen=True)
class EvalResults:
    """One model's eval results; ``to_json``/``from_json`` are the ``loopreg.eval/1`` schema.

    ``loop_usage`` holds the per-task iterations of a run with an exit rule; ``source`` is the file it was
    read from (for error messages; not compared).

    Example: ``EvalResults(ModelInfo("base-12x1"), tasks={"svamp": TaskScore(...)}, groups={})``
    """

    info: ModelInfo
    tasks: Mapping[str, TaskScore]
    groups: Mapping[str, GroupScore] = field(default_factory=dict)
    loop_usage: Mapping[str, LoopUsage] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The results-file dict (JSON-ready)."""
        info = self.info
        return {
            "schema": RESULTS_SCHEMA, "model": info.name, "spec": info.spec, "loops": info.loops,
            "params_units": info.params_units, "flops_units": info.flops_units, "perplexity": info.perplexity,
            "exit": info.exit, "kv_policy": info.kv_policy,
            "perplexity_loops": None if info.perplexity_loops is None else dataclasses.asdict(info.perplexity_loops),
            "tasks": {name: {"score": t.score, "stderr": t.stderr, "n": t.n, "metric": t.metric, "group": t.group,
                             "random_baseline": t.random_baseline, "missing": t.missing,
                             **(dataclasses.asdict(self.loop_usage[name]) if name in self.loop_usage else {})}
                      for name, t in self.tasks.items()},
            "groups": {name: {"score": g.score, "stderr": g.stderr, "n_tasks": g.n_tasks, "n_defined": g.n_defined,
                              "missing": list(g.missing)}
                       for name, g in self.groups.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "<json>") -> EvalResults:
        """Parse a results-file dict; anything off raises :class:`EvalDataError` naming ``source``."""
        if not isinstance(data, dict) or data.get("schema") != RESULTS_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise EvalDataError(None, source, f"not a results file: schema is {found!r}, expected {RESULTS_SCHEMA!r}")
        try:
            ppl_loops = data.get("perplexity_loops")
            info = ModelInfo(str(data["model"]), data.get("spec"), data.get("loops"), data.get("params_units"),
                             data.get("flops_units"), data.get("perplexity"), data.get("exit"), data.get("kv_policy"),
                             None if ppl_loops is None else LoopUsage(**ppl_loops))
            usage_keys = [f.name for f in dataclasses.fields(LoopUsage)]
            tasks = {name: TaskScore(**{k: v for k, v in entry.items() if k not in usage_keys})
                     for name, entry in data["tasks"].items()}
            loop_usage = {name: LoopUsage(**{k: float(entry[k]) for k in usage_keys})
                          for name, entry in data["tasks"].items() if "mean_loops" in entry}
            groups = {name: GroupScore(name=name, **{**entry, "missing": tuple(entry["missing"])})
                      for name, entry in data.get("groups", {}).items()}
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise EvalDataError(None, source, f"malformed {RESULTS_SCHEMA} results: {err!r}") from err
        return cls(info, tasks, groups, loop_usage, str(source))


def write_results(path: str | Path, results: EvalResults) -> Path:
    """Write ``results`` as JSON atomically (temporary file in the same folder, then ``os.replace``).

    Example: ``write_results("runs/loop-12x2/eval.json", results)``
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as handle:
        json.dump(results.to_json(), handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)
    return path


def load_results(paths: Sequence[str | Path]) -> list[EvalResults]:
    """Load results files in the given order; a directory contributes its ``*.json`` files, sorted.

    Example: ``load_results(["runs/base-24x1.json", "runs/loops/"])``
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise EvalDataError(None, path, "no such results file or directory")
    loaded, seen = [], {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EvalDataError(None, path, f"cannot read JSON: {err}") from err
        results = EvalResults.from_json(data, path)
        if results.info.label in seen:
            raise EvalDataError(None, path, f"model {results.info.label!r} is also in {seen[results.info.label]}")
        seen[results.info.label] = path
        loaded.append(results)
    return loaded


# ---------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class ReportRow:
    """One table row: display ``cells`` and the matching raw ``values`` (numbers for JSON export)."""

    kind: str  # "model", "gap" or "fit"
    cells: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class ReportTable:
    """A renderer-neutral table; :func:`to_rich`, :func:`to_markdown` and :func:`to_json` draw it."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[ReportRow, ...]
    notes: tuple[str, ...] = ()


def _score_cell(group: GroupScore) -> str:
    if group.score is None:
        return MISSING_CELL
    flag = "" if group.complete else f" ({group.n_tasks}/{group.n_defined})"
    return f"{100 * group.score:.1f}{flag}"


def _gap(looped: float | None, iso_param: float | None, iso_flop: float | None) -> float | None:
    if None in (looped, iso_param, iso_flop):
        return None
    return percent_gap(looped, iso_param, iso_flop)


def _gap_cell(gap: float | None) -> str:
    return MISSING_CELL if gap is None or math.isnan(gap) else f"{gap:.0f}%"


def table3(results: Sequence[EvalResults], groups: Mapping[str, GroupSpec],
           pairs: Sequence[tuple[str, str]] = (), baseline: str | None = None,
           columns: Sequence[str] = DEFAULT_COLUMNS, centered: bool = False) -> ReportTable:
    """The paper's Table 3 layout; a ``% Gap`` row follows the looped model of each ``(iso_param, looped)``
    pair, computed against the iso-FLOP ``baseline`` (perplexity gap on raw perplexity).

    A group gap needs the same tasks scored in all three models, else it prints ``—``.

    Example: ``table3(load_results(files), load_groups(), pairs=[("base-12x1", "loop-12x2")], baseline="base-24x1")``
    """
    unknown = [name for name in columns if name not in groups]
    if unknown:
        raise UserError(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(sorted(groups))}")
    by_name = {r.info.label: r for r in results}
    for name in [baseline, *(name for pair in pairs for name in pair)]:
        if name is not None and name not in by_name:
            raise UserError(f"no results for model {name!r}; loaded: {', '.join(by_name)}")
    if pairs and baseline is None:
        raise UserError("--pair needs --baseline (the iso-FLOP model)")
    scores = {name: aggregate_groups(groups, r.tasks, centered) for name, r in by_name.items()}

    def column_values(name: str) -> list[float | None]:
        return [by_name[name].info.perplexity, *(scores[name][group].score for group in columns)]

    def gap_row(iso: str, looped: str) -> ReportRow:
        gaps = [_gap(*values) for values in zip(column_values(looped), column_values(iso), column_values(baseline))]
        for index, group in enumerate(columns, start=1):  # index 0 is perplexity
            if len({scores[name][group].missing for name in (iso, looped, baseline)}) > 1:
                gaps[index] = None  # different task sets: the ratio would compare unlike averages
        return ReportRow("gap", ("% Gap", "", *map(_gap_cell, gaps)), (f"{iso}:{looped}", None, *gaps))

    rows = []
    for r in results:
        name = r.info.label
        ppl = MISSING_CELL if r.info.perplexity is None else f"{r.info.perplexity:.2f}"
        cells = [_score_cell(scores[name][group]) for group in columns]
        rows.append(ReportRow("model", (name, r.info.units, ppl, *cells), (name, r.info.units, *column_values(name))))
        rows += [gap_row(iso, looped) for iso, looped in pairs if looped == name]

    headers = [f"{groups[g].title} ({len(groups[g].tasks)})" for g in columns]
    notes = sorted({f"{g}: {group.coverage} (missing: {', '.join(group.missing)})"
                    for per_model in scores.values() for g, group in per_model.items()
                    if g in columns and not group.complete and group.score is not None})
    metric = "centered accuracy (acc − b)/(1 − b)" if centered else "accuracy"
    notes = [f"scores: {metric}, %; (m/n): average over m of the group's n tasks", *notes]
    if pairs:
        notes.append(f"% Gap = (looped − iso-param) / (iso-FLOP {baseline} − iso-param); perplexity on raw values")
    return ReportTable("Downstream evaluation", ("Model", "Params/FLOPs", "PPL ↓", *headers), tuple(rows),
                       tuple(notes))


def scaling_report(results: Sequence[EvalResults], groups: Mapping[str, GroupSpec],
                   columns: Sequence[str] = DEFAULT_COLUMNS, centered: bool = False,
                   png: str | Path | None = None) -> ReportTable:
    """Fit ``Acc = α·ln D + β`` per group and family (see :mod:`.scaling`); optionally write the PNG.

    α and β are in accuracy points (%), α per unit of natural-log depth. A fit through fewer than three
    distinct depths is exact: its R² cell is ``—`` (``None`` in JSON) and a note says why. The PNG draws
    only the groups some model has a score in.

    Example: ``to_markdown(scaling_report(load_results(["runs/"]), load_groups(), png="scaling.png"))``
    """
    unknown = [name for name in columns if name not in groups]
    if unknown:
        raise UserError(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(sorted(groups))}")
    points = []
    for r in results:
        if r.info.params_units is None or r.info.flops_units is None:
            raise UserError(f"model {r.info.label!r} has no params_units/flops_units, so no effective depth")
        group_scores = aggregate_groups({g: groups[g] for g in columns}, r.tasks, centered)
        points.append(DepthPoint(r.info.label, r.info.params_units, r.info.flops_units,
                                 {g: s.score for g, s in group_scores.items() if s.score is not None}))
    fits, plotted = fit_scaling(points, columns), plotted_groups(points, columns)
    rows, exact = [], None
    for group in columns:
        ratios = alpha_ratios(fits[group])
        for family, fit in fits[group].items():
            ratio = ratios.get(family)
            exact = fit.r2_label if fit.exact else exact
            rows.append(ReportRow("fit", (groups[group].title, family, f"{100 * fit.alpha:.2f}",
                                          f"{100 * fit.beta:.1f}", MISSING_CELL if fit.exact else f"{fit.r2:.3f}",
                                          str(fit.n), MISSING_CELL if ratio is None else f"{ratio:.2f}"),
                                  (group, family, fit.alpha, fit.beta, fit.r2, fit.n, ratio)))
    notes = ["Acc = α·ln(D) + β, natural log, D = effective depth (FLOPs in layer units); α, β in accuracy points",
             "α ratio = α_looped / α_non-looped for the same group"]
    if exact is not None:
        notes.append(f"R² {MISSING_CELL}: {exact} (a line through two depths fits them exactly)")
    unfitted = [group for group in plotted if not fits[group]]
    if unfitted:
        notes.append(f"no fit (every family has a single depth): {', '.join(unfitted)}")
    if png is not None:
        plot_scaling(points, fits, png, {g: groups[g].title for g in columns})
        notes.append(f"plot: {png} (only the groups with scores: {', '.join(plotted)})")
    return ReportTable("Depth scaling", ("Group", "Family", "α", "β", "R²", "n", "α ratio"), tuple(rows),
                       tuple(notes))


def frontier_points(results: Sequence[EvalResults], groups: Mapping[str, GroupSpec], group: str,
                    centered: bool = False) -> list[FrontierPoint]:
    """Each model's perplexity and ``group`` score (%, with its stderr); a baseline is a spec with no looped
    block. ``group`` is a catalog group, or else the tasks a results file marks with that group name."""
    points = []
    for r in results:
        spec = groups.get(group) or GroupSpec(group, group, [name for name, t in r.tasks.items() if t.group == group])
        score = aggregate_group(spec, r.tasks, centered)
        if score.score is None:
            raise UserError(f"model {r.info.label!r} has no score in group {group!r}")
        if r.info.perplexity is None or r.info.spec is None:
            raise UserError(f"model {r.info.label!r} has no perplexity or no loop spec (loopreg eval --ppl-text)")
        points.append(FrontierPoint(r.info.label, r.info.perplexity, 100 * score.score,
                                    None if score.stderr is None else 100 * score.stderr,
                                    not LoopSpec.parse(r.info.spec).is_looped))
    return points


def frontier_report(results: Sequence[EvalResults], groups: Mapping[str, GroupSpec], group: str,
                    centered: bool = False, png: str | Path | None = None) -> ReportTable:
    """``group``'s score against held-out perplexity for every model, and how far above the frontier of the
    non-looped baselines each other model sits (points, at its perplexity); optionally the plot (Fig. 1).

    ``group``: see :func:`frontier_points` (``loopreg reproduce`` marks its ``reasoning`` and ``harder`` tasks).

    Example: ``to_markdown(frontier_report(load_results(["runs/"]), load_groups(), "reasoning_primitives"))``
    """
    points = frontier_points(results, groups, group, centered)
    rows = []
    for point in sorted(points, key=lambda p: (not p.baseline, p.perplexity)):
        frontier = None if point.baseline else frontier_at(points, point.perplexity)
        above = None if frontier is None else point.score - frontier
        error = MISSING_CELL if point.stderr is None else f"{point.stderr:.1f}"
        rows.append(ReportRow("model", (point.model, "baseline" if point.baseline else "looped / regularized",
                                        f"{point.perplexity:.3f}", f"{point.score:.1f}", error,
                                        MISSING_CELL if above is None else f"{above:+.1f}"),
                              (point.model, point.baseline, point.perplexity, point.score, point.stderr, above)))
    notes = [f"score: {group} accuracy (%); above frontier: score minus the baselines' score interpolated at the "
             f"model's perplexity ({MISSING_CELL}: outside the baselines' perplexity range)"]
    if png is not None:
        plot_frontier(points, png, f"{group} (%)")
        notes.append(f"plot: {png}")
    return ReportTable(f"{group} against perplexity", ("Model", "Kind", "Perplexity", "Score", "± stderr",
                                                       "Above frontier"), tuple(rows), tuple(notes))


TARGET_FEWER, TARGET_LOST = 30.0, 1.0  # issue #17: >= 30% fewer thinking iterations at <= 1 point lost


def _fewer(loops: float, maximum: int | None) -> float | None:
    return None if not maximum else 100.0 * (1.0 - loops / maximum)


def compute_report(results: Sequence[EvalResults], png: str | Path | None = None) -> ReportTable:
    """Accuracy against mean thinking iterations per task, for runs with an exit rule (``loopreg eval --exit``)
    and the fixed-loop runs of the same models (the reference: every token runs the maximum, ``loops``).

    ``fewer`` is ``1 − iterations / max`` in percent, for the mean (where tokens exited) and the executed
    iterations (what the batches computed); ``Δ acc`` is in points against the fixed-max run of the same
    model name. A run with several tasks gets a ``mean (N tasks)`` row (means of scores and iterations).
    A file that is neither an exit run nor the fixed reference of one raises a one-line
    :class:`~loopreg.errors.UserError`: ``FILE: no mean_loops (run loopreg eval with --exit)``.

    Example: ``to_markdown(compute_report(load_results(["runs/adaptive/"]), png="acc_vs_loops.png"))``
    """
    from .compute import ComputePoint, plot_compute

    adaptive = {r.info.name for r in results if not r.info.fixed}
    for r in results:
        if (r.info.exit is not None and not r.loop_usage) or (r.info.fixed and r.info.name not in adaptive):
            raise UserError(f"{r.source or r.info.label}: no mean_loops (run loopreg eval with --exit)")
    reference = {r.info.name: r for r in results if r.info.fixed}
    order = {r.info.name: index for index, r in enumerate(results)}
    ranked = sorted(results, key=lambda r: (order[r.info.name], not r.info.fixed, r.info.exit is not None,
                                            r.info.kv_policy or "", (r.info.exit or "").partition(":")[0],
                                            float((r.info.exit or ":0").partition(":")[2])))
    rows, points = [], []
    for r in ranked:
        base = reference.get(r.info.name)
        maximum = (base or r).info.loops
        fixed = LoopUsage(float(maximum), float(maximum))  # a run without an exit rule: every token, every loop
        scored = {task: (t.score, r.loop_usage.get(task) or fixed)
                  for task, t in r.tasks.items() if t.score is not None}
        base_scores = {} if base is None else {task: t.score for task, t in base.tasks.items() if t.score is not None}
        if len(scored) > 1:  # the run as a whole: mean score and mean iterations over its tasks
            tasks, mean = list(scored), f"mean ({len(scored)} tasks)"
            scored[mean] = (sum(scored[t][0] for t in tasks) / len(tasks),
                            LoopUsage(*(sum(getattr(scored[t][1], key) for t in tasks) / len(tasks)
                                        for key in ("mean_loops", "executed_loops"))))
            if set(tasks) <= set(base_scores):
                base_scores[mean] = sum(base_scores[t] for t in tasks) / len(tasks)
        for task, (score, usage) in scored.items():
            base_score = base_scores.get(task)
            delta = None if base_score is None else 100.0 * (score - base_score)
            fewer, fewer_executed = _fewer(usage.mean_loops, maximum), _fewer(usage.executed_loops, maximum)
            target = (r.info.exit is not None and delta is not None and fewer is not None
                      and fewer >= TARGET_FEWER and delta >= -TARGET_LOST - 1e-9)  # 97 - 98 is -1.0000000000000009
            kv = r.info.kv_policy or "per_application"
            cells = (r.info.name, r.info.exit or "fixed", kv, task, f"{100 * score:.1f}",
                     f"{usage.mean_loops:.2f}", f"{usage.executed_loops:.2f}",
                     MISSING_CELL if fewer is None else f"{fewer:.0f}%",
                     MISSING_CELL if fewer_executed is None else f"{fewer_executed:.0f}%",
                     MISSING_CELL if delta is None else f"{delta:+.1f}", "✓" if target else "")
            rows.append(ReportRow("model", cells, (r.info.name, r.info.exit, kv, task, score, usage.mean_loops,
                                                   usage.executed_loops, fewer, fewer_executed, delta, target)))
            if task in r.tasks:  # the plot draws tasks, not the mean row
                points.append(ComputePoint(r.info.name, task, r.info.exit, kv, usage.mean_loops, score))
    notes = ["score: accuracy, %; loops: thinking iterations per token (mean: where each token exited; executed: "
             "what the batches computed, every row waits for its slowest token)",
             "fewer = 1 − loops / max; Δ acc: points vs the fixed-max run of the same model (exit none, "
             "per_application)",
             f"target ✓: ≥ {TARGET_FEWER:.0f}% fewer mean iterations at ≤ {TARGET_LOST:.0f} point lost"]
    if png is not None:
        plot_compute(points, png)
        notes.append(f"plot: {png}")
    return ReportTable("Accuracy vs compute", ("Model", "Exit", "KV", "Task", "Score", "Mean loops", "Executed",
                                               "Fewer", "Fewer executed", "Δ acc", "Target"), tuple(rows),
                       tuple(notes))


def to_rich(table: ReportTable) -> Table:
    """A rich Table (``% Gap`` rows italic), notes as its caption.

    Example: ``Console().print(to_rich(table3(results, load_groups())))``
    """
    rendered = Table(*table.columns, title=table.title, caption="\n".join(table.notes), caption_justify="left")
    for row in table.rows:
        rendered.add_row(*row.cells, style="italic" if row.kind == "gap" else None)
    return rendered


def to_markdown(table: ReportTable) -> str:
    """A GitHub-flavoured markdown table followed by its notes as a list.

    Example: ``Path("table3.md").write_text(to_markdown(table))``
    """
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(row.cells) + " |" for row in table.rows]
    if table.notes:
        lines += ["", *(f"- {note}" for note in table.notes)]
    return "\n".join(lines) + "\n"


def to_json(table: ReportTable) -> dict[str, Any]:
    """The table as JSON-ready data: raw numbers (fractions, % Gap in percent), not display strings.

    Example: ``json.dumps(to_json(table))``
    """
    return {"schema": REPORT_SCHEMA, "title": table.title, "columns": list(table.columns),
            "rows": [{"kind": row.kind, "values": dict(zip(table.columns, row.values))} for row in table.rows],
            "notes": list(table.notes)}


# ---------------------------------------------------------------------------------------- command line
def _parse_pair(text: str) -> tuple[str, str]:
    iso, sep, looped = text.partition(":")
    if not sep or not iso or not looped:
        raise UserError(f"--pair {text!r}: expected ISO_PARAM:LOOPED model names")
    return iso, looped


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="loopreg report", description="Tables from loopreg.eval/1 results files.")
    parser.add_argument("results", nargs="+", help="results JSON files, or directories of them")
    parser.add_argument("--pair", action="append", default=[], metavar="ISO_PARAM:LOOPED",
                        help="add a %% Gap row after LOOPED (repeatable); needs --baseline")
    parser.add_argument("--baseline", metavar="MODEL", help="the iso-FLOP model of every --pair")
    parser.add_argument("--groups", default=",".join(DEFAULT_COLUMNS),
                        help="comma-separated group columns (default: %(default)s)")
    parser.add_argument("--centered", action="store_true", help="centered accuracy (acc - b) / (1 - b)")
    parser.add_argument("--scaling", action="store_true", help="fit Acc = α·ln D + β instead of Table 3")
    parser.add_argument("--compute", action="store_true",
                        help="accuracy vs mean thinking iterations of runs with an exit rule (loopreg eval --exit)")
    parser.add_argument("--frontier", metavar="GROUP",
                        help="GROUP's score against held-out perplexity beside the non-looped frontier (Fig. 1)")
    parser.add_argument("--png", type=Path, help="with --scaling, --compute or --frontier: write its plot here")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    return parser


def report_main(argv: list[str]) -> int:
    """``loopreg report``: print a table and optionally export it; 0 on success (a user error raises a
    one-line :class:`~loopreg.errors.UserError`).

    Example: ``report_main(["runs/", "--pair", "base-12x1:loop-12x2", "--baseline", "base-24x1"])``
    """
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    pairs = [_parse_pair(text) for text in args.pair]
    chosen = [flag for flag, on in (("--scaling", args.scaling), ("--compute", args.compute),
                                    ("--frontier", args.frontier)) if on]
    if args.png and not chosen:
        raise UserError("--png needs --scaling, --compute or --frontier")
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are different reports; give one")
    if chosen and (pairs or args.baseline):
        raise UserError(f"--pair/--baseline belong to the Table 3 report, not {chosen[0]}")
    columns = [name.strip() for name in args.groups.split(",") if name.strip()]
    results, groups = load_results(args.results), load_groups()
    if chosen:
        with writing(args.png):  # the --png plot is drawn as the report is built
            table = (compute_report(results, args.png) if args.compute else
                     frontier_report(results, groups, args.frontier, args.centered, args.png) if args.frontier else
                     scaling_report(results, groups, columns, args.centered, args.png))
    else:
        table = table3(results, groups, pairs, args.baseline, columns, args.centered)
    if args.markdown:
        with writing(args.markdown):
            args.markdown.write_text(to_markdown(table), encoding="utf-8")
    if args.json:
        with writing(args.json):
            args.json.write_text(json.dumps(to_json(table), indent=2) + "\n", encoding="utf-8")
    console = Console()
    # a pipe or file has no width; rich would assume 80 columns and squeeze the table
    (console if console.is_terminal else Console(width=200)).print(to_rich(table))
    return 0


cli_main = report_main  # the `loopreg report` subcommand
