"""Run tasks and groups through lm-eval on one :class:`~loopreg.evals.lm_eval_model.LoopregLM` and collect a
``loopreg.eval/1`` result: loopreg's tasks by short name (``svamp``, ``math_word``) or lm-eval name
(``loopreg_svamp``), and any other task lm-eval knows (``arc_easy``).

    >>> lm = LoopregLM("runs/loop_4x6/model", loops=4)  # doctest: +SKIP
    >>> results = evaluate(lm, ["reasoning_primitives"], limit=100)  # doctest: +SKIP
    >>> results.groups["reasoning_primitives"].score  # doctest: +SKIP

Each task runs as its own ``simple_evaluate`` call, so an adaptive exit's thinking iterations are counted per task
and a task whose data is absent (not in the offline pack) is reported missing, with its file, instead of failing
its whole group as lm-eval would. Group scores are the paper's plain means over the tasks that ran
(:func:`~loopreg.evals.aggregate.aggregate_groups`), flagged when a task is missing.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loopreg.adaptive import ExitStats
from loopreg.errors import UserError, did_you_mean

from .aggregate import TaskScore, aggregate_groups
from .catalog import PREFIX, TASK_DIR, load_groups, load_tasks
from .report import EvalResults, LoopUsage

__all__ = ["evaluate", "resolve_tasks", "task_manager"]


class _CustomDatasetNote(logging.Filter):
    """Drops lm-eval's warning, at every task with a ``custom_dataset`` (all of loopreg's), that such a task takes
    keywords from ``--metadata``: loopreg's take theirs from their YAML, so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_QUIET_NOTE = _CustomDatasetNote()


@functools.lru_cache(maxsize=8)
def task_manager(include_path: tuple[str, ...] = (), defaults: bool = True) -> Any:
    """lm-eval's task index over loopreg's folder, ``include_path`` and, with ``defaults``, lm-eval's own tasks
    (thousands of YAMLs, seconds to index: built once, and only when a name needs it)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASK_DIR), *include_path], include_defaults=defaults)


def resolve_tasks(names: Sequence[str], include_path: Sequence[str] = ()) -> tuple[list[str], Any]:
    """The lm-eval task names that ``names`` ask for, in order, without repeats, and a :func:`task_manager` that
    loads them all: a loopreg group expands to its tasks; a short loopreg name gets its prefix (a one-line
    :class:`~loopreg.errors.UserError` when its data file is absent: a group reports such a task missing instead);
    any other name must be a task, group or tag of ``include_path`` or of lm-eval (a one-line error with a
    did-you-mean over all of them otherwise). lm-eval's own index is built only for a name that needs it.

    >>> resolve_tasks(["closed_book", "svamp"])[0][-1]
    'loopreg_svamp'
    """
    groups, tasks = load_groups(), load_tasks()
    include = tuple(str(path) for path in include_path)
    manager = task_manager(include, defaults=False)
    resolved: list[str] = []
    for name in names:
        short = name.removeprefix(PREFIX)
        if short in groups:
            resolved += [PREFIX + task for task in groups[short].tasks]
        elif short in tasks:
            problem = tasks[short].missing_data()
            if problem is not None:  # named on its own; through a group it is reported missing instead
                raise UserError(problem)
            resolved.append(PREFIX + short)
        elif name in manager.all_tasks or name in (manager := task_manager(include)).all_tasks:
            resolved.append(name)
        else:
            known = [*groups, *tasks, *manager.all_tasks]
            raise UserError(f"unknown task or group '{name}'{did_you_mean(name, known)}", key="--tasks")
    return list(dict.fromkeys(resolved)), manager


def _short(task: str) -> str:
    """A loopreg task's short name (``loopreg_svamp`` -> ``svamp``); any other task's lm-eval name."""
    short = task.removeprefix(PREFIX)
    return short if short in load_tasks() else task


def _data_error(err: BaseException | None) -> str | None:
    """The one line of the task folder's ``TaskDataError`` (malformed data) behind ``err``, else None: its class is
    the one lm-eval imported from the folder's ``utils.py`` by path, so it is known by name."""
    while err is not None:
        if any(cls.__name__ == "TaskDataError" for cls in type(err).__mro__):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def _score(task: str, metrics: dict[str, Any], n: int) -> TaskScore:
    """A task's lm-eval metrics as a :class:`TaskScore`: loopreg's tasks their ``score``, any other its first
    metric (``acc,none``)."""
    info = load_tasks().get(_short(task))
    keys = [key for key, value in metrics.items() if "," in key and "_stderr" not in key and
            isinstance(value, (int, float))]
    key = "score,none" if info is not None else keys[0]
    metric, _, filter_name = key.partition(",")
    stderr = metrics.get(f"{metric}_stderr,{filter_name}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) else None
    if info is None:
        return TaskScore(float(metrics[key]), stderr, n, metric, "")
    return TaskScore(float(metrics[key]), stderr, n, info.metric, info.group, info.random_baseline)


def _missing(task: str, reason: str) -> TaskScore:
    info = load_tasks()[_short(task)]
    return TaskScore(None, None, 0, info.metric, info.group, info.random_baseline, missing=reason)


def _write_samples(folder: Path, task: str, samples: list[dict[str, Any]]) -> None:
    from lm_eval.utils import handle_non_serializable  # numpy scalars and sets, as lm-eval's own CLI writes them

    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n"
                    for sample in samples)
    (folder / f"samples_{task}.jsonl").write_text(lines, encoding="utf-8")


def evaluate(lm: Any, names: Sequence[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
             samples_dir: str | Path | None = None, include_path: Sequence[str] = (),
             progress: Callable[[str], None] | None = print, **lm_eval_kwargs: Any) -> EvalResults:
    """Every task ``names`` resolve to (:func:`resolve_tasks`, with the task folders ``include_path``) through
    ``lm_eval.simple_evaluate`` on ``lm`` (a :class:`~loopreg.evals.lm_eval_model.LoopregLM`); returns the model's
    :class:`EvalResults` with per-task scores, ``mean_loops``/``executed_loops`` per task under an exit rule, and the
    groups that have a task here. ``samples_dir`` gets lm-eval's per-sample log, ``samples_<task>.jsonl``;
    ``lm_eval_kwargs`` go to ``simple_evaluate`` (``bootstrap_iters``, ``gen_kwargs``, ...).

    Example: ``evaluate(lm, ["math_word"], limit=50, samples_dir="runs/eval/smol_samples").groups["math_word"]``
    """
    import lm_eval

    logging.getLogger("lm_eval.api.task").addFilter(_QUIET_NOTE)
    resolved, manager = resolve_tasks(names, include_path)
    scores: dict[str, TaskScore] = {}
    usage: dict[str, LoopUsage] = {}
    for name in resolved:
        short = _short(name)
        problem = load_tasks()[short].missing_data() if short != name else None
        if problem is not None:  # a task of a group whose file is not in the pack (named alone: resolve_tasks refused)
            scores[short] = _missing(name, problem)
            if progress:
                progress(f"{short}: missing ({problem})")
            continue
        try:
            built = manager.load([name])["tasks"]
        except Exception as err:  # a task's data loader runs here: malformed data is the user's
            line = _data_error(err)
            if line is None:
                raise
            raise UserError(line) from None
        if lm.exit_stats is not None:
            lm.exit_stats = ExitStats()
        out = lm_eval.simple_evaluate(model=lm, tasks=list(built.values()), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=samples_dir is not None,
                                      **lm_eval_kwargs)
        for task in built:
            task_short = _short(task)
            scores[task_short] = _score(task, out["results"][task], int(out["n-samples"][task]["effective"]))
            if samples_dir is not None:
                _write_samples(Path(samples_dir), task, out["samples"][task])
            if progress:
                progress(f"{task_short}: {scores[task_short].score:.4f} over {scores[task_short].n} items")
        if lm.exit_stats is not None:
            usage[short] = LoopUsage(float(lm.exit_stats.mean_loops), float(lm.exit_stats.executed_loops))
    groups = {name: group for name, group in load_groups().items() if set(group.tasks) & set(scores)}
    return EvalResults(lm.info, scores, aggregate_groups(groups, scores), usage)
