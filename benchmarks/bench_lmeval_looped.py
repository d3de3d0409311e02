"""``loopreg lm-eval`` on a tied looped SmolLM2 vs lm-eval's own ``hf`` model on its unrolled export: the same
scores (every response compared), and the throughput ratio.

Side A is ``loopreg lm-eval``'s path (``load_model`` + ``LoopregLM`` at the saved loop count, as its CLI builds
them); side B is lm-eval's ``HFLM(pretrained=<unrolled dir>)`` on ``loopreg export --unroll``'s folder; side C
(leave it out with ``--sides A,B``) is ``HFLM(pretrained=<tied dir>, trust_remote_code=True)``: the tied folder
through its own remote code, no loopreg code path. Two local lm-eval tasks (``dataset_path: json``): SVAMP
``generate_until`` (k-shot from the same file, greedy, stop at a newline, first number exact match) and
``loglikelihood_rolling`` on held-out Wikipedia passages cut to ``--chars``. Requests/s time each side's request
method (``generate_until``, ``loglikelihood_rolling``) only; the sides run in a rotating order per task and repeat.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lmeval_looped.py --model /work/main/runs/heal_keepall/model

Without ``--model`` it takes ``runs/heal_keepall/model`` (a healed keep-all retrofit ``12x1+6x2+12x1``) when it
exists, else builds ``loopreg surgery <SmolLM2 GGUF> --spec "4x(1,4,1)"`` in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "runs" / "heal_keepall" / "model"
REQUEST_TYPES = {"svamp": "generate_until", "wiki": "loglikelihood_rolling"}
SIDES = {"A": "loopreg lm-eval (tied)", "B": "hf (unrolled)", "C": "hf trust_remote_code (tied)"}


def write_tasks(folder: Path, evaldata: Path, textdata: Path, limit: int, shots: int, chars: int,
                max_gen_toks: int) -> Path:
    """The two task YAMLs and their JSONL documents in ``folder`` (datasets' cache inside it)."""
    folder.mkdir(parents=True)
    svamp = [json.loads(line) for line in (evaldata / "math_word" / "svamp.jsonl").read_text().splitlines()]
    passages = [json.loads(line)["text"] for line in
                (textdata / "wiki_passages_heldout.jsonl").read_text().splitlines()][:limit]
    docs = {"svamp": [{"question": row["question"], "answer": row["answers"][0]} for row in svamp],
            "wiki": [{"text": text[:chars].rsplit(" ", 1)[0]} for text in passages]}  # whole words only
    for name, rows in docs.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def head(name: str) -> str:
        return (f"task: bench_{name}\ndataset_path: json\ntest_split: test\noutput_type: {REQUEST_TYPES[name]}\n"
                f"dataset_kwargs: {{data_files: {{test: {folder / name}.jsonl}}, cache_dir: {folder / 'cache'}}}\n")

    # Shots come from the same file: lm-eval drops the scored document from its own few-shot draw.
    (folder / "svamp.yaml").write_text(head("svamp") + f"""fewshot_split: test
num_fewshot: {shots}
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
generation_kwargs: {{until: ["\\n"], max_gen_toks: {max_gen_toks}, do_sample: false}}
filter_list:
  - name: first_number
    filter:
      - function: regex
        regex_pattern: "-?[0-9]+(?:\\\\.[0-9]+)?"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (folder / "wiki.yaml").write_text(head("wiki") + """doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return folder


def tied_remote_folder(model_dir: Path, model: Any, tokenizer: Any, work: Path) -> Path:
    """A tied folder that loads through its own remote code: ``model_dir`` itself when its config has an
    ``auto_map``, else the loaded model written again by ``write_model_folder`` (folders from before remote code)."""
    from loopreg.folders import write_model_folder

    config = model_dir / "config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text()):
        return model_dir
    print(f"side C: {model_dir} has no remote code (written before it existed); re-saved with it to {work / 'tied'}")
    return write_model_folder(model, work / "tied", tokenizer)


def timed(method: Callable[[list[Any]], list[Any]], log: list[tuple[int, float]]) -> Callable[[list[Any]], list[Any]]:
    """``method`` that appends (requests, seconds) of each call to ``log``."""
    def run(requests: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        start = time.perf_counter()
        out = method(requests, *args, **kwargs)
        log.append((len(requests), time.perf_counter() - start))
        return out
    return run


def evaluate_side(lm: Any, task: str, task_manager: Any, limit: int) -> tuple[dict[str, Any], list[Any], float]:
    """(metrics, responses by document, requests/s of the request method) of one side on one task."""
    import lm_eval

    log: list[tuple[int, float]] = []
    request_type = REQUEST_TYPES[task]
    setattr(lm, request_type, timed(getattr(type(lm), request_type).__get__(lm), log))
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"bench_{task}"], task_manager=task_manager, limit=limit,
                                  log_samples=True, bootstrap_iters=0)  # the values are compared, not stderrs
    metrics = {key: value for key, value in out["results"][f"bench_{task}"].items()
               if "," in key and "_stderr" not in key}
    samples = sorted(out["samples"][f"bench_{task}"], key=lambda sample: sample["doc_id"])
    requests = sum(count for count, _ in log)
    return metrics, [sample["resps"] for sample in samples], requests / sum(seconds for _, seconds in log)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a tied looped HF folder "
                        "(default: runs/heal_keepall/model, else a 4x(1,4,1) surgery of the SmolLM2 GGUF)")
    parser.add_argument("--evaldata", type=Path, default=None,
                        help="the offline eval pack (default: $LOOPREG_EVALDATA or ../shared/evaldata)")
    parser.add_argument("--textdata", type=Path, default=Path(os.environ.get("LOOPREG_TEXTDATA",
                                                                              REPO.parent / "shared" / "textdata")),
                        help="wiki passages (default: $LOOPREG_TEXTDATA or ../shared/textdata)")
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--shots", type=int, default=1, help="SVAMP few-shot examples")
    parser.add_argument("--chars", type=int, default=300, help="characters kept of each passage")
    parser.add_argument("--max-gen-toks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sides", default="A,B,C", help="comma-separated of A, B, C")
    parser.add_argument("--tasks", default="svamp,wiki", help="comma-separated of svamp, wiki")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per task (order rotates)")
    args = parser.parse_args()
    sides = args.sides.split(",")
    if "A" not in sides or "B" not in sides or not set(sides) <= set(SIDES):
        parser.error(f"--sides: A and B, optionally C (got {args.sides})")
    tasks = args.tasks.split(",")
    if not set(tasks) <= set(REQUEST_TYPES):
        parser.error(f"--tasks: of {', '.join(REQUEST_TYPES)} (got {args.tasks})")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["HF_MODULES_CACHE"] = str(work / "hf_modules")  # side C's remote code, read at import below
        import torch
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from loopreg.evals.lm_eval_model import LoopregLM, load_model
        from loopreg.surgery.export import export_unrolled

        print(f"start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, torch threads "
              f"{torch.get_num_threads()}, load average {load_average()}")
        model_dir = args.model
        if model_dir is None and DEFAULT_MODEL.is_dir():
            model_dir = DEFAULT_MODEL
        if model_dir is None:
            from loopreg.surgery.cli import cli_main as surgery
            from loopreg.surgery.sources import smollm2_gguf

            model_dir = work / "surgery"
            print(f"model: no {DEFAULT_MODEL}; building loopreg surgery {smollm2_gguf()} --spec 4x(1,4,1)")
            surgery([str(smollm2_gguf()), "--spec", "4x(1,4,1)", "--out", str(model_dir)])
        evaldata = args.evaldata or Path(os.environ.get("LOOPREG_EVALDATA", REPO.parent / "shared" / "evaldata"))
        if not evaldata.is_dir():
            parser.error("no evaldata pack: give --evaldata or set LOOPREG_EVALDATA")
        task_folder = write_tasks(work / "tasks", evaldata, args.textdata, args.limit, args.shots, args.chars,
                            args.max_gen_toks)
        model, tokenizer = load_model(model_dir)
        lms = {"A": LoopregLM(model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size)}
        spec = lms["A"].info.spec
        print(f"model: {model_dir} (spec {spec}, the saved loop count)")
        unrolled = export_unrolled(model, work / "unrolled", tokenizer)
        lms["B"] = HFLM(pretrained=str(unrolled), device="cpu", batch_size=args.batch_size)
        if "C" in sides:
            lms["C"] = HFLM(pretrained=str(tied_remote_folder(model_dir, model, tokenizer, work)),
                            trust_remote_code=True, device="cpu", batch_size=args.batch_size)
        task_manager = TaskManager(include_path=str(task_folder))

        rows = []
        for index, task in enumerate(tasks):
            metrics: dict[str, dict[str, Any]] = {}
            responses: dict[str, list[Any]] = {}
            speeds: dict[str, list[float]] = {side: [] for side in sides}
            for repeat in range(args.repeats):
                shift = (index + repeat) % len(sides)
                for side in sides[shift:] + sides[:shift]:  # a rotating order: no side always runs first
                    metrics[side], resps, speed = evaluate_side(lms[side], task, task_manager, args.limit)
                    if responses.setdefault(side, resps) != resps:
                        raise SystemExit(f"side {side} on {task}: responses changed between repeats")
                    speeds[side].append(speed)
                    print(f"{task} side {side}: {speed:.3f} requests/s  {metrics[side]}")
            same = {side: sum(a == b for a, b in zip(responses[side], responses["A"])) for side in sides}
            rate = {side: statistics.median(values) for side, values in speeds.items()}
            for key in metrics["A"]:
                rows.append((task, key, *(f"{metrics[side][key]:.10g}" for side in sides),
                             "yes" if all(metrics[side][key] == metrics["A"][key] for side in sides) else "NO"))
            rows.append((task, "identical responses", *(f"{same[side]}/{len(responses['A'])}" for side in sides), ""))
            rows.append((task, "requests/s", *(f"{rate[side]:.3f}" for side in sides),
                         f"A/B {rate['A'] / rate['B']:.3f}"))
        from loopreg.tables import print_table

        print_table(f"lm-eval on {model_dir} ({spec}), {args.limit} docs/task, batch {args.batch_size}, "
                    f"{torch.get_num_threads()} threads",
                    rows, header=["task", "metric", *(f"{side}: {SIDES[side]}" for side in sides), "identical"])
        print(f"end {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {load_average()}")


if __name__ == "__main__":
    main()
