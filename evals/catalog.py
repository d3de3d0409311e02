"""What loopreg's lm-eval task folder (``lm_eval_tasks/``) holds: its tasks' metadata and its groups, read from
the YAMLs without lm-eval (the report needs them, not a model run).

A task ``loopreg_<name>.yaml`` carries ``metadata: {title, group, random_baseline}`` and names its metric by its
``process_results`` (``utils.process_numeric`` -> ``numeric``); a group ``loopreg_<name>.yaml`` lists its tasks.
Results and reports use the short names (``svamp``, ``math_word``).

    >>> load_groups()["math_word"].tasks[:2]
    ['svamp', 'asdiv']
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loopreg.errors import UserError

__all__ = ["PREFIX", "TASK_DIR", "GroupSpec", "TaskInfo", "load_groups", "load_tasks"]

TASK_DIR = Path(__file__).with_name("lm_eval_tasks")
PREFIX = "loopreg_"


class _Loader(yaml.SafeLoader):
    """lm-eval's YAML dialect, read as data: ``!function utils.load`` is the string ``utils.load``."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@dataclass(frozen=True)
class TaskInfo:
    """A task of the folder: its short name, title, group, metric, chance score and data (``dataset_kwargs``).

    Example: ``TaskInfo("svamp", "SVAMP", "math_word", "numeric", 0.0, {"local": "math_word/svamp.jsonl"})``
    """

    name: str
    title: str
    group: str
    metric: str
    random_baseline: float
    data: dict[str, Any] = field(default_factory=dict, compare=False)

    def missing_data(self) -> str | None:
        """Why this task's data cannot be read now (one line naming the file and ``$LOOPREG_EVALDATA``), or None:
        the folder's own ``utils.missing_data``, so the check is the one lm-eval's run makes."""
        return _task_utils().missing_data(**self.data)


@dataclass(frozen=True)
class GroupSpec:
    """A group: its short name, title and the short names of its tasks (averaged with equal weight).

    Example: ``GroupSpec("closed_book", "Closed-book QA", ["triviaqa", "webquestions"])``
    """

    name: str
    title: str
    tasks: list[str]


@functools.lru_cache(maxsize=1)
def _task_utils() -> Any:
    """The task folder's ``utils.py`` as a module (it is package data, not a package: lm-eval imports it by path)."""
    spec = importlib.util.spec_from_file_location("loopreg_lm_eval_task_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=4)
def _folder(folder: Path) -> tuple[dict[str, TaskInfo], dict[str, GroupSpec]]:
    tasks, groups = {}, {}
    for path in sorted(folder.glob(f"{PREFIX}*.yaml")):
        data, name = _read(path), path.stem.removeprefix(PREFIX)
        if "group" in data:
            members = [member.removeprefix(PREFIX) for member in data.get("task", [])]
            groups[name] = GroupSpec(name, str(data.get("group_alias", name)), members)
            continue
        meta = data.get("metadata") or {}
        process = str(data.get("process_results", "")).rpartition(".process_")[2]
        tasks[name] = TaskInfo(name, str(meta.get("title", name)), str(meta.get("group", "")), process or "score",
                               float(meta.get("random_baseline", 0.0)), dict(data.get("dataset_kwargs") or {}))
    for group in groups.values():
        unknown = [task for task in group.tasks if task not in tasks]
        if unknown:
            raise UserError(f"{folder / (PREFIX + group.name)}.yaml: key 'task': no task YAML for {unknown}")
    return tasks, groups


def load_tasks(folder: str | Path = TASK_DIR) -> dict[str, TaskInfo]:
    """Every task of ``folder`` by short name.

    >>> load_tasks()["squad_v2"].metric
    'f1'
    """
    return dict(_folder(Path(folder).resolve())[0])


def load_groups(folder: str | Path = TASK_DIR) -> dict[str, GroupSpec]:
    """Every group of ``folder`` by short name, each task checked to exist.

    >>> len(load_groups()["all_tasks"].tasks)
    15
    """
    return dict(_folder(Path(folder).resolve())[1])
