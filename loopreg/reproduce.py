"""``loopreg reproduce``: the paper's tables at CPU-mini scale, every row at several seeds, resumable.

* ``addition``, ``phop``, ``igsm``: the synthetic Tables 1–2; each row trains the task's CPU-mini recipe
  (``recipes/cpu_{addition,phop,igsm}.yaml``) with the row's loop spec, beside the paper's accuracies.
* ``lm_mini``: Table 3 / Fig. 1 in miniature (``recipes/lm_mini.yaml``): byte-level LMs pretrained on a mixture
  of Wikipedia and reasoning documents, scored on held-out perplexity and held-out problems: non-looped
  baselines, looped and middle-looped models, the untied model under the cosine regularizer (Table 4), and a
  RandomLoops model swept over loop counts 1–8 for the depth scaling law.

``docs/REPRODUCTION.md`` is rendered from ``OUT/results.json`` (mean ± std over seeds, each table dated and
with its command). ``lm_mini`` also writes one ``loopreg.eval/1`` file per row (seed means) to ``OUT/lm_mini/``,
so ``loopreg report OUT/lm_mini --frontier reasoning --png f.png`` redraws its Fig. 1, and the page gets that
plot beside the log-depth fits.

    loopreg reproduce --out runs/repro                            # every table, 3 seeds, each its own budget
    loopreg reproduce --tables lm_mini --seeds 3 --rows 8x1,2x4 &    # split a table over processes: same --out,
    loopreg reproduce --tables lm_mini --seeds 3 --rows 4x1,4x2 &    # rows merge into one results.json
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from loopreg.config import load_recipe, recipe_fingerprint
from loopreg.errors import UserError
from loopreg.spec import LoopSpec

__all__ = ["TABLES", "ReproTable", "reproduce", "render_markdown", "cli_main"]

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SEED = 17  # the first seed of every table; --seeds N runs SEED .. SEED+N-1


@dataclass(frozen=True)
class ReproTable:
    """One reproduced table: its CPU-mini recipe, its rows (id -> recipe overrides) and what it reports.

    ``columns`` are result keys: an evaluator label (its answer exact match, %) or ``<label>_ppl`` (its
    perplexity). ``more_loops`` re-evaluates a row at another loop count after training (keys get
    ``@<loops>``); ``loop_sweep`` does so at each of several counts (the scaling law of one model).
    """

    title: str
    recipe: str
    note: str
    steps: int  # the CPU-mini training budget per row (``--steps`` overrides it)
    rows: dict[str, tuple[str, ...]]
    columns: tuple[str, ...]
    paper_columns: tuple[str, ...] = ()
    paper_rows: dict[str, tuple[float, ...]] = field(default_factory=dict)  # row -> the paper's values (%)
    labels: dict[str, str] = field(default_factory=dict)  # row -> its name in the table (default: from its spec)
    more_loops: dict[str, int] = field(default_factory=dict)
    loop_sweep: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def label(self, row: str) -> str:
        if row in self.labels:
            return self.labels[row]
        spec = LoopSpec.parse(row)
        return f"{'Loop' if spec.is_looped else 'Base'} {spec.paper_label}"


def _paper_table(title: str, recipe: str, columns: tuple[str, ...], paper_columns: tuple[str, ...],
                 paper_rows: dict[str, tuple[float, ...]], note: str, steps: int) -> ReproTable:
    return ReproTable(title, recipe, note, steps, {spec: (f"model.spec={spec}",) for spec in paper_rows}, columns,
                      paper_columns, paper_rows)


# lm_mini: the reasoning evaluators of recipes/lm_mini.yaml, in distribution and on the harder split
REASONING = ("vars_d2", "phop_p2", "addition_n2")
HARDER = ("vars_d4", "phop_p3", "addition_n3")
_REG = "algorithms.loop_regularizer"


def _regularized(spec: str, lam: int) -> tuple[str, ...]:
    """(8⊗1) untied, pulled toward ``spec`` by the cosine regularizer with λ warmed up over the first quarter."""
    return (f"model.spec={spec}", "model.tied=false", f"{_REG}.lambda_reg={lam}", f"{_REG}.schedule=linear_warmup",
            f"{_REG}.t_warmup=500ba")


# (1⊗1) extends the frontier to the perplexity of the looped rows (no distance is read outside it)
LM_MINI_ROWS: dict[str, tuple[str, ...]] = {
    **{spec: (f"model.spec={spec}",) for spec in ("1x1", "2x1", "4x1", "6x1", "8x1", "2x2", "2x3", "2x4", "4x2",
                                                  "2x(1,2,1)")},
    **{f"reg_{spec}_l{lam}": _regularized(spec, lam) for spec in ("4x2", "2x4") for lam in (1, 10)},
    "2x4_random": ("model.spec=2x4", "algorithms.random_loops.distribution={kind: uniform, low: 1, high: 6}"),
}

TABLES: dict[str, ReproTable] = {
    "lm_mini": ReproTable(
        "Reasoning against perplexity (Table 3 / Fig. 1 and Table 4 in miniature)", "lm_mini.yaml",
        "byte-level LMs, d=64, learned positions, residual projections initialised as for depth 2 in every row, "
        "80-byte sequences, batch 32, AdamW with weight decay 0.1, "
        "pretrained on equal parts of "
        "Wikipedia passages, 3-variable assignment chains of depth 0–2, 2-hop induction over 16 letters and "
        "2-operand 2-digit addition (problems trained on their answers only); scored on "
        "`wiki_passages_heldout.jsonl` perplexity and on held-out problems, in "
        "distribution (depth 2, 2 hops, 2 operands) and harder (depth 4, 3 hops, 3 operands)", 3000,
        LM_MINI_ROWS, ("wiki_ppl", *REASONING, *HARDER),
        labels={**{f"reg_{spec}_l{lam}": f"Reg (8⊗1)→{LoopSpec.parse(spec).paper_label}, λ={lam}"
                   for spec in ("4x2", "2x4") for lam in (1, 10)},
                "2x4_random": "Loop (2⊗1..6), RandomLoops"},
        more_loops={"2x2": 4, "2x3": 6, "2x4": 8, "4x2": 4},
        loop_sweep={"2x4_random": tuple(range(1, 9))}),
    "addition": _paper_table(
        "n-ary addition (Table 1, left)", "cpu_addition.yaml", ("n2", "n3", "n4"),
        ("n=8", "n=16", "n=24", "n=32"),
        {"12x1": (100.0, 100.0, 100.0, 100.0), "1x1": (0.1, 0.1, 0.1, 0.0), "1x12": (99.9, 100.0, 99.9, 99.6),
         "2x1": (85.8, 71.5, 49.3, 38.8), "2x6": (100.0, 99.8, 99.7, 99.5), "3x1": (97.2, 78.5, 69.2, 60.7),
         "3x4": (100.0, 99.1, 97.0, 96.6)},
        "four 3-digit operand slots, 1–4 of them real in training (the rest 000), the answer most-significant digit "
        "first, eval on 2, 3 and 4 real operands; d=64, lr 2e-3, learned positions; paper: 2–32 operands, d=256, "
        "200k steps",
        12000),  # chosen on validation seed 107: at 6000 the looped rows left the plateau on some seeds only
    "phop": _paper_table(
        "p-hop induction (Table 1, right)", "cpu_phop.yaml", ("eval",), ("p=16", "p=32"),
        {"6x1": (99.9, 99.6), "1x1": (48.9, 49.0), "1x6": (99.9, 99.5), "2x1": (68.8, 59.4), "2x3": (99.9, 99.8),
         "3x1": (97.2, 73.0), "3x2": (99.9, 99.5)},
        "|Σ|=4, n=32, p=2, a label at every position; d=64; paper: n=256, p=16/32, d=128, 200k steps", 2000),
    "igsm": _paper_table(
        "symbolic i-GSM (Table 2)", "cpu_igsm.yaml", ("ops2", "ops3", "ops4"), ("accuracy",),
        {"8x1": (73.2,), "1x1": (24.5,), "1x2": (52.3,), "1x4": (69.9,), "1x8": (73.2,), "2x1": (54.0,),
         "2x2": (66.9,), "2x4": (73.6,), "4x1": (71.3,), "4x2": (71.6,)},
        "1–4 needed parameters in training (the size curriculum), 1 distractor, ≤ 2 operands, depth ≤ 3, mod 7, "
        "no shortcut problems, scored on 2, 3 and 4 needed parameters; d=64; paper: larger graphs, d=128, 200k steps",
        2000),
}


def _scores(trainer: Any, suffix: str = "") -> dict[str, float]:
    """Every evaluator's answer exact match (%) and perplexity, keyed ``label`` / ``label_ppl`` (+ suffix)."""
    scores = {}
    for label, metrics in trainer.state.eval_metrics.items():
        if "AnswerExactMatch" in metrics:
            scores[label + suffix] = round(float(metrics["AnswerExactMatch"].compute()) * 100, 2)
        if "LanguagePerplexity" in metrics and "AnswerExactMatch" not in metrics:
            scores[f"{label}_ppl{suffix}"] = round(float(metrics["LanguagePerplexity"].compute()), 4)
    return scores


def train_row(table: ReproTable, row: str, seed: int, steps: int, overrides: list[str], fingerprint: str) -> dict:
    """Train one row at one seed; returns its scores (and those at the table's other loop counts), recorded under
    ``fingerprint`` (:func:`row_fingerprint`)."""
    from composer.utils import reproducibility

    from loopreg.train import build_trainer

    slug = row.replace("(", "").replace(")", "").replace(",", "-")
    run_name = f"repro_{Path(table.recipe).stem.removeprefix('cpu_')}_{slug}_s{seed}"
    recipe = load_recipe(RECIPES / table.recipe, [*table.rows[row], f"seed={seed}", f"run_name={run_name}",
                                                  f"max_duration={steps}ba", f"eval_interval={steps}ba", *overrides])
    reproducibility.seed_all(recipe.seed)
    start = time.perf_counter()
    trainer = build_trainer(recipe)
    trainer.fit()
    scores = _scores(trainer)
    model = trainer.state.model.model
    for loops in (*table.loop_sweep.get(row, ()), *([table.more_loops[row]] if row in table.more_loops else [])):
        model.config.loops = loops  # the forward's default loop count: the trained block run `loops` times
        trainer.eval()
        scores.update(_scores(trainer, f"@{loops}"))
    model.config.loops = None
    trainer.close()
    return {"row": row, "seed": seed, "scores": scores, "seconds": round(time.perf_counter() - start, 1),
            "recipe": fingerprint}


def row_fingerprint(table: ReproTable, row: str, overrides: list[str]) -> str:
    """What a row trains under (:func:`~loopreg.config.recipe_fingerprint` of its recipe and overrides): a result
    recorded under another fingerprint, or none, is stale and trained again."""
    return recipe_fingerprint(RECIPES / table.recipe, [*table.rows[row], *overrides])


# ---------------------------------------------------------------------------------------------- rendering
def shown_rows(entry: dict, table: ReproTable) -> tuple[dict, set[str]]:
    """``entry`` with, for each row, only its results under the current recipe (its fingerprint), or its stale
    results where it has no current one; and the rows shown stale (marked † in the tables)."""
    current = {row: row_fingerprint(table, row, entry.get("overrides", [])) for row in table.rows}
    fresh = [result for result in entry["rows"] if result.get("recipe") == current.get(result["row"])]
    have = {result["row"] for result in fresh}
    old = [result for result in entry["rows"] if result["row"] not in have]
    return {**entry, "rows": fresh + old}, {result["row"] for result in old}


def _stale_note(table: ReproTable, stale: set[str]) -> list[str]:
    if not stale:
        return []
    return [f"† Trained under an older `recipes/{table.recipe}` (or these rows' overrides) than today's: the recorded "
            "fingerprint differs or is missing.", ""]


def _name(table: ReproTable, row: str, stale: set[str]) -> str:
    return table.label(row) + (" †" if row in stale else "")


def _stats(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "—"
    mean, std = _stats(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def row_values(entry: dict, row: str, key: str) -> list[float]:
    """``key``'s value at every seed of ``row`` (a mean over keys when ``key`` is a tuple of them)."""
    values = []
    for result in entry["rows"]:
        if result["row"] != row:
            continue
        keys = key if isinstance(key, tuple) else (key,)
        if all(k in result["scores"] for k in keys):
            values.append(statistics.fmean(result["scores"][k] for k in keys))
    return values


def _spec(table: ReproTable, row: str) -> LoopSpec:
    return LoopSpec.parse(next(o.partition("=")[2] for o in table.rows[row] if o.startswith("model.spec=")))


def _iso_rows(table: ReproTable, row: str, rows: list[str]) -> tuple[str, str] | None:
    """The iso-param and iso-FLOP non-looped rows of a plain looped row (one spec override), when both ran."""
    spec = _spec(table, row)
    if len(table.rows[row]) > 1 or not spec.is_looped:
        return None
    iso_param, iso_flop = f"{spec.params_units}x1", f"{spec.flops_units}x1"
    return (iso_param, iso_flop) if iso_param in rows and iso_flop in rows else None


def _within_noise(a: list[float], b: list[float]) -> bool:
    """Whether two seed sets' means differ by less than two standard errors of their difference."""
    if len(a) < 2 or len(b) < 2:
        return False
    error = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.fmean(a) - statistics.fmean(b)) < 2 * error


def _z(a: list[float], b: list[float]) -> str:
    """The difference of two seed sets' means in units of their pooled standard deviation."""
    if len(a) < 2 or len(b) < 2:
        return "n/a (one seed)"
    pooled = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
    diff = statistics.fmean(a) - statistics.fmean(b)
    return f"{diff:+.2f} ({diff / pooled:+.1f} σ)" if pooled > 0 else f"{diff:+.2f} (no spread)"


def lm_mini_eval_results(entry: dict, table: ReproTable) -> list[Any]:
    """One ``loopreg.eval/1`` result per row: seed means, the stderr and ``n`` over seeds, each reasoning task
    in group ``reasoning`` or ``harder``, the held-out perplexity (an untied row counts all its layers)."""
    from loopreg.evals.aggregate import TaskScore
    from loopreg.evals.report import EvalResults, ModelInfo

    results = []
    for row in table.rows:
        if not row_values(entry, row, "wiki_ppl"):
            continue
        tasks = {}
        for key in (*REASONING, *HARDER):
            values = row_values(entry, row, key)
            mean, std = _stats(values)
            tasks[key] = TaskScore(mean / 100, None if std is None else std / 100 / math.sqrt(len(values)),
                                   len(values), "exact_match", "reasoning" if key in REASONING else "harder")
        spec, untied = _spec(table, row), "model.tied=false" in table.rows[row]
        info = ModelInfo(table.label(row), str(spec), max(b.loops for b in spec.blocks),
                         spec.flops_units if untied else spec.params_units, spec.flops_units,
                         _stats(row_values(entry, row, "wiki_ppl"))[0])
        results.append(EvalResults(info, tasks))
    return results


def frontier_distances(entry: dict, table: ReproTable) -> dict[str, list[float]]:
    """Each looped or regularized row's in-distribution reasoning minus the non-looped baselines' frontier at its
    perplexity, one value per seed: each seed's baselines draw that seed's frontier (claims 2 and 3)."""
    from loopreg.evals.frontier import frontier_at
    from loopreg.evals.report import frontier_points

    distances: dict[str, list[float]] = {}
    for seed in sorted({result["seed"] for result in entry["rows"]}):
        one_seed = {**entry, "rows": [result for result in entry["rows"] if result["seed"] == seed]}
        points = frontier_points(lm_mini_eval_results(one_seed, table), {}, "reasoning")
        for row in table.rows:
            point = next((p for p in points if p.model == table.label(row)), None)
            frontier = None if point is None or point.baseline else frontier_at(points, point.perplexity)
            if frontier is not None:
                distances.setdefault(row, []).append(point.score - frontier)
    return distances


def _above(values: list[float]) -> str:
    """Mean distance above the frontier ± its seed std, and the mean in standard errors (t)."""
    if len(values) < 2:
        return _cell(values)
    mean, std = _stats(values)
    t = "no spread" if std == 0 else f"t = {mean / (std / math.sqrt(len(values))):+.1f}"
    return f"{mean:+.1f} ± {std:.1f} ({t})"


def _lm_mini_markdown(entry: dict, table: ReproTable, stale: set[str]) -> list[str]:
    from loopreg.evals.aggregate import percent_gap

    rows = [row for row in table.rows if row_values(entry, row, "wiki_ppl")]
    distances = frontier_distances(entry, table)
    header = ["Model", "Params/FLOPs", "seeds", "wiki PPL", *REASONING, "reasoning", "above frontier", "% Gap",
              *HARDER, "harder", "harder, 2× loops"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        spec = _spec(table, row)
        untied = "model.tied=false" in table.rows[row]
        units = f"{spec.flops_units}x/{spec.flops_units}x" if untied else spec.units_label.replace(" ", "")
        gap = "—"
        iso = _iso_rows(table, row, rows)
        if iso:
            seeds = [row_values(entry, r, REASONING) for r in (row, *iso)]
            value = percent_gap(*map(statistics.fmean, seeds))
            gap = "—" if math.isnan(value) else f"{value:.0f}%"
            if _within_noise(*seeds[1:]):
                gap = "— (no gap)"  # a share of a baseline gap that the seeds cannot tell from zero means nothing
        more = table.more_loops.get(row)
        above = _above(distances.get(row, []))
        cells = [_name(table, row, stale), units, str(len(row_values(entry, row, "wiki_ppl"))),
                 _cell(row_values(entry, row, "wiki_ppl"), 2), *[_cell(row_values(entry, row, k)) for k in REASONING],
                 _cell(row_values(entry, row, REASONING)), above, gap,
                 *[_cell(row_values(entry, row, k)) for k in HARDER],
                 _cell(row_values(entry, row, HARDER)),
                 f"{_cell(row_values(entry, row, tuple(f'{k}@{more}' for k in HARDER)))} ({more} loops)"
                 if more else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    base = "8x1"
    claims = []
    for row in rows:
        if row.startswith("reg_") and row_values(entry, base, "wiki_ppl"):
            claims.append(f"- {table.label(row)} vs Base (8⊗1): perplexity "
                          f"{_z(row_values(entry, row, 'wiki_ppl'), row_values(entry, base, 'wiki_ppl'))}, "
                          f"reasoning {_z(row_values(entry, row, REASONING), row_values(entry, base, REASONING))}, "
                          f"harder {_z(row_values(entry, row, HARDER), row_values(entry, base, HARDER))}")
    if claims:
        lines += ["Differences to the iso-FLOP baseline (regularized − base, in the pooled seed standard deviation):",
                  "", *claims, ""]
    lines += _scaling_lines(entry, table)
    return lines


def scaling_fits(entry: dict, table: ReproTable) -> dict[str, Any]:
    """``Acc = α·ln D + β`` (accuracy in points) over the looped (2⊗L) rows trained at L = 1..4 and over the
    RandomLoops model evaluated at loops 1–8, on the in-distribution and the harder reasoning means."""
    from loopreg.evals.scaling import fit_log_depth

    fits: dict[str, Any] = {}
    family = [row for row in ("2x1", "2x2", "2x3", "2x4") if row_values(entry, row, REASONING)]
    for name, keys in (("reasoning", REASONING), ("harder", HARDER)):
        points = [(LoopSpec.parse(row).flops_units, value) for row in family for value in row_values(entry, row, keys)]
        if len({depth for depth, _ in points}) >= 2:
            fits[f"(2⊗L) trained at L, {name}"] = (points, fit_log_depth(*zip(*points)))
        seeds = sweep_points(entry, table, "2x4_random", keys)
        points = [point for seed in seeds for point in seed]
        if len({depth for depth, _ in points}) >= 2:
            fits[f"RandomLoops (2⊗L) at L = 1–8, {name}"] = (points, fit_log_depth(*zip(*points)))
            # the same slope with each seed's own level removed: seeds differ in level more than in slope
            grand = statistics.fmean(value for _, value in points)
            centred = [(depth, value - statistics.fmean(v for _, v in seed) + grand)
                       for seed in seeds for depth, value in seed]
            fits[f"RandomLoops (2⊗L) at L = 1–8, {name}, within seed"] = (centred, fit_log_depth(*zip(*centred)))
    return fits


def sweep_points(entry: dict, table: ReproTable, row: str, keys: tuple[str, ...]) -> list[list[tuple[int, float]]]:
    """Per seed of ``row``, (effective depth, mean of ``keys``) at each loop count of its ``loop_sweep``."""
    spec, sweep = _spec(table, row), table.loop_sweep.get(row, ())
    return [[(spec.with_loops(loops).effective_depth,
              statistics.fmean(result["scores"][f"{key}@{loops}"] for key in keys)) for loops in sweep]
            for result in entry["rows"]
            if result["row"] == row and all(f"{key}@{loops}" in result["scores"] for key in keys for loops in sweep)]


def _scaling_lines(entry: dict, table: ReproTable) -> list[str]:
    fits = scaling_fits(entry, table)
    if not fits:
        return []
    lines = ["Depth scaling law `Acc = α·ln D + β` (D = layer applications, accuracy in points, every seed a point):",
             "", "| fit | α | β | R² | n |", "|---|---|---|---|---|"]
    for name, (_, fit) in fits.items():
        r2 = "—" if fit.r2 is None else f"{fit.r2:.2f}"
        lines.append(f"| {name} | {fit.alpha:.2f} | {fit.beta:.1f} | {r2} | {fit.n} |")
    return [*lines, ""]


def plot_lm_mini(entry: dict, table: ReproTable, path: Path) -> Path:
    """Reasoning (in distribution) against held-out perplexity (seed means ± stderr) beside the non-looped
    baselines' frontier, as ``loopreg report --frontier`` draws it; a second panel the scaling fits."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from loopreg.evals.frontier import draw_frontier
    from loopreg.evals.report import frontier_points

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    frontier_axis, scaling_axis = figure.subplots(1, 2)
    draw_frontier(frontier_axis, frontier_points(lm_mini_eval_results(entry, table), {}, "reasoning"),
                  "reasoning accuracy, in distribution (%)")
    for index, (name, (points, fit)) in enumerate(scaling_fits(entry, table).items()):
        depths, scores = zip(*points)
        scaling_axis.scatter(depths, scores, color=f"C{index}", s=12)
        grid = np.geomspace(min(depths), max(depths), 50)
        scaling_axis.plot(grid, fit.predict(grid), color=f"C{index}",
                          label=f"{name}: α={fit.alpha:.1f}, β={fit.beta:.1f}, {fit.r2_label}")
    scaling_axis.set_xscale("log")
    scaling_axis.set_xlabel("effective depth D (log scale)")
    scaling_axis.set_ylabel("accuracy (%)")
    scaling_axis.legend(fontsize="xx-small")
    figure.savefig(path, dpi=110)
    return path


def best_seed(entry: dict, row: str, columns: Sequence[str]) -> str:
    """The seed of ``row`` with the highest mean over ``columns``, as ``a / b / c (seed s)``: the paper reports
    the best of three seeds on its synthetic tables (it asks what a model can express, not how reliably it
    trains).

    Example: ``best_seed(entry, "1x12", ("n2", "n3", "n4")) == "94.0 / 93.6 / 79.6 (seed 17)"``
    """
    results = [r for r in entry["rows"] if r["row"] == row and all(c in r["scores"] for c in columns)]
    best = max(results, key=lambda r: statistics.fmean(r["scores"][c] for c in columns))
    return " / ".join(f"{best['scores'][c]:.1f}" for c in columns) + f" (seed {best['seed']})"


def _paper_markdown(entry: dict, table: ReproTable, stale: set[str]) -> list[str]:
    columns = entry.get("columns", table.columns)  # an earlier setting keeps the columns it was scored on
    # the best seed says something only where a row has more than one (else it repeats the mean)
    several_seeds = any(len(row_values(entry, row, columns[0])) > 1 for row in table.rows)
    header = ["Model", "Params/FLOPs", "seeds", *[f"ours {c}" for c in columns],
              *["ours, best seed"] * several_seeds, *[f"paper {c}" for c in table.paper_columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        values = [row_values(entry, row, column) for column in columns]
        if not values[0]:
            continue
        cells = [_name(table, row, stale), LoopSpec.parse(row).units_label.replace(" ", ""), str(len(values[0])),
                 *[_cell(v) for v in values], *[best_seed(entry, row, columns)] * several_seeds,
                 *[f"{s:.1f}" for s in table.paper_rows[row]]]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _setting(name: str, entry: dict, table: ReproTable, stale: set[str], doc: Path | None = None) -> list[str]:
    """One setting of a table below its heading, ``entry`` holding the rows on show (:func:`shown_rows`): their
    table (lm_mini's own, else the paper's; with ``doc``, the lm_mini plot beside it), the note on stale rows and
    the discussion."""
    if name == "lm_mini":
        lines = _lm_mini_markdown(entry, table, stale)
        if doc is not None:
            plot = plot_lm_mini(entry, table, doc.with_name("lm_mini.png"))
            lines += [f"![reasoning against perplexity; scaling fits]({plot.name})", ""]
    else:
        lines = _paper_markdown(entry, table, stale)
    lines += _stale_note(table, stale)
    return lines + ([entry["discussion"], ""] if entry.get("discussion") else [])


def _current_heading(table: ReproTable, entry: dict) -> list[str]:
    """What and when a table's current setting measured, and its command."""
    minutes = sum(row["seconds"] for row in entry["rows"]) / 60
    seeds = sorted({row["seed"] for row in entry["rows"]})
    return [f"CPU-mini: {table.note}; {entry['steps']} steps per model. Seed{'s' * (len(seeds) > 1)} "
            f"{', '.join(map(str, seeds))}; "
            f"{minutes:.0f} min of training in all (one thread a run). Measured {entry.get('date', '—')}.", "",
            f"Command: `{entry['command']}`", ""]


def _earlier_heading(earlier: dict) -> list[str]:
    return [f"### {earlier['title']}", "", f"Command: `{earlier['command']}`, {earlier['steps']} steps; "
            f"measured {earlier.get('date', '—')}.", ""]


def render_markdown(results: dict, doc: Path | None = None) -> str:
    """``docs/REPRODUCTION.md``: every table of ``results`` (mean ± std over seeds, dated, with its command)
    and its discussion; with ``doc``, the lm_mini plot is written beside it."""
    lines = ["# Reproduction of the paper's tables at CPU-mini scale", "",
             "Written by `loopreg reproduce` from its results file; every number below comes from it "
             "(`docs/reproduction_results.json`). Mean ± standard deviation over seeds.", ""]
    for name, table in TABLES.items():
        entry = results.get("tasks", {}).get(name)
        if not entry or not (entry["rows"] or entry.get("earlier")):
            continue
        lines += [f"## {table.title}", ""]
        if not entry["rows"]:  # re-run in a new setting, no result yet: the settings measured before still show
            lines += [f"Command: `{entry['command']}`: being run, no result yet.", ""]
        else:
            shown, stale = shown_rows(entry, table)
            lines += _current_heading(table, shown) + _setting(name, shown, table, stale, doc)
        for earlier in entry.get("earlier", []):  # a setting the table was measured in before, kept as evidence
            shown, stale = shown_rows(earlier, table)
            lines += _earlier_heading(earlier) + _setting(name, shown, table, stale)
    if results.get("discussion"):
        lines += ["## Discussion", "", results["discussion"], ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- running
def _as_earlier(entry: dict) -> dict:
    """A table's entry as an earlier setting (its ``earlier`` list aside): kept as evidence when the table is run
    in another setting, titled by its budget and overrides."""
    setting = ", ".join([f"{entry['steps']} steps", *entry.get("overrides", [])])
    return {"title": f"Earlier setting ({entry.get('date', '—')}): {setting}",
            **{key: value for key, value in entry.items() if key != "earlier"}}


def _record(saved: Path, name: str, steps: int, overrides: list[str], result: dict | None = None) -> dict:
    """Read ``OUT/results.json``, start (or keep) table ``name``'s entry, add ``result``, write it back.

    Each table keeps its own steps and overrides, so tables run with different budgets merge into one
    file, and a table's results are kept while both match (resume); run in another setting, the table's
    results so far move to its ``earlier`` list (shown below the new ones), so none is lost. The
    read-modify-write happens under an exclusive ``flock``, so processes that run different ``--rows`` of a
    table into the same ``--out`` merge their results instead of overwriting each other's.
    """
    table = TABLES[name]
    with open(saved.with_name(saved.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        entry = results.setdefault("tasks", {}).get(name, {})
        if entry.get("steps") != steps or entry.get("overrides") != overrides:  # a new setting
            earlier = [_as_earlier(entry)] if entry.get("rows") else []  # the one measured so far stays, below it
            earlier += entry.get("earlier", [])
            entry = {"steps": steps, "overrides": overrides, "rows": [], **({"earlier": earlier} if earlier else {})}
        entry["command"] = " ".join(["loopreg reproduce", f"--tables {name} --steps {steps}", *overrides])
        if result is not None:
            entry["rows"] = [old for old in entry["rows"]
                             if (old["row"], old["seed"]) != (result["row"], result["seed"])] + [result]
            order = {row: index for index, row in enumerate(table.rows)}  # a row another version added: last
            entry["rows"].sort(key=lambda item: (order.get(item["row"], len(order)), item["seed"]))
            entry["date"] = datetime.date.today().isoformat()
        results["tasks"][name] = entry
        staging = saved.with_name(saved.name + ".tmp")
        staging.write_text(json.dumps(results, indent=2) + "\n")
        staging.replace(saved)  # a stop mid-write never leaves a truncated file
    return results


def reproduce(out: Path, tables: list[str], seeds: int, steps: int | None, overrides: list[str], doc: Path | None,
              only: list[str] | None = None) -> dict:
    """Train every row of ``tables`` (or the rows in ``only``) at seeds ``SEED .. SEED+seeds-1`` that
    ``OUT/results.json`` does not hold yet, for ``steps`` steps (None: each table's own budget); write the
    markdown report to ``doc``.

    >>> reproduce(Path("runs/repro"), ["phop"], 3, None, [], Path("docs/REPRODUCTION.md"))  # doctest: +SKIP
    """
    from rich.console import Console

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    for name in tables:
        table = TABLES[name]
        budget = steps or table.steps
        current = {row: row_fingerprint(table, row, overrides) for row in table.rows}
        done = {(r["row"], r["seed"]) for r in _record(saved, name, budget, overrides)["tasks"][name]["rows"]
                if r.get("recipe") == current[r["row"]]}
        for seed in range(SEED, SEED + seeds):
            for row in table.rows:
                if (row, seed) in done or (only is not None and row not in only):
                    continue
                console.print(f"[bold]{name}[/bold] {table.label(row)}, seed {seed} ({budget} steps)")
                result = train_row(table, row, seed, budget, overrides, current[row])
                _record(saved, name, budget, overrides, result)  # progress survives a stop
                console.print(f"  {result['scores']} in {result['seconds']:.0f}s")
    results = json.loads(saved.read_text())
    if "lm_mini" in tables:
        from loopreg.evals.report import write_results

        for result in lm_mini_eval_results(results["tasks"]["lm_mini"], TABLES["lm_mini"]):
            slug = "".join(c if c.isalnum() else "_" for c in result.info.name).strip("_")
            write_results(out / "lm_mini" / f"{slug}.json", result)
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render_markdown(results, doc))
        console.print(f"wrote {doc}")
    return results


def split_rows(text: str) -> list[str]:
    """The rows of a ``--rows`` list: a comma inside parentheses belongs to a spec, not to the list.

    >>> split_rows("8x1, 2x(1,2,1),reg_4x2_l10")
    ['8x1', '2x(1,2,1)', 'reg_4x2_l10']
    """
    return [row.strip() for row in re.split(r",(?![^()]*\))", text) if row.strip()]


def cli_main(argv: list[str]) -> int:
    from loopreg.errors import ArgumentParser

    parser = ArgumentParser(prog="loopreg reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--tables", default=",".join(TABLES),
                        help=f"comma-separated: {', '.join(TABLES)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help=f"seeds per row, {SEED} on (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="training steps per model (default: each table's own: "
                        + ", ".join(f"{name} {table.steps}" for name, table in TABLES.items()) + ")")
    parser.add_argument("--doc", type=Path, default=Path("docs/REPRODUCTION.md"), help="markdown report path")
    parser.add_argument("--rows", help="comma-separated rows to run (default: every row), e.g. to split a "
                        "table over processes that share one --out")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every row")
    args = parser.parse_args(argv)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in tables if t not in TABLES]
    if unknown or not tables:
        raise UserError(f"unknown table(s) {unknown}; choose from {', '.join(TABLES)}", key="--tables")
    if args.seeds < 1:
        raise UserError(f"must be >= 1, got {args.seeds}", key="--seeds")
    rows = None if args.rows is None else split_rows(args.rows)
    known = {row for name in tables for row in TABLES[name].rows}
    if rows is not None and (not rows or set(rows) - known):
        raise UserError(f"{sorted(set(rows) - known) or rows} not a row of {', '.join(tables)}; choose from "
                        f"{', '.join(sorted(known))}", key="--rows")
    reproduce(args.out, tables, args.seeds, args.steps, args.overrides, args.doc, rows)
    return 0
