"""CPU-mini Table 4: p-hop with a 4-layer model, base ``(4⊗1)`` vs regularized toward ``(1⊗4)`` / ``(2⊗2)``.

    .venv/bin/python benchmarks/regularizer_table.py --out runs/reg_table      # ~30 min on 2 CPU cores

Every "Base"/"Reg" row trains ``recipes/cpu_phop_reg.yaml`` (4 untied layers; λ=0 is the plain (4⊗1)
baseline) and reports held-out accuracy, the final mean block cosine toward the row's looped target,
and the accuracy after snapping the trained model to that target. "Loop" rows train the true looped
model (``recipes/cpu_phop.yaml``) for reference. Prints a markdown table and writes
``OUT/results.json``; each run's block-cosine heatmaps land in ``OUT/<run>/loop_similarity``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loopreg.algorithms import loop_similarity, snap_to_looped
from loopreg.composer_model import ComposerLoopedLM
from loopreg.config import Recipe, load_recipe
from loopreg.model import LoopedLM
from loopreg.train import build_dataloaders, build_trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
REG = ["callbacks.loop_snap=null"]  # snapping is done below, for every target
# (row, run folder, recipe, overrides, block sizes the row is measured toward)
RUNS = [
    ("Base (4⊗1)", "base_4x1", "cpu_phop_reg", [*REG, "algorithms.loop_regularizer.lambda_reg=0"], (1, 2)),
    ("Reg k=1, λ=1", "reg_k1_lambda1", "cpu_phop_reg", [*REG, "algorithms.loop_regularizer.lambda_reg=1"], (1,)),
    ("Reg k=1, λ=10", "reg_k1_lambda10", "cpu_phop_reg", REG, (1,)),
    ("Reg k=2, λ=10", "reg_k2_lambda10", "cpu_phop_reg", [*REG, "model.spec=2x2"], (2,)),
    ("Reg k=2, λ=10, warm-up 1000ba", "reg_k2_lambda10_warmup", "cpu_phop_reg",
     [*REG, "model.spec=2x2", "algorithms.loop_regularizer.schedule=linear_warmup",
      "algorithms.loop_regularizer.t_warmup=1000ba"], (2,)),
    ("Loop (1⊗4)", "loop_1x4", "cpu_phop", ["model.spec=1x4"], ()),
    ("Loop (2⊗2)", "loop_2x2", "cpu_phop", ["model.spec=2x2"], ()),
]


def eval_accuracy(model: LoopedLM, recipe: Recipe) -> float:
    """Held-out exact match (%) of ``model`` on the recipe's eval set."""
    from composer import Trainer

    data = build_dataloaders(recipe, 1, 0)
    trainer = Trainer(model=ComposerLoopedLM(model, extra_eval_metrics=data.eval_metrics),
                      eval_dataloader=data.evaluation, device="cpu", progress_bar=False, log_to_console=False)
    trainer.eval()
    return float(trainer.state.eval_metrics["eval"]["AnswerExactMatch"].compute()) * 100


def run_row(label: str, slug: str, recipe_name: str, overrides: list[str], targets: tuple[int, ...], out: Path,
            steps: int) -> list[dict]:
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml",
                         [*overrides, f"max_duration={steps}ba", f"eval_interval={steps}ba", f"run_name={slug}",
                          f"save_folder={out / slug}", f"save_interval={steps}ba", "save_overwrite=true"])
    started = time.perf_counter()
    trainer = build_trainer(recipe)
    trainer.fit()
    accuracy = float(trainer.state.eval_metrics["eval"]["AnswerExactMatch"].compute()) * 100
    trainer.close()
    model = trainer.state.model.model
    base = {"model": label, "spec": str(model.spec), "tied": model.config.tied, "accuracy": round(accuracy, 1),
            "train_seconds": round(time.perf_counter() - started)}
    if not targets:
        return [{**base, "target": model.spec.paper_label}]
    rows = []
    for block_size in targets:
        snapped = snap_to_looped(model, block_size=block_size)
        rows.append({**base, "target": snapped.spec.paper_label,
                     "mean_cosine": round(loop_similarity(model, block_size=block_size)["mean"], 4),
                     "snapped_accuracy": round(eval_accuracy(snapped, recipe), 1)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| Model | toward | Acc (%) | mean block cosine | Acc after snap (%) |", "|---|---|---|---|---|"]
    for row in rows:
        cosine = f"{row['mean_cosine']:.3f}" if "mean_cosine" in row else "1 (tied)"
        snapped = f"{row['snapped_accuracy']:.1f}" if "snapped_accuracy" in row else "—"
        lines.append(f"| {row['model']} | {row['target']} | {row['accuracy']:.1f} | {cosine} | {snapped} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/reg_table"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: small ops on a shared 2-core machine; see bench_regularizer)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in RUNS:
        new_rows = run_row(*run, args.out, args.steps)
        print("\n".join(markdown(new_rows).splitlines()[2:]), flush=True)
        rows += new_rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
