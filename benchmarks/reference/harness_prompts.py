"""Writes ``tests/data/harness_prompts.json``: what the home-made harness (before #23) rendered and scored, for the
lm-eval task folder's tests. Run it inside a checkout of that harness (6d7bde6), e.g.

    git worktree add /tmp/harness 6d7bde6 && cd /tmp/harness && \\
        PYTHONPATH=$PWD LOOPREG_EVALDATA=../shared/evaldata python harness_prompts.py 6d7bde6 OUT.json

Per task: the SHA-256 of the first 8 items' prompts and answers (the eval data stays out of the repo), its stop
strings, token budget and metric; and each metric on fixed prediction/answer pairs.
"""

import hashlib
import json
import sys

from loopreg.evals.metrics import METRICS
from loopreg.evals.tasks import TaskDataMissing, load_task_specs, resolve_data_dir, task_prompts

PAIRS = [("The Beatles!", ["beatles"]), ("an apple", ["Apple"]), ("big cat", ["the big dog"]), ("", [""]),
         ("something", [""]), ("", ["an answer"]), (" 42\n", ["42"]), ("It costs $1,000.", ["1000"]),
         ("0.6667 apples", ["0.6666666666666666"]), ("2.50", ["2.5"]), ("-3 degrees", ["-3"]), ("no number", ["7"]),
         (" a", ["a"]), ("a", ["b", "a"]), ("Paris, France", ["paris", "France"]), ("the the", ["the"]),
         ("1,000 people", ["1000 people"]), ("x y z", ["x z y w"]), (".5", ["0.5"]),
         ("the cat sat on the mat", ["a cat sat", "mat"]), ("Yes", ["yes", "no"]), ("1/2", ["0.5"])]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def main(commit: str, path: str) -> None:
    tasks = {}
    for spec in load_task_specs():
        entry = {"stop": list(spec.stop), "max_new_tokens": spec.max_new_tokens, "metric": spec.metric.value}
        try:
            pairs = task_prompts(spec, resolve_data_dir(), limit=8)
        except TaskDataMissing:
            entry["missing"] = spec.source.local
        else:
            entry["items"] = [{"id": example.id, "answers_sha256": sha(json.dumps(list(example.answers))),
                               "prompt_sha256": sha(prompt)} for example, prompt in pairs]
        tasks[spec.name] = entry
    metrics = {name: [[p, a, float(fn(p, a))] for p, a in PAIRS] for name, fn in sorted(METRICS.items())}
    with open(path, "w") as handle:
        json.dump({"commit": commit, "items_per_task": 8, "tasks": tasks, "metrics": metrics}, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
