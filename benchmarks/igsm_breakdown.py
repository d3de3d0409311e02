"""Where CPU-mini i-GSM models succeed: exact match split by what the query needs (docs/REPRODUCTION.md).

    OMP_NUM_THREADS=1 python benchmarks/igsm_breakdown.py runs/repro_igsm_8x1/model runs/repro_igsm_1x1/model

Scores each exported model (a ``LoopedLM`` folder from ``loopreg reproduce`` / ``loopreg train``) on one eval
variant of the recipe (``recipes/cpu_igsm.yaml``, ``--variant``, default ``ops4``: the same 500 problems the
run scored at seed 17) and splits the answer exact match two ways: by the query's operand count (1 = the query
copies one parameter's value; 2 = it is a mod-7 sum or difference of two) and by its dependency depth (longest
chain down to a constant). Accuracy should fall with depth.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from loopreg.config import load_recipe
from loopreg.data.synthetic import build_task
from loopreg.data.tasks import FixedSet, TaskData, pad_collate
from loopreg.model import LoopedLM

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cpu_igsm.yaml"
NAME = r"[A-Z]#[A-Z]"


def query_structure(prompt: str) -> tuple[int, int]:
    """(operand count of the query's statement, dependency depth of the query), read from the prompt."""
    statements = {name: re.findall(NAME, expr) for name, expr in re.findall(rf"({NAME}) := ([^.]*)\.", prompt)}
    query = prompt.split()[-1].rstrip("?")

    def depth(name: str) -> int:
        return 1 + max(map(depth, statements[name])) if statements[name] else 0

    return len(statements[query]), depth(query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="exported i-GSM model folders")
    parser.add_argument("--variant", default="ops4", help="eval variant of the recipe to score (default: ops4)")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    if args.variant not in recipe.eval_data.eval_variants:
        parser.error(f"--variant {args.variant!r} is not an eval variant of {RECIPE.name} "
                     f"({', '.join(recipe.eval_data.eval_variants)})")
    knobs = {**recipe.train_data.task_kwargs, **recipe.eval_data.task_kwargs,
             **recipe.eval_data.eval_variants[args.variant]}
    data = TaskData(build_task("igsm", **knobs))
    eval_set = FixedSet(data, recipe.eval_data.eval_size, seed=recipe.seed + 1)  # exactly the training eval set
    groups = [(f"{operands} operand{'s' * (operands > 1)}", f"depth {depth}")
              for operands, depth in map(query_structure, (e.prompt for e in eval_set.examples))]
    labels = sorted({label for pair in groups for label in pair})
    counts = {label: sum(label in pair for pair in groups) for label in labels}
    table = Table(title=f"CPU-mini i-GSM ({args.variant}): answer exact match (%) by what the query needs")
    for column in ["model", "all", *[f"{label} (n={counts[label]})" for label in labels]]:
        table.add_column(column)
    batch = pad_collate(eval_set.items, data.pad_id)
    for folder in args.models:
        model = LoopedLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(batch["input_ids"]).logits
        right = ((logits.argmax(-1) == batch["labels"]) | ~batch["answer_mask"]).all(-1).tolist()
        by_label = defaultdict(list)
        for pair, ok in zip(groups, right):
            for label in pair:
                by_label[label].append(ok)
        cells = [f"{100 * sum(by_label[label]) / len(by_label[label]):.1f}" for label in labels]
        table.add_row(model.spec.paper_label, f"{100 * sum(right) / len(right):.1f}", *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
