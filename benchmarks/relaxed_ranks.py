"""Relaxed recursion against rank on SmolLM2-135M-Instruct, before any training (issue #25): for each rank, the
retrofit (``--spec``, init average, SVD-initialised per-application deltas) scored on the reasoning primitives
(5-shot, ``--limit`` problems per task) and on held-out perplexity, beside the source; a table, a JSON and a plot.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/relaxed_ranks.py --ranks 0,8,32,64,128,full \\
        --out runs/relaxed_ranks --png docs/relaxed_ranks.png

Rank 0 is the retrofit without deltas. Each rank's folder is written, evaluated with ``loopreg eval`` (results
``OUT/rank_R.json``) and deleted; a results file already in ``OUT`` is reused, so the sweep resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from loopreg.folders import write_model_folder
from loopreg.loading import load
from loopreg.surgery import loop_surgery
from loopreg.surgery.core import distinct_param_count, stored_layers
from loopreg.surgery.relax import delta_param_count
from loopreg.surgery.sources import load_source_tokenizer, smollm2_gguf
from loopreg.tables import print_table

TEXT = Path(os.environ.get("LOOPREG_TEXTDATA", Path(__file__).resolve().parents[2] / "shared" / "textdata"))
HELD_OUT = TEXT / "wiki_passages_heldout.jsonl"


def evaluate(model: str | Path, out: Path, limit: int, ppl_text: Path) -> dict:
    """``loopreg eval`` on the primitives group and held-out perplexity (reused when ``out`` exists)."""
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "loopreg.cli", "eval", str(model), "--groups", "reasoning_primitives",
                        "--limit", str(limit), "--ppl-text", str(ppl_text), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="0,8,32,64,128,full")
    parser.add_argument("--spec", default="4x(1,4,1)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--ppl-text", type=Path, default=HELD_OUT)
    parser.add_argument("--out", type=Path, default=Path("runs/relaxed_ranks"))
    parser.add_argument("--png", type=Path, help="plot of primitives and perplexity against added parameters")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    gguf = smollm2_gguf()
    source = load(gguf)
    tokenizer = load_source_tokenizer(gguf)
    rows = [{"rank": "source", "deltas": 0, "shared": distinct_param_count(source),
             **_scores(evaluate(gguf, args.out / "source.json", args.limit, args.ppl_text))}]
    for rank in args.ranks.split(","):
        counted = loop_surgery(copy.deepcopy(source), args.spec, init="average",
                               lora_rank=None if rank == "0" else rank, lora_init="zero")  # counts only: no SVD
        deltas = delta_param_count(stored_layers(counted))
        result = args.out / f"rank_{rank}.json"
        if not result.is_file():
            folder = args.out / f"rank_{rank}"
            model = loop_surgery(copy.deepcopy(source), args.spec, init="average",
                                 lora_rank=None if rank == "0" else rank)
            write_model_folder(model, folder, tokenizer)
            evaluate(folder, result, args.limit, args.ppl_text)
            shutil.rmtree(folder)
        rows.append({"rank": rank, "deltas": deltas, "shared": distinct_param_count(counted) - deltas,
                     **_scores(json.loads(result.read_text()))})
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    print_table(f"relaxed {args.spec} against rank (no training)", [
        (str(row["rank"]), f"+{100 * row['deltas'] / row['shared']:.1f}% params, primitives {row['primitives']:.3f}, "
                           f"ppl {row['ppl']:,.2f}") for row in rows])
    if args.png:
        _plot(rows, args.png, args.spec)


def _scores(results: dict) -> dict:
    return {"primitives": results["groups"]["reasoning_primitives"]["score"], "ppl": results["perplexity"],
            "tasks": {name: task["score"] for name, task in results["tasks"].items()}}


def _plot(rows: list[dict], path: Path, spec: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source, sweep = rows[0], rows[1:]
    added = [100 * row["deltas"] / row["shared"] for row in sweep]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, label in ((left, "primitives", "reasoning primitives (5-shot)"),
                             (right, "ppl", "held-out perplexity")):
        axis.plot(added, [row[key] for row in sweep], "o-", label=f"relaxed {spec}")
        for x, row in zip(added, sweep):
            axis.annotate(f"r={row['rank']}", (x, row[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.axhline(source[key], color="gray", linestyle="--", label="source (30 layers)")
        axis.set_xscale("symlog", linthresh=1)
        axis.set_xlim(-0.3, 300)
        axis.set_xlabel("added parameters (% of the shared ones)")
        axis.set_ylabel(label)
    right.set_yscale("log")
    left.axvline(20, color="red", linewidth=0.8, linestyle=":", label="20% extra")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
