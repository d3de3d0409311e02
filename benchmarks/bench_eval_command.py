"""``loopreg eval`` (on lm-eval) against the harness it replaced, and against plain lm-eval ``hf`` on the unrolled
export of a looped model: the same tasks, every prediction compared, side by side in one run.

    git worktree add /tmp/loopreg-harness 1041c37          # the last commit with the home-made harness
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval_command.py --before /tmp/loopreg-harness \\
        --tasks svamp,triviaqa,squad_v2,primitives_math_d1 --limit 30 --repeats 2

Every side is one command line, run as a subprocess and timed end to end (start-up, model load, lm-eval's task index,
generation, scoring): what a user waits for. Sides alternate order per repeat; a ratio is the median over repeats of
(other side's seconds / ``loopreg eval``'s seconds), so >= 1 means ``loopreg eval`` is as fast or faster.

* ``harness``: SmolLM2-135M-Instruct (the offline GGUF): ``loopreg eval`` of the ``--before`` tree (its own
  harness; predictions from its sidecar) against this tree's ``loopreg eval`` (lm-eval's per-sample log).
* ``tasks``: the same two, per task, the model loaded once in each side's process, so only the evaluation of each
  task is timed (each side is a worker of this script importing its tree).
* ``export``: a looped retrofit (``loopreg surgery GGUF --spec 4x(1,4,1)``, or ``--looped DIR``):
  ``loopreg eval LOOPED`` against ``lm_eval --model hf`` on ``loopreg export --unroll``'s folder, both on the
  ``loopreg_`` tasks; one more side per ``--exit`` rule runs ``loopreg eval LOOPED --exit RULE`` (fewer thinking
  iterations; its predictions may differ, and are counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this folder is on the path when run as a script
from bench_one_model import link_packages
from compare_eval_reference import read_reference, read_samples

ROOT = Path(__file__).resolve().parents[1]
EVALDATA = Path(os.environ.get("LOOPREG_EVALDATA", ROOT.parent / "shared" / "evaldata")).resolve()


def run(command: list[str], tree: Path = ROOT) -> float:
    """Seconds of ``command`` with loopreg imported from ``tree`` (this one: the venv's editable install)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOOPREG_EVALDATA": str(EVALDATA),
           **({} if tree == ROOT else {"PYTHONPATH": str(tree)})}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def loopreg_eval(model: Path, tasks: str, limit: int, batch: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loopreg.cli", "eval", str(model), "--tasks", tasks, "--limit", str(limit),
            "--batch-size", str(batch), "--out", str(out), *extra]


def predictions(side: str, out: Path) -> dict[str, dict[str, str]]:
    """task -> item id -> prediction, from a side's output."""
    found = read_reference(out.with_suffix(".predictions.jsonl")) if side == "harness" else read_samples(out.parent)
    return {task: {item: row["prediction"] for item, row in rows.items()} for task, rows in found.items()}


def worker(side: str, tasks: list[str], limit: int, batch_size: int) -> dict[str, float]:
    """Seconds per task of one side's evaluation, the model loaded once (loopreg imported from the side's tree)."""
    if side == "harness":
        from loopreg.evals import evaluate, load_task_specs, resolve_data_dir
        from loopreg.evals.models import load_generator

        generator, _ = load_generator(smollm2_path())
        run_task = lambda task: evaluate(generator, load_task_specs([task]), resolve_data_dir(), limit,  # noqa: E731
                                         batch_size, progress=False)
    else:
        from loopreg.evals.lm_eval_model import LoopregLM
        from loopreg.evals.run import evaluate

        lm = LoopregLM(str(smollm2_path()), device="cpu", batch_size=batch_size)
        run_task = lambda task: evaluate(lm, [task], limit=limit, progress=None)  # noqa: E731
    seconds = {}
    for task in tasks:
        start = time.perf_counter()
        run_task(task)
        seconds[task] = time.perf_counter() - start
    return seconds


def smollm2_path() -> Path:
    from loopreg.surgery.sources import smollm2_gguf

    return smollm2_gguf()


def compare_tasks(args: argparse.Namespace) -> list[tuple[str, ...]]:
    seconds: dict[str, list[dict[str, float]]] = {"loopreg eval": [], "harness": []}
    for repeat in range(args.repeats):
        for side in (["loopreg eval", "harness"] if repeat % 2 == 0 else ["harness", "loopreg eval"]):
            command = [sys.executable, __file__, "--worker", "harness" if side == "harness" else "loopreg",
                       "--tasks", args.tasks, "--limit", str(args.limit), "--batch-size", str(args.batch_size),
                       "--before", str(args.before)]
            env = {**os.environ, "LOOPREG_EVALDATA": str(EVALDATA),
                   **({"PYTHONPATH": str(args.before)} if side == "harness" else {})}
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  cwd=args.before if side == "harness" else ROOT)
            if done.returncode != 0:
                raise SystemExit(f"tasks {side} failed:\n{done.stderr[-3000:]}")
            seconds[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"tasks {side}: {seconds[side][-1]}", flush=True)
    rows = []
    for task in [*args.tasks.split(","), "all"]:
        times = {side: [sum(run.values()) if task == "all" else run[task] for run in runs]
                 for side, runs in seconds.items()}
        ratio = statistics.median(old / new for old, new in zip(times["harness"], times["loopreg eval"]))
        rows.append(("tasks", task, f"{statistics.median(times['loopreg eval']):.1f} "
                     f"(harness {statistics.median(times['harness']):.1f})", f"{ratio:.3f}", "see harness"))
    return rows


def thinking(results: Path) -> str:
    """The mean thinking iterations per token over the tasks of a run with an exit rule (empty for others)."""
    if not results.is_file():
        return ""
    loops = [task["mean_loops"] for task in json.loads(results.read_text())["tasks"].values() if "mean_loops" in task]
    return f"; {statistics.mean(loops):.2f} iterations/token" if loops else ""


def compare(name: str, sides: dict[str, list[str]], trees: dict[str, Path], outs: dict[str, Path], repeats: int,
            reference: str) -> list[tuple[str, ...]]:
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    order = list(sides)
    for repeat in range(repeats):
        for side in order[repeat % len(order):] + order[:repeat % len(order)]:
            shutil.rmtree(outs[side].parent, ignore_errors=True)  # the old harness would resume from its sidecar
            seconds[side].append(run(sides[side], trees.get(side, ROOT)))
            print(f"{name} {side}: {seconds[side][-1]:.1f} s", flush=True)
    made = {side: predictions(side, outs[side]) for side in sides}
    empty = [side for side in sides if not made[side]]
    if empty:
        raise SystemExit(f"{name}: no predictions from {empty} (is {EVALDATA} the eval pack?)")
    rows = []
    for side in sides:
        ratio = statistics.median(s / r for s, r in zip(seconds[side], seconds[reference]))
        items = [(task, item) for task in made[reference] for item in made[reference][task]]
        same = sum(made[side].get(task, {}).get(item) == made[reference][task][item] for task, item in items)
        rows.append((name, side, f"{statistics.median(seconds[side]):.1f}", f"{ratio:.3f}",
                     f"{same}/{len(items)}{thinking(outs[side])}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout with the old harness (git worktree)")
    parser.add_argument("--tasks", default="svamp,triviaqa,squad_v2,primitives_math_d1")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--exit", default="kl:0.05,latent:0.3",
                        help="comma-separated exit rules, one more side each in the export part")
    parser.add_argument("--looped", type=Path, default=None, help="a tied looped folder for the export part")
    parser.add_argument("--parts", default="harness,tasks,export")
    parser.add_argument("--worker", choices=("harness", "loopreg"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tasks.split(","), args.limit, args.batch_size)))
        return
    link_packages(args.before)
    gguf = smollm2_path()
    rows: list[tuple[str, ...]] = []
    print(f"start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "harness" in args.parts:
            outs = {"loopreg eval": work / "new" / "r.json", "harness": work / "old" / "r.json"}
            sides = {side: loopreg_eval(gguf, args.tasks, args.limit, args.batch_size, out)
                     for side, out in outs.items()}
            rows += compare("harness", sides, {"harness": args.before}, outs, args.repeats, "loopreg eval")
        if "tasks" in args.parts:
            rows += compare_tasks(args)
        if "export" in args.parts:
            looped = args.looped
            if looped is None:
                looped = work / "looped"
                run([sys.executable, "-m", "loopreg.cli", "surgery", str(gguf), "--spec", "4x(1,4,1)", "--out",
                     str(looped)])
            unrolled = work / "unrolled"
            run([sys.executable, "-m", "loopreg.cli", "export", str(looped), "--unroll", "--out", str(unrolled)])
            rules = [rule for rule in args.exit.split(",") if rule]
            outs = {"loopreg eval": work / "tied" / "r.json", "lm_eval hf (unrolled)": work / "hf" / "r.json",
                    **{f"loopreg eval --exit {rule}": work / f"exit{index}" / "r.json"
                       for index, rule in enumerate(rules)}}
            tasks = ",".join(f"loopreg_{task}" for task in args.tasks.split(","))
            sides = {"loopreg eval": loopreg_eval(looped, args.tasks, args.limit, args.batch_size,
                                                  outs["loopreg eval"]),
                     "lm_eval hf (unrolled)": [
                         sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                         f"pretrained={unrolled},dtype=float32", "--device", "cpu", "--batch_size",
                         str(args.batch_size), "--include_path", str(ROOT / "evals" / "lm_eval_tasks"), "--tasks",
                         tasks, "--limit", str(args.limit), "--log_samples", "--output_path",
                         str(outs["lm_eval hf (unrolled)"].parent)],
                     **{f"loopreg eval --exit {rule}": loopreg_eval(
                         looped, args.tasks, args.limit, args.batch_size, outs[f"loopreg eval --exit {rule}"],
                         "--exit", rule) for rule in rules}}
            rows += compare("export", sides, {}, outs, args.repeats, "loopreg eval")
    from loopreg.tables import print_table

    print_table(f"{args.tasks} at --limit {args.limit}, batch {args.batch_size}, {args.repeats} repeats",
                rows, header=["part", "side / task", "median s", "ratio to loopreg eval", "same predictions"])
    print("ratio: the other side's seconds / loopreg eval's seconds (>= 1: loopreg eval as fast or faster)")
    print(f"end {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
