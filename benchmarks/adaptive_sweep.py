"""Accuracy against thinking iterations under adaptive exit (issue #17), on this CPU, in one command.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/adaptive_sweep.py                 # both models, ~10 min
    .venv/bin/python benchmarks/adaptive_sweep.py --only phop --phop-limit 200      # a quick look

For each model: the fixed maximum (no exit rule), ``kl`` and ``latent`` thresholds, and the ``shared`` KV policy at
the fixed maximum; one ``loopreg.eval/1`` results file per run under ``--out`` (through the harness that
``loopreg eval --exit`` runs), then ``loopreg report --compute``'s table (markdown + JSON) and plot, the best
threshold that meets the target (>= 30% fewer thinking iterations at <= 1 point lost) and the KV memory ratio.

* ``phop``: ``cpu_phop_random_loops`` (1⊗8, RandomLoops 2..8), scored on the p-hop task and test split it was
  trained on (its recipe's knobs; the recipe's own eval set, seed + 1); the answer is the greedy token after the
  sequence, i.e. the model's prediction at the last position.
* ``smol``: the healed SmolLM2 retrofit ``heal_keepall`` (12x1+6x2+12x1: at most 2 thinking iterations) on the
  reasoning primitives, ``--smol-limit`` examples per task.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loopreg.config import load_recipe
from loopreg.evals import LoopregLM, evaluate, load_groups, load_model
from loopreg.evals.catalog import TASK_DIR
from loopreg.evals.report import compute_report, load_results, to_json, to_markdown, write_results
from loopreg.evals.run import resolve_tasks

REPO = Path(__file__).resolve().parents[1]
MAIN = Path("/work/main")  # where the lead trains and heals the models
PHOP_RULES = ("kl:0.0001", "kl:0.001", "kl:0.01", "kl:0.05", "kl:0.1",
              "latent:0.01", "latent:0.05", "latent:0.1", "latent:0.2", "latent:0.3", "latent:0.5")
# the retrofit's 2 iterations barely exit below kl 0.1 / latent 0.2 (a trial at --smol-limit 2), and each of its
# runs costs minutes on a shared 2-core CPU: the thresholds where exits happen
SMOL_RULES = ("kl:0.1", "kl:0.5", "kl:1", "latent:0.3", "latent:0.5")
BATCH1_LIMIT = 200  # examples per task of the batch-size-1 rerun of the best rule (one generate call each)


def phop_task(recipe_path: Path, folder: Path) -> list[str]:
    """The p-hop task exactly as the recipe trains and evaluates it, as an lm-eval task in ``folder`` (beside a link
    to the task folder's utils.py, which its YAML names); returns its name."""
    recipe = load_recipe(recipe_path)
    knobs = {**recipe.train_data.task_kwargs, **recipe.eval_data.task_kwargs}
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "utils.py").exists():
        (folder / "utils.py").symlink_to(TASK_DIR / "utils.py")
    generator = {"task": recipe.train_data.task, "split": "test", "n": recipe.eval_data.eval_size,
                 "seed": recipe.seed + 1, "knobs": knobs}
    (folder / "phop_train_task.yaml").write_text(f"""include: {TASK_DIR / '_loopreg_task.yaml'}
task: phop_train_task
dataset_kwargs:
  {{name: phop_train_task, template: "{{question}}", answer_prefix: "", generator: {json.dumps(generator)}}}
generation_kwargs: {{until: [], max_gen_toks: 1, do_sample: false}}
process_results: !function utils.process_exact
""")
    return ["phop_train_task"]


def kv_bytes(model: torch.nn.Module, ids: torch.Tensor, kv_policy: str) -> int:
    """Bytes of the keys and values one cached forward of ``ids`` stores under ``kv_policy``."""
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True, kv_policy=kv_policy).past_key_values
        layers = getattr(cache, "layers", None)
        pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else \
            list(zip(cache.key_cache, cache.value_cache))
        return sum(k.nbytes + v.nbytes for k, v in pairs)


def sweep(label: str, source: Path, tasks: list[str], limit: int | None, batch_size: int, out: Path,
          rules: tuple[str, ...], loops: int | None = None, include: Path | None = None) -> dict:
    """Every run of one model; returns its summary (the report rows, KV memory, wall times)."""
    model, tokenizer = load_model(source)
    include_path = [str(include)] if include else []
    folder = out / label
    runs = [(None, "per_application"), (None, "shared"), *((rule, "per_application") for rule in rules)]
    seconds = {}

    def run(rule: str | None, kv_policy: str, folder: Path, batch_size: int, limit: int | None = limit) -> dict:
        lm = LoopregLM(model, loops=loops, tokenizer=tokenizer, exit=rule, kv_policy=kv_policy,
                       name=source.parent.name, batch_size=batch_size)  # the run's folder, not "model"
        name = f"{rule or 'fixed'}_{kv_policy}".replace(":", "_")
        start = time.perf_counter()
        results = evaluate(lm, tasks, limit=limit, include_path=include_path, progress=None, bootstrap_iters=0)
        write_results(folder / f"{name}.json", results)
        seconds[f"{lm.info.label} (batch {batch_size})"] = round(time.perf_counter() - start, 1)
        print(f"{label}: {lm.info.label} at batch size {batch_size} done in {time.perf_counter() - start:.1f} s",
              flush=True)
        return results.to_json()

    for rule, kv_policy in runs:
        run(rule, kv_policy, folder, batch_size)
    table = compute_report(load_results([folder]), png=out / f"{label}_acc_vs_loops.png")
    (out / f"{label}_compute.md").write_text(to_markdown(table), encoding="utf-8")
    exported = to_json(table)
    names, manager = resolve_tasks(tasks[:1], include_path)
    first = next(iter(manager.load(names)["tasks"].values()))
    prompt = torch.tensor([tokenizer(first.doc_to_text(next(iter(first.test_docs()))))["input_ids"]])
    per_app, shared = (kv_bytes(model, prompt, policy) for policy in ("per_application", "shared"))
    mean_rows = [row for row in exported["rows"] if row["values"]["Task"].startswith("mean")] or exported["rows"]
    meeting = [row["values"] for row in mean_rows if row["values"]["Target"]]
    best = max(meeting, key=lambda row: row["Fewer"], default=None)
    alone = None
    if best is not None and batch_size > 1:  # the batch waits for its slowest token; alone, a row waits for its own
        alone_limit = min(limit or BATCH1_LIMIT, BATCH1_LIMIT)
        tasks = run(best["Exit"], "per_application", folder / "batch1", 1, alone_limit)["tasks"]
        alone = {task: {key: entry[key] for key in ("score", "mean_loops", "executed_loops")}
                 for task, entry in tasks.items()}
        print(f"{label}: {best['Exit']} at batch size 1: {alone}")
    summary = {"model": str(source), "loops": loops, "limit": limit, "batch_size": batch_size, "table": exported,
               "seconds": seconds,
               "kv_bytes": {"per_application": per_app, "shared": shared, "ratio": shared / per_app},
               "best_meeting_target": best, "best_at_batch_size_1": alone}
    print(to_markdown(table))
    print(f"{label}: KV memory shared / per_application = {shared} / {per_app} bytes = {shared / per_app:.3f}")
    print(f"{label}: best threshold meeting the target: {best['Exit'] if best else 'none'}", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phop", type=Path, default=MAIN / "runs/cpu_phop_random_loops/model")
    parser.add_argument("--phop-recipe", type=Path, default=REPO / "recipes/cpu_phop_random_loops.yaml")
    parser.add_argument("--phop-limit", type=int, default=None, help="p-hop examples (default: the recipe's 1000)")
    parser.add_argument("--smol", type=Path, default=MAIN / "runs/heal_keepall/model")
    parser.add_argument("--smol-limit", type=int, default=10, help="examples per reasoning-primitives task")
    parser.add_argument("--smol-loops", type=int, default=None, help="max thinking iterations (default: the spec's)")
    parser.add_argument("--only", choices=("phop", "smol"), default=None)
    parser.add_argument("--out", type=Path, default=REPO / "runs/adaptive")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads()}
    if args.only in (None, "phop"):
        include = args.out / "phop_task"
        summary["phop"] = sweep("phop", args.phop, phop_task(args.phop_recipe, include), args.phop_limit, 250,
                                args.out, PHOP_RULES, include=include)
    if args.only in (None, "smol"):
        tasks = list(load_groups()["reasoning_primitives"].tasks)
        summary["smol"] = sweep("smol", args.smol, tasks, args.smol_limit, 10, args.out, SMOL_RULES, args.smol_loops)
    path = args.out / f"sweep_{args.only or 'all'}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
