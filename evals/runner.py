"""The model-agnostic eval runner: prompts in, greedy completions out, scores and a results file.

Any object with ``generate(prompts, max_new_tokens, stop) -> completions`` (greedy, deterministic) can
be evaluated. Each finished batch is appended to a sidecar JSONL (one record per example) and flushed,
so an interrupted run resumes where it stopped: an example whose sidecar record was made for the same
prompt, ``max_new_tokens`` and ``stop`` is not generated again (so use one sidecar per model). The
results JSON is written atomically.

    results = evaluate(MyGenerator(), load_task_specs(["math_word"]), data_dir=None, limit=100,
                       batch_size=16, sidecar_path="runs/x/predictions.jsonl", results_path="runs/x/eval.json")
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from loopreg.adaptive import ExitStats
from loopreg.errors import UserError

from .aggregate import TaskScore, aggregate_groups
from .metrics import bootstrap_stderr, score
from .report import EvalResults, LoopUsage, ModelInfo, write_results
from .tasks import (EvalDataError, EvalExample, GroupSpec, TaskDataMissing, TaskSpec, load_groups, resolve_data_dir,
                    task_prompts)

__all__ = ["TextGenerator", "evaluate", "truncate_at_stop"]


class TextGenerator(Protocol):
    """What :func:`evaluate` needs from a model: greedy completions, one per prompt, in order.

    A generator may also define ``prompt_length(prompt) -> int`` (its token count); :func:`evaluate` then
    batches a task's prompts longest first, as lm-eval does, so each batch pads less.
    """

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]: ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest stop sequence (generators may overshoot a stop inside a batch).

    >>> truncate_at_stop(" Paris\\nQ: next", ["\\n"])
    ' Paris'
    """
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=len(text))
    return text[:cut]


def _request_digest(prompt: str, spec: TaskSpec, adaptive: tuple[str, str] | None = None) -> str:
    """Identifies what was asked, so a sidecar record is reused only for the identical request (an exit rule
    and KV policy, when given, are part of it: another rule's predictions are never reused)."""
    request = json.dumps([prompt, spec.max_new_tokens, list(spec.stop), *([list(adaptive)] if adaptive else [])])
    return hashlib.sha256(request.encode("utf-8")).hexdigest()[:20]


def _adaptive(generator: TextGenerator) -> tuple[str, str] | None:
    """``(exit rule, KV policy)`` of a generator that leaves the fixed-loop path (:class:`.models.ModelGenerator`)."""
    if not getattr(generator, "adaptive", False):
        return None
    return (str(generator.exit) if generator.exit is not None else "fixed", generator.kv_policy)


_RECORD_KEYS = frozenset({"task", "id", "request", "prediction"})


class _Sidecar:
    """Per-example predictions, one JSON object per line: task, id, request, prediction, score, answers."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self.records: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._handle = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # a write cut short by the interruption: drop the partial line
            with self.path.open("r+b") as handle:
                handle.truncate(len(complete))
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(None, self.path, f"corrupt sidecar record: {err.msg}", line=number) from err
            lacking = _RECORD_KEYS - set(record) if isinstance(record, dict) else _RECORD_KEYS
            if lacking:
                raise EvalDataError(None, self.path, f"sidecar record lacks {sorted(lacking)}", line=number)
            self.records[(record["task"], record["id"])] = record  # a later record wins
        self._handle = self.path.open("a", encoding="utf-8")

    def reusable(self, task: str, example: EvalExample, request: str) -> str | None:
        """The stored prediction for this exact request, if any."""
        record = self.records.get((task, example.id))
        return record["prediction"] if record is not None and record["request"] == request else None

    def append(self, records: list[dict[str, Any]]) -> None:
        if self._handle is None:
            return
        self._handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def __enter__(self) -> _Sidecar:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.close()


def _run_task(generator: TextGenerator, spec: TaskSpec, prompted: list[tuple[EvalExample, str]], batch_size: int,
              sidecar: _Sidecar, progress: Progress, exit_stats: ExitStats | None) -> list[float]:
    """Scores of ``prompted`` in order, generating only what the sidecar does not already hold; ``exit_stats``
    (a generator with an exit rule) counts the thinking iterations of what it generates."""
    requests = [_request_digest(prompt, spec, _adaptive(generator)) for _, prompt in prompted]
    counting = {} if exit_stats is None else {"exit_stats": exit_stats}
    predictions = {ex.id: sidecar.reusable(spec.name, ex, request) for (ex, _), request in zip(prompted, requests)}
    todo = [(ex, prompt, request) for (ex, prompt), request in zip(prompted, requests) if predictions[ex.id] is None]
    prompt_length = getattr(generator, "prompt_length", None)
    if prompt_length is not None:  # lm-eval's order (longest first, ties by prompt): similar lengths share a batch
        todo.sort(key=lambda item: (-prompt_length(item[1]), item[1]))
    bar = progress.add_task(spec.name, total=len(prompted), completed=len(prompted) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        completions = generator.generate([prompt for _, prompt, _ in batch], spec.max_new_tokens, list(spec.stop),
                                         **counting)
        if len(completions) != len(batch):
            raise ValueError(f"task {spec.name}: generator returned {len(completions)} completions for "
                             f"{len(batch)} prompts")
        records = []
        for (example, _, request), completion in zip(batch, completions):
            prediction = truncate_at_stop(completion, spec.stop)
            predictions[example.id] = prediction
            records.append({"task": spec.name, "id": example.id, "request": request, "prediction": prediction,
                            "score": score(spec.metric.value, prediction, example.answers),
                            "answers": list(example.answers)})
        sidecar.append(records)
        progress.advance(bar, len(batch))
    # rescored from the predictions, so a changed metric never mixes with stored scores
    return [score(spec.metric.value, predictions[ex.id], ex.answers) for ex, _ in prompted]


def evaluate(generator: TextGenerator, task_specs: Sequence[TaskSpec], data_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int = 16, sidecar_path: str | Path | None = None,
             progress: bool = True, *, results_path: str | Path | None = None, model: ModelInfo | None = None,
             allow_hub: bool = False, groups: Mapping[str, GroupSpec] | None = None) -> dict[str, Any]:
    """Evaluate ``generator`` on ``task_specs``; return (and, with ``results_path``, write) the results dict.

    ``data_dir`` defaults to :func:`resolve_data_dir`; ``limit`` caps examples per task; a task whose data
    is absent is recorded as missing and flagged in every group that contains it. Groups (default: the
    package's group YAMLs) are reported when they contain at least one of the evaluated tasks.

    Example: ``evaluate(gen, load_task_specs(["svamp"]), limit=50, sidecar_path="preds.jsonl")["tasks"]["svamp"]``
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    data_dir = resolve_data_dir(data_dir)
    groups = load_groups() if groups is None else groups
    tasks: dict[str, TaskScore] = {}
    loop_usage: dict[str, LoopUsage] = {}
    exits = getattr(generator, "exit", None) is not None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with _Sidecar(sidecar_path) as sidecar, Progress(*columns, disable=not progress) as bar:
        for spec in task_specs:
            try:
                prompted = task_prompts(spec, data_dir, limit, allow_hub)
            except TaskDataMissing as absent:
                tasks[spec.name] = TaskScore(None, None, 0, spec.metric.value, spec.group, spec.random_baseline,
                                             missing=str(absent))
                if progress:
                    bar.console.print(f"missing: {absent}", markup=False, style="yellow")
                continue
            stats = ExitStats() if exits else None  # one per task: each task's own mean_loops
            scores = _run_task(generator, spec, prompted, batch_size, sidecar, bar, stats)
            tasks[spec.name] = TaskScore(float(np.mean(scores)), bootstrap_stderr(scores), len(scores),
                                         spec.metric.value, spec.group, spec.random_baseline)
            if stats is not None and stats.tokens:  # none when every prediction came from the sidecar
                loop_usage[spec.name] = LoopUsage(float(stats.mean_loops), float(stats.executed_loops))
    relevant = {name: group for name, group in groups.items() if set(group.tasks) & set(tasks)}
    results = EvalResults(model or ModelInfo(type(generator).__name__), tasks, aggregate_groups(relevant, tasks),
                          loop_usage)
    if results_path is not None:
        write_results(results_path, results)
    return results.to_json()
