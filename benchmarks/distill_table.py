"""CoT-to-latent distillation result table (README): CoT teacher vs looped students, same budget each.

    OMP_NUM_THREADS=1 python benchmarks/distill_table.py --out runs/distill

Trains the CoT teacher (``recipes/distill/cpu_sum_teacher.yaml``), then every student variant of
``recipes/distill/cpu_sum_student.yaml`` with the same steps and batch (the recipe's, or ``--steps``), and
evaluates each by greedy generation on the same held-out problems: accuracy and generated tokens per
answer (the teacher writes its chain of thought, students only the answer). The distilled student is
also run with more loops than it was trained with. Rows already in ``OUT/results.json`` are kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from loopreg.config import load_recipe
from loopreg.data.paired import PairedData, Problem
from loopreg.model import LoopedLM

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "distill"
NO_TEACHER = ["algorithms.cot_distillation.teacher=null", "algorithms.cot_distillation.weights.hidden=0.0",
              "algorithms.cot_distillation.weights.kl=0.0"]
ALL_LATENT = ["algorithms.cot_distillation.curriculum.every=null", "algorithms.cot_distillation.curriculum.start=99",
              "algorithms.cot_distillation.curriculum.smoothing=0",
              "algorithms.cot_distillation.curriculum.mix_prob=0.0"]
STUDENTS: dict[str, list[str]] = {
    "CoTDistillation": [],
    "answer-only (plain loops)": [*NO_TEACHER, *ALL_LATENT, "model.latent_feedback=residual", "model.latent_mask=false",
                                     "algorithms.cot_distillation.weights.cot=0.0",
                                     "algorithms.cot_distillation.weights.step=0.0"],
    "  − step CE": ["algorithms.cot_distillation.weights.step=0.0"],
    "  − soft-token feedback (residual)": ["model.latent_feedback=residual"],
    "  − latent mask": ["model.latent_mask=false"],
    "  − curriculum (all latent from step 0)": ALL_LATENT,
    "  − teacher (hidden, KL)": NO_TEACHER,
}
EXTRA_LOOPS = (8, 10)


def train(recipe: Path, folder: Path, overrides: list[str]) -> float:
    from composer.utils import reproducibility

    from loopreg.train import build_trainer

    config = load_recipe(recipe, [f"export_folder={folder}", "eval_interval=100000ba", *overrides])
    reproducibility.seed_all(config.seed)
    start = time.perf_counter()
    trainer = build_trainer(config)
    trainer.fit()
    trainer.close()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: LoopedLM, data: PairedData, problems: list[Problem], latent: bool, per_step: int,
             loops: int | None = None, batch_size: int = 250) -> tuple[float, float]:
    """Accuracy (%) and mean generated tokens up to and including <eos>, by greedy generation."""
    model.eval()
    correct, generated_tokens = 0, 0
    max_new = max(len(data.ids(data.step_separator.join(p.steps) + " #### " + p.answer)) for p in problems) + 2
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [data.prompt_ids(p, latent, per_step) for p in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[data.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=data.eos_id, pad_token_id=data.eos_id, loops=loops)[:, width:].tolist()
        for problem, tokens in zip(chunk, out):
            correct += data.parse_answer(tokens) == problem.answer
            generated_tokens += tokens.index(data.eos_id) + 1 if data.eos_id in tokens else len(tokens)
    return 100.0 * correct / len(problems), generated_tokens / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/distill"))
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of each student (default: the recipe's)")
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--rows", default=None, help="comma-separated student rows to run (default: all); "
                        "run disjoint sets in parallel with different --out and merge the results.json files")
    args = parser.parse_args()
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {"steps": args.steps, "rows": {}}
    if results["steps"] != args.steps:
        results = {"steps": args.steps, "rows": {}}
    student_recipe = load_recipe(RECIPES / "cpu_sum_student.yaml")
    section = student_recipe.train_data
    data = PairedData.from_task(section.task, **section.task_kwargs)
    problems = data.test_set(args.eval_size, seed=student_recipe.seed + 1)
    per_step = student_recipe.model.placeholders_per_step
    steps = [f"max_duration={args.steps}ba"] if args.steps else []
    student_steps = args.steps or int(str(student_recipe.max_duration).removesuffix("ba"))

    def record(name: str, row: dict) -> None:
        results["rows"][name] = row
        saved.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"{name}: {row}")

    teacher_dir = args.out / "teacher"
    if "CoT teacher" not in results["rows"]:
        seconds = train(RECIPES / "cpu_sum_teacher.yaml", teacher_dir, [])
        teacher = LoopedLM.from_pretrained(teacher_dir)
        accuracy, tokens = evaluate(teacher, data, problems, latent=False, per_step=per_step)
        record("CoT teacher", {"spec": teacher.config.spec, "accuracy": accuracy, "tokens": tokens,
                               "seconds": round(seconds)})
    wanted = [name.strip() for name in args.rows.split(",")] if args.rows else None
    for name, overrides in STUDENTS.items():
        if name in results["rows"] or (wanted is not None and name.strip(" −") not in wanted):
            continue
        folder = args.out / name.strip(" −").split(" ")[0].replace("(", "")
        teacher_arg = [f"algorithms.cot_distillation.teacher={teacher_dir}"] if "teacher=null" not in " ".join(
            overrides) else []
        seconds = train(RECIPES / "cpu_sum_student.yaml", folder, [*steps, *teacher_arg, *overrides])
        student = LoopedLM.from_pretrained(folder)
        accuracy, tokens = evaluate(student, data, problems, latent=True, per_step=per_step)
        record(name, {"spec": student.config.spec, "accuracy": accuracy, "tokens": tokens, "seconds": round(seconds)})
        if name == "CoTDistillation":
            for loops in EXTRA_LOOPS:
                accuracy, tokens = evaluate(student, data, problems, latent=True, per_step=per_step, loops=loops)
                record(f"CoTDistillation, run with {loops} loops", {"spec": str(student.spec.with_loops(loops)),
                                                                    "accuracy": accuracy, "tokens": tokens,
                                                                    "seconds": 0})

    teacher_accuracy = results["rows"]["CoT teacher"]["accuracy"]
    table = Table(title=f"CoT → latent distillation, sum mod 10 of 5 digits ({student_steps} steps per student, "
                        f"{len(problems)} test problems)")
    for column in ("Model", "Spec", "Accuracy (%)", "of teacher", "Tokens / answer", "Train s"):
        table.add_column(column, justify="left" if column in ("Model", "Spec") else "right")
    for name, row in results["rows"].items():
        table.add_row(name, row["spec"], f"{row['accuracy']:.1f}", f"{row['accuracy'] / teacher_accuracy:.0%}",
                      f"{row['tokens']:.1f}", str(row["seconds"]))
    console.print(table)


if __name__ == "__main__":
    main()
