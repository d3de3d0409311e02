"""Item-by-item comparison of two eval runs of one model: the harness's predictions file (``loopreg eval``'s
``*.predictions.jsonl``, the reference) against lm-eval's per-sample logs of the ``loopreg_<task>`` tasks
(``--log-samples``). Prints per task the items both ran, identical predictions and both mean scores, then every
differing item.

    python benchmarks/compare_eval_reference.py runs/ref/results.predictions.jsonl runs/lm_eval/
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def read_reference(path: Path) -> dict[str, dict[str, dict]]:
    by_task: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_task[record["task"]][record["id"]] = record
    return by_task


def read_samples(folder: Path) -> dict[str, dict[str, dict]]:
    by_task: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in sorted(folder.rglob("*samples_loopreg_*.jsonl")):
        # loopreg lm-eval: loops_<L>_samples_loopreg_<task>; lm_eval: samples_loopreg_<task>_<timestamp>
        task = re.sub(r"_\d{4}-\d\d-\d\dT.*$", "", path.stem.split("samples_loopreg_", 1)[1])
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            by_task[task][sample["doc"]["id"]] = {"prediction": sample["filtered_resps"][0], "score": sample["score"]}
    return by_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the harness's *.predictions.jsonl")
    parser.add_argument("samples", type=Path, help="a folder with lm-eval's samples_loopreg_<task>_*.jsonl")
    args = parser.parse_args()
    reference, samples = read_reference(args.reference), read_samples(args.samples)
    differing = []
    print(f"{'task':24s} {'items':>5s} {'same':>5s} {'harness':>8s} {'lm-eval':>8s}")
    for task in sorted(set(reference) & set(samples)):
        ids = sorted(set(reference[task]) & set(samples[task]))
        same = [reference[task][i]["prediction"] == samples[task][i]["prediction"] for i in ids]
        means = [100 * sum(rows[i]["score"] for i in ids) / max(1, len(ids)) for rows in (reference[task],
                                                                                          samples[task])]
        print(f"{task:24s} {len(ids):5d} {sum(same):5d} {means[0]:8.2f} {means[1]:8.2f}")
        differing += [(task, i) for i, ok in zip(ids, same) if not ok]
    for task, item in differing:
        print(f"differs: {task} {item}: harness {reference[task][item]['prediction']!r} "
              f"lm-eval {samples[task][item]['prediction']!r}")


if __name__ == "__main__":
    main()
