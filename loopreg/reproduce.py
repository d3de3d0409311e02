"""``loopreg reproduce``: every row of the paper's synthetic tables (Tables 1–2) at CPU-mini scale.

Each row trains the task's CPU-mini recipe (``recipes/cpu_{addition,phop,igsm}.yaml``) with the row's
loop spec, then ``docs/REPRODUCTION.md`` puts our accuracies beside the paper's.

    loopreg reproduce --out runs/repro                  # all three tables, each at its own step budget
    loopreg reproduce --tasks phop --steps 1500         # one table, shorter runs
    loopreg reproduce --tasks igsm --rows 8x1,1x8 &     # split a table over processes: same --out,
    loopreg reproduce --tasks igsm --rows 1x1,1x2 &     # rows merge into one results.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path

from loopreg.config import load_recipe
from loopreg.errors import UserError
from loopreg.spec import LoopSpec

__all__ = ["TABLES", "reproduce", "cli_main"]

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclass(frozen=True)
class PaperTable:
    """One synthetic table: its CPU-mini recipe, our eval columns and the paper's rows."""

    title: str
    recipe: str
    mini_columns: tuple[str, ...]  # our Composer evaluator labels
    paper_columns: tuple[str, ...]
    paper_rows: dict[str, tuple[float, ...]]  # spec -> the paper's accuracies (%)
    mini_note: str
    steps: int  # the CPU-mini training budget per row (``--steps`` overrides it)


TABLES: dict[str, PaperTable] = {
    "addition": PaperTable(
        "n-ary addition (Table 1, left)", "cpu_addition.yaml", ("n2", "n3", "n4"),
        ("n=8", "n=16", "n=24", "n=32"),
        {"12x1": (100.0, 100.0, 100.0, 100.0), "1x1": (0.1, 0.1, 0.1, 0.0), "1x12": (99.9, 100.0, 99.9, 99.6),
         "2x1": (85.8, 71.5, 49.3, 38.8), "2x6": (100.0, 99.8, 99.7, 99.5), "3x1": (97.2, 78.5, 69.2, 60.7),
         "3x4": (100.0, 99.1, 97.0, 96.6)},
        "four 3-digit operand slots, 1–4 of them real in training (the rest 000), eval on 2, 3 and 4 real operands; "
        "d=64, lr 2e-3; paper: 2–32 operands, d=256, 200k steps", 3000),
    "phop": PaperTable(
        "p-hop induction (Table 1, right)", "cpu_phop.yaml", ("eval",), ("p=16", "p=32"),
        {"6x1": (99.9, 99.6), "1x1": (48.9, 49.0), "1x6": (99.9, 99.5), "2x1": (68.8, 59.4), "2x3": (99.9, 99.8),
         "3x1": (97.2, 73.0), "3x2": (99.9, 99.5)},
        "|Σ|=4, n=32, p=2, a label at every position; d=64; paper: n=256, p=16/32, d=128, 200k steps", 2000),
    "igsm": PaperTable(
        "symbolic i-GSM (Table 2)", "cpu_igsm.yaml", ("eval",), ("accuracy",),
        {"8x1": (73.2,), "1x1": (24.5,), "1x2": (52.3,), "1x4": (69.9,), "1x8": (73.2,), "2x1": (54.0,),
         "2x2": (66.9,), "2x4": (73.6,), "4x1": (71.3,), "4x2": (71.6,)},
        "3 needed parameters, 1 distractor, ≤ 2 operands, depth ≤ 2, mod 7; d=64; paper: larger graphs, d=128, "
        "200k steps", 2000),
}


def _row_label(spec: LoopSpec) -> str:
    return f"{'Loop' if spec.is_looped else 'Base'} {spec.paper_label}"


def train_row(table: PaperTable, spec: str, steps: int, overrides: list[str]) -> dict:
    """Train one table row; returns its accuracies per eval column (in %)."""
    from composer.utils import reproducibility

    from loopreg.train import build_trainer

    run_name = f"repro_{Path(table.recipe).stem.removeprefix('cpu_')}_{spec}"  # e.g. repro_igsm_1x4: one per row
    recipe = load_recipe(RECIPES / table.recipe, [f"model.spec={spec}", f"run_name={run_name}",
                                                  f"max_duration={steps}ba", f"eval_interval={steps}ba", *overrides])
    reproducibility.seed_all(recipe.seed)
    start = time.perf_counter()
    trainer = build_trainer(recipe)
    trainer.fit()
    scores = {label: round(float(metrics["AnswerExactMatch"].compute()) * 100, 1)
              for label, metrics in trainer.state.eval_metrics.items()}
    trainer.close()
    return {"spec": spec, "scores": [scores[c] for c in table.mini_columns],
            "seconds": round(time.perf_counter() - start, 1)}


def render_markdown(results: dict) -> str:
    """``docs/REPRODUCTION.md``: our CPU-mini accuracies beside the paper's, one table per task."""
    minutes = sum(row["seconds"] for task in results["tasks"].values() for row in task["rows"]) / 60
    lines = ["# Reproduction of the paper's synthetic tables at CPU-mini scale", "",
             f"Seed {results['seed']}; per-row training times (wall clock, one thread per run, runs sharing the "
             f"machine's cores) sum to {minutes:.0f} min.", ""]
    for name in TABLES:
        if name not in results["tasks"]:
            continue
        task, table = results["tasks"][name], TABLES[name]
        steps = task.get("steps", results.get("steps"))
        command = task.get("command", results.get("command"))
        lines += [f"## {table.title}", "", f"CPU-mini: {table.mini_note}; {steps} steps per model.", "",
                  f"Command: `{command}`", ""]
        header = ["Model", "Params/FLOPs", *[f"ours {c}" for c in table.mini_columns],
                  *[f"paper {c}" for c in table.paper_columns]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in task["rows"]:
            spec = LoopSpec.parse(row["spec"])
            cells = [_row_label(spec), spec.units_label.replace(" ", ""), *[f"{s:.1f}" for s in row["scores"]],
                     *[f"{s:.1f}" for s in table.paper_rows[row["spec"]]]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Discussion", "", results.get("discussion", "(add the discussion after reading the numbers)"), ""]
    return "\n".join(lines)


def _record(saved: Path, name: str, steps: int, overrides: list[str], row: dict | None = None) -> dict:
    """Read ``OUT/results.json``, start (or keep) table ``name``'s entry, add ``row``, write it back.

    Each table keeps its own steps and overrides, so tables run with different budgets merge into one
    file, and a table's rows are kept while both match (resume). The read-modify-write happens under
    an exclusive ``flock``, so processes that run different ``--rows`` of a table into the same
    ``--out`` merge their rows instead of overwriting each other's.
    """
    table = TABLES[name]
    with open(saved.with_name(saved.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        results["seed"] = load_recipe(RECIPES / table.recipe).seed
        entry = results.setdefault("tasks", {}).get(name, {})
        if entry.get("steps") != steps or entry.get("overrides") != overrides:
            entry = {"steps": steps, "overrides": overrides, "rows": []}
        entry["command"] = " ".join(["loopreg reproduce", f"--tasks {name} --steps {steps}", *overrides])
        if row is not None:
            entry["rows"] = [old for old in entry["rows"] if old["spec"] != row["spec"]] + [row]
            entry["rows"].sort(key=lambda item: list(table.paper_rows).index(item["spec"]))
        results["tasks"][name] = entry
        staging = saved.with_name(saved.name + ".tmp")
        staging.write_text(json.dumps(results, indent=2) + "\n")
        staging.replace(saved)  # a stop mid-write never leaves a truncated file
    return results


def reproduce(out: Path, tasks: list[str], steps: int | None, overrides: list[str], doc: Path | None,
              only: list[str] | None = None) -> dict:
    """Train every row of ``tasks`` (or the specs in ``only``) not yet in ``OUT/results.json``, for ``steps``
    steps (None: each table's own budget); write the markdown report to ``doc``.

    >>> reproduce(Path("runs/repro"), ["phop"], None, [], Path("docs/REPRODUCTION.md"))  # doctest: +SKIP
    """
    from rich.console import Console

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    for name in tasks:
        table = TABLES[name]
        budget = steps or table.steps
        done = {row["spec"] for row in _record(saved, name, budget, overrides)["tasks"][name]["rows"]}
        for spec in table.paper_rows:
            if spec in done or (only is not None and spec not in only):
                continue
            console.print(f"[bold]{name}[/bold] {_row_label(LoopSpec.parse(spec))} ({budget} steps)")
            row = train_row(table, spec, budget, overrides)
            _record(saved, name, budget, overrides, row)  # progress survives a stop
            console.print(f"  accuracy {row['scores']} in {row['seconds']:.0f}s")
    results = json.loads(saved.read_text())
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render_markdown(results))
        console.print(f"wrote {doc}")
    return results


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loopreg reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--tasks", default="addition,phop,igsm", help="comma-separated: addition, phop, igsm")
    parser.add_argument("--steps", type=int, help="training steps per model (default: each table's own: "
                        + ", ".join(f"{name} {table.steps}" for name, table in TABLES.items()) + ")")
    parser.add_argument("--doc", type=Path, default=Path("docs/REPRODUCTION.md"), help="markdown report path")
    parser.add_argument("--rows", help="comma-separated loop specs to run (default: every row), e.g. to split a "
                        "table over processes that share one --out")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every row")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TABLES]
    if unknown or not tasks:
        raise UserError(f"unknown task(s) {unknown}; choose from {', '.join(TABLES)}", key="--tasks")
    rows = None if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    known = {spec for name in tasks for spec in TABLES[name].paper_rows}
    if rows is not None and (not rows or set(rows) - known):
        raise UserError(f"{sorted(set(rows) - known) or rows} not a row of {', '.join(tasks)}; choose from "
                        f"{', '.join(sorted(known))}", key="--rows")
    reproduce(args.out, tasks, args.steps, args.overrides, args.doc, rows)
    return 0
