"""Downstream tasks as data: YAML specs, example loading and few-shot prompt assembly.

Each ``tasks/<name>.yaml`` is one :class:`TaskSpec`; each ``groups/<name>.yaml`` one :class:`GroupSpec`.
Examples come from a local JSONL file under the evaldata directory, from the Hugging Face hub (only when
asked to, and only when the local file is absent), or from a ``loopreg.data.synthetic`` generator.

    spec = load_task_specs(["svamp"])[0]
    pairs = task_prompts(spec, resolve_data_dir(), limit=2)  # [(EvalExample, prompt), ...]

Field templates (``fields:`` and ``hub.fields:``) are ``str.format`` templates over one source row:
``"{question}"``, ``"{body} {question}"``, ``"{answer[aliases]}"``. The ``answers`` template must be a
single field; it may resolve to one string or a list of strings, and an empty list means "no answer"
(SQuAD v2 convention, stored as ``[""]``).
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loopreg.errors import UserError

from .metrics import METRICS, parse_number

__all__ = [
    "DATA_DIR_ENV",
    "GROUPS_DIR",
    "TASKS_DIR",
    "EvalConfigError",
    "EvalDataError",
    "EvalExample",
    "GroupSpec",
    "TaskDataMissing",
    "TaskSpec",
    "build_prompt",
    "load_examples",
    "load_groups",
    "load_task_spec",
    "load_task_specs",
    "parse_task_spec",
    "resolve_data_dir",
    "select_shots",
    "task_prompts",
]

TASKS_DIR = Path(__file__).with_name("tasks")
GROUPS_DIR = Path(__file__).with_name("groups")
DATA_DIR_ENV = "LOOPREG_EVALDATA"
_PROMPT_FIELDS = frozenset({"question", "context"})


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _EvalError(UserError):
    """An eval error: one line in the evals' own format, which already names its file (and task or key)."""

    def at(self, key: str) -> UserError:
        # The subclasses' constructors take the parts of their format, not (message, key).
        return UserError(self.message, key)


class EvalConfigError(_EvalError):
    """A task or group YAML is invalid; ``str()`` is one line naming the file and the key (``field``)."""

    def __init__(self, origin: str | Path, key: str, problem: str):
        super().__init__(f"{origin}: key '{key}': {_one_line(problem)}")
        self.origin, self.field = str(origin), key


class EvalDataError(_EvalError):
    """Eval data is unusable; ``str()`` is one line naming the task (when known), the file and the line.

    Example: ``task svamp: /data/math_word/svamp.jsonl:3: malformed JSON: Expecting value (column 1)``
    """

    def __init__(self, task: str | None, source: str | Path, problem: str, line: int | None = None):
        where = f"{source}:{line}" if line is not None else str(source)
        prefix = f"task {task}: " if task else ""
        super().__init__(f"{prefix}{where}: {_one_line(problem)}")
        self.task, self.source, self.line = task, str(source), line


class TaskDataMissing(EvalDataError):
    """The task's data is absent (no local file, hub not allowed): reported as missing, not fatal."""


# ---------------------------------------------------------------------------------------- YAML schema
Metric = Enum("Metric", {name: name for name in METRICS}, type=str)  # the YAML ``metric`` values


@dataclass
class FieldMap:
    """``str.format`` templates mapping a source row to an example; ``id: null`` numbers rows instead."""

    id: str | None = "{id}"
    question: str = "{question}"
    context: str | None = "{context}"
    answers: str = "{answers}"


@dataclass
class HubSource:
    """``datasets.load_dataset(path, name, split=split)``; ``id_prefix`` keeps rows whose id starts with it."""

    path: str
    split: str
    name: str | None = None
    id_prefix: str | None = None
    fields: FieldMap = field(default_factory=FieldMap)


@dataclass
class GeneratorSource:
    """``loopreg.data.synthetic.build_task(task, **knobs).fixed_set(split, n, seed)``."""

    task: str
    split: str = "test"
    n: int = 1000
    seed: int = 0
    knobs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """``local`` (path under the evaldata dir) and/or ``hub``; or ``generator`` alone."""

    local: str | None = None
    hub: HubSource | None = None
    generator: GeneratorSource | None = None


@dataclass
class PromptSpec:
    """A query renders as ``template``; a shot as ``template + answer_prefix + answers[0]``."""

    template: str
    answer_prefix: str = " "
    shot_separator: str = "\n\n"


@dataclass
class FewShotSpec:
    """``k`` shots per query, drawn with ``seed``; ``split`` names a hub/generator split to draw from
    (``null``: the evaluated set itself, always the case for a local file)."""

    k: int = 0
    seed: int = 1234
    split: str | None = None


@dataclass
class TaskSpec:
    """One downstream task, loaded from ``tasks/<name>.yaml`` (see the module docstring)."""

    name: str
    title: str
    group: str
    source: Source
    prompt: PromptSpec
    metric: Metric
    max_new_tokens: int
    fields: FieldMap = field(default_factory=FieldMap)
    fewshot: FewShotSpec = field(default_factory=FewShotSpec)
    stop: list[str] = field(default_factory=lambda: ["\n"])
    random_baseline: float = 0.0


@dataclass
class GroupSpec:
    """A macro-averaged group: its own ``tasks``, or the union of other ``groups`` (e.g. all_tasks)."""

    name: str
    title: str
    tasks: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as err:
        raise EvalConfigError(path, "<file>", f"cannot read YAML: {err}") from err


def _to_dataclass(schema: type, config: Any, origin: str | Path) -> Any:
    """Merge ``config`` into the structured ``schema``; unknown keys and wrong types name the key."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), config))
    except OmegaConfBaseException as err:
        problem = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        raise EvalConfigError(origin, getattr(err, "full_key", None) or "<root>", problem) from err


def parse_task_spec(config: Mapping[str, Any] | Any, origin: str | Path = "<dict>") -> TaskSpec:
    """Validate one task config (a mapping or OmegaConf node); errors name ``origin`` and the key.

    >>> parse_task_spec({"name": "t", "title": "T", "group": "g", "source": {"local": "t.jsonl"},
    ...                  "prompt": {"template": "Q: {question}\\nA:"}, "metric": "exact_match",
    ...                  "max_new_tokens": 8}).fewshot.k
    0
    """
    spec: TaskSpec = _to_dataclass(TaskSpec, config, origin)

    def require(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise EvalConfigError(origin, key, problem)

    source = spec.source
    require((source.generator is None) != (source.local is None and source.hub is None), "source",
            "give exactly one of: generator, or local and/or hub")
    prompt_fields = set(_template_fields(spec.prompt.template))
    unknown = prompt_fields - _PROMPT_FIELDS
    require(not unknown, "prompt.template", f"unknown fields {sorted(unknown)}; allowed: {sorted(_PROMPT_FIELDS)}")
    for key, fields in (("fields", spec.fields), ("source.hub.fields", source.hub and source.hub.fields)):
        if fields:
            names = _template_fields(fields.answers)
            require(len(names) == 1 and fields.answers == f"{{{names[0]}}}", f"{key}.answers",
                    f"must be one field like '{{answers}}', got {fields.answers!r}")
            require("context" not in prompt_fields or fields.context is not None, f"{key}.context",
                    "is null but prompt.template uses {context}")
    require(source.hub is None or source.hub.id_prefix is None or source.hub.fields.id is not None,
            "source.hub.id_prefix", "needs source.hub.fields.id")
    require(spec.fewshot.k >= 0, "fewshot.k", "must be >= 0")
    require(spec.fewshot.split is None or source.local is None, "fewshot.split",
            "a local file draws shots from itself; set split only for hub-only or generator sources")
    require(spec.max_new_tokens > 0, "max_new_tokens", "must be > 0")
    require(0.0 <= spec.random_baseline < 1.0, "random_baseline", "must be in [0, 1)")
    return spec


def load_task_spec(path: str | Path) -> TaskSpec:
    """Load and validate one task YAML; the file stem must equal its ``name``.

    >>> load_task_spec(TASKS_DIR / "triviaqa.yaml").group
    'closed_book'
    """
    path = Path(path)
    spec = parse_task_spec(_load_yaml(path), path)
    if spec.name != path.stem:
        raise EvalConfigError(path, "name", f"'{spec.name}' must equal the file name '{path.stem}'")
    return spec


def load_groups(groups_dir: str | Path = GROUPS_DIR, tasks_dir: str | Path = TASKS_DIR) -> dict[str, GroupSpec]:
    """All group YAMLs, composite groups expanded to their tasks and every task checked to exist.

    >>> len(load_groups()["all_tasks"].tasks)
    15
    """
    groups_dir, tasks_dir = Path(groups_dir), Path(tasks_dir)
    raw = {path.stem: (_to_dataclass(GroupSpec, _load_yaml(path), path), path)
           for path in sorted(groups_dir.glob("*.yaml"))}
    resolved: dict[str, GroupSpec] = {}
    for name, (group, path) in raw.items():
        if group.name != name:
            raise EvalConfigError(path, "name", f"'{group.name}' must equal the file name '{name}'")
        if bool(group.tasks) == bool(group.groups):
            raise EvalConfigError(path, "tasks", "give either tasks or groups (a composite), not both or neither")
        tasks = list(group.tasks)
        for member in group.groups:
            if member not in raw or raw[member][0].groups:
                raise EvalConfigError(path, "groups", f"'{member}' is not a task group in {groups_dir}")
            tasks += raw[member][0].tasks
        for task in tasks:
            if not (tasks_dir / f"{task}.yaml").is_file():
                raise EvalConfigError(path, "tasks", f"no task YAML {tasks_dir / task}.yaml")
        resolved[name] = GroupSpec(name=name, title=group.title, tasks=tasks, groups=list(group.groups))
    return resolved


def load_task_specs(names: Sequence[str] | None = None, tasks_dir: str | Path = TASKS_DIR,
                    groups_dir: str | Path = GROUPS_DIR) -> list[TaskSpec]:
    """Task specs for task or group ``names`` (all tasks when ``None``), in order, without repeats.

    >>> [spec.name for spec in load_task_specs(["closed_book"])][:2]
    ['triviaqa', 'tydiqa_nocontext']
    """
    tasks_dir = Path(tasks_dir)
    if names is None:
        task_names = [path.stem for path in sorted(tasks_dir.glob("*.yaml"))]
    else:
        groups = load_groups(groups_dir, tasks_dir)
        task_names = []
        for name in names:
            if name in groups:
                task_names += groups[name].tasks
            elif (tasks_dir / f"{name}.yaml").is_file():
                task_names.append(name)
            else:
                raise EvalConfigError(tasks_dir, name, f"no such task or group (groups: {sorted(groups)})")
    return [load_task_spec(tasks_dir / f"{name}.yaml") for name in dict.fromkeys(task_names)]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The evaldata directory: ``data_dir``, else ``$LOOPREG_EVALDATA``, else the first existing
    ``../shared/evaldata`` next to the current directory or the repository root; ``None`` if none exists.

    Example: ``resolve_data_dir()`` -> ``PosixPath('/work/shared/evaldata')`` in this checkout's layout
    """
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_dir():
            origin = "argument" if data_dir else DATA_DIR_ENV
            raise EvalDataError(None, path, f"evaldata directory does not exist (from {origin})")
        return path
    repo_root = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo_root):
        candidate = (base / ".." / "shared" / "evaldata").resolve()
        if candidate.is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class EvalExample:
    """One scored item. ``answers`` always holds at least one string (``[""]`` = no answer)."""

    id: str
    question: str
    context: str | None
    answers: tuple[str, ...]


def _resolve(template: str, row: Mapping[str, Any]) -> Any:
    """Render ``template`` over ``row``; a lone ``{field}`` returns the raw value, a null field returns None."""
    formatter = string.Formatter()
    names = _template_fields(template)
    values = [formatter.get_field(name, (), row)[0] for name in names]  # KeyError/IndexError: missing
    if any(value is None for value in values):
        return None
    if len(names) == 1 and template == f"{{{names[0]}}}":
        return values[0]
    return template.format_map(row)


def _example_from_row(spec: TaskSpec, fields: FieldMap, row: Any, row_number: int, source: str) -> EvalExample:
    def fail(problem: str) -> EvalDataError:
        return EvalDataError(spec.name, source, problem, line=row_number)

    if not isinstance(row, Mapping):
        raise fail(f"expected a JSON object, got {type(row).__name__}")
    uses_context = "context" in _template_fields(spec.prompt.template)
    templates = {"id": fields.id, "question": fields.question, "answers": fields.answers,
                 "context": fields.context if uses_context else None}  # closed-book rows need no context
    try:
        values = {key: None if template is None else _resolve(template, row) for key, template in templates.items()}
    except (KeyError, IndexError, TypeError) as err:
        raise fail(f"missing field {err}") from err
    answers = values["answers"]
    answers = [answers] if isinstance(answers, (str, int, float)) else answers
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) for a in answers):
        raise fail(f"answers must be a string or a list of strings, got {answers!r:.80}")
    answers = tuple(str(a) for a in answers) or ("",)
    if not isinstance(values["question"], str) or not values["question"].strip():
        raise fail("field question is missing, null or empty")
    if uses_context and not isinstance(values["context"], str):
        raise fail("field context is null but the prompt template uses {context}")
    if spec.metric is Metric.numeric and all(parse_number(answer) is None for answer in answers):
        raise fail(f"no gold answer is a number: {list(answers)!r:.80}")
    example_id = f"{spec.name}-{row_number}" if values["id"] is None else str(values["id"])
    return EvalExample(example_id, values["question"], values["context"], answers)


def _jsonl_rows(spec: TaskSpec, path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield line_number, json.loads(line.rstrip("\n"))  # the newline is not part of the record
                except json.JSONDecodeError as err:
                    raise EvalDataError(spec.name, path, f"malformed JSON: {err.msg} (column {err.colno})",
                                        line=line_number) from err


def _hub_rows(hub: HubSource, split: str) -> Iterator[tuple[int, Any]]:
    import datasets  # heavy and network-bound: imported only when a task is really read from the hub

    rows = datasets.load_dataset(hub.path, hub.name, split=split)
    for index, row in enumerate(rows):
        if hub.id_prefix is None or str(_resolve(hub.fields.id, row)).startswith(hub.id_prefix):
            yield index, row


def _generated_examples(spec: TaskSpec, split: str, count: int) -> list[EvalExample]:
    # imported lazily: only generated tasks need the synthetic package
    from loopreg.data.synthetic import build_task

    gen = spec.source.generator
    # YAML lists arrive as lists; the task dataclasses are frozen, so knobs are passed as tuples
    knobs = {key: tuple(value) if isinstance(value, list) else value for key, value in gen.knobs.items()}
    task = build_task(gen.task, **knobs)
    return [EvalExample(f"{spec.name}-{split}-{index}", example.prompt, None, (example.answer,))
            for index, example in enumerate(task.fixed_set(split, count, gen.seed))]


def _unique(spec: TaskSpec, rows: Iterable[tuple[int, EvalExample]], source: str) -> list[EvalExample]:
    first_line: dict[str, int] = {}
    examples = []
    for row_number, example in rows:
        if example.id in first_line:
            raise EvalDataError(spec.name, source, f"duplicate id {example.id!r} (first on line "
                                f"{first_line[example.id]})", line=row_number)
        first_line[example.id] = row_number
        examples.append(example)
    if not examples:
        raise EvalDataError(spec.name, source, "task has no examples")
    return examples


def load_examples(spec: TaskSpec, data_dir: str | Path | None, limit: int | None = None, *,
                  split: str | None = None, allow_hub: bool = False) -> list[EvalExample]:
    """The task's examples, in file order, the first ``limit`` of them.

    Local file under ``data_dir`` first; the hub (``split`` overrides the YAML's) only with ``allow_hub``
    when the local file is absent; generator tasks draw ``fixed_set(split or generator.split)``.
    Absent data raises :class:`TaskDataMissing`; bad data raises :class:`EvalDataError`.

    Example: ``load_examples(load_task_spec(TASKS_DIR / "svamp.yaml"), resolve_data_dir(), limit=1)``
    """
    source = spec.source
    if source.generator is not None:
        # fixed_set(split, n) is a prefix of one seeded stream, so generating only `limit` gives the same items
        count = source.generator.n if limit is None else min(limit, source.generator.n)
        generated = _generated_examples(spec, split or source.generator.split, count)
        examples = _unique(spec, enumerate(generated), f"generator:{source.generator.task}")
    else:
        local = Path(data_dir) / source.local if data_dir is not None and source.local else None
        if local is not None and local.is_file():
            rows, origin, fields = _jsonl_rows(spec, local), str(local), spec.fields
        elif allow_hub and source.hub is not None:
            split = split or source.hub.split
            rows, origin, fields = _hub_rows(source.hub, split), f"hub:{source.hub.path}[{split}]", source.hub.fields
        else:
            where = local or (f"<no evaldata dir; set {DATA_DIR_ENV}>/{source.local}" if source.local else "hub")
            reason = "local file not found" if source.local else "hub-only task"
            if source.hub is not None and not allow_hub:
                reason += f" and hub loading is off (hub: {source.hub.path})"
            raise TaskDataMissing(spec.name, where, reason)
        examples = _unique(spec, ((n, _example_from_row(spec, fields, row, n, origin)) for n, row in rows), origin)
    return examples if limit is None else examples[:limit]


# ---------------------------------------------------------------------------------------- prompts
def _render_query(spec: TaskSpec, example: EvalExample) -> str:
    return spec.prompt.template.format(question=example.question, context=example.context)


def select_shots(spec: TaskSpec, query: EvalExample, pool: Sequence[EvalExample]) -> list[EvalExample]:
    """``spec.fewshot.k`` shots for ``query`` from ``pool``, never the query itself (same id or same
    question). Seeded by the shot seed, task and query id, so a query's shots do not depend on order,
    ``limit`` or resumption.

    Example: ``select_shots(spec, pool[0], pool)`` -> 5 examples, none with ``pool[0]``'s id or question
    """
    k = spec.fewshot.k
    if k == 0:
        return []
    question = query.question.strip()
    candidates = [ex for ex in pool if ex.id != query.id and ex.question.strip() != question]
    if len(candidates) < k:
        raise EvalDataError(spec.name, "few-shot pool", f"needs {k} shots for query {query.id!r} but only "
                            f"{len(candidates)} other examples are available")
    return random.Random(f"{spec.fewshot.seed}:{spec.name}:{query.id}").sample(candidates, k)


def build_prompt(spec: TaskSpec, query: EvalExample, pool: Sequence[EvalExample]) -> str:
    """The k-shot prompt: rendered shots with their first gold answer, then the rendered query.

    Example: ``build_prompt(spec, query, pool)`` -> ``'Q: 2+2?\\nA: 4\\n\\nQ: 3+3?\\nA:'`` (1-shot)
    """
    shots = [_render_query(spec, shot) + spec.prompt.answer_prefix + shot.answers[0]
             for shot in select_shots(spec, query, pool)]
    return spec.prompt.shot_separator.join([*shots, _render_query(spec, query)])


def task_prompts(spec: TaskSpec, data_dir: str | Path | None, limit: int | None = None,
                 allow_hub: bool = False) -> list[tuple[EvalExample, str]]:
    """The first ``limit`` examples paired with their prompts; shots come from the whole set
    (or from ``fewshot.split``), not only from the first ``limit``.

    Example: ``example, prompt = task_prompts(load_task_spec(TASKS_DIR / "svamp.yaml"), resolve_data_dir(), 1)[0]``
    """
    shots_from_eval_set = spec.fewshot.k > 0 and spec.fewshot.split is None
    examples = load_examples(spec, data_dir, None if shots_from_eval_set else limit, allow_hub=allow_hub)
    pool = examples
    if spec.fewshot.k > 0 and not shots_from_eval_set:
        pool = load_examples(spec, data_dir, split=spec.fewshot.split, allow_hub=allow_hub)
    queries = examples if limit is None else examples[:limit]
    return [(example, build_prompt(spec, example, pool)) for example in queries]
