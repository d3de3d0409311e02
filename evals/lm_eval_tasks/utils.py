"""loopreg's downstream tasks as lm-evaluation-harness tasks: the paper's prompts, few-shot rule and metrics.

Each ``loopreg_<task>.yaml`` beside this file names its data and prompt in ``dataset_kwargs``; lm-eval calls
:func:`load` (``custom_dataset``) with them, which reads the task's JSONL file from the offline eval pack
(``$LOOPREG_EVALDATA``, else ``../shared/evaldata``), its Hugging Face dataset (``hub:``, only when the file is
absent and ``LOOPREG_ALLOW_HUB=1``), or a ``loopreg.data.synthetic`` generator (``generator:``), and returns the
items with their whole k-shot prompt. Plain lm-eval runs them with nothing of loopreg's but this folder:

    lm_eval --model hf --model_args pretrained=DIR --include_path evals/lm_eval_tasks --tasks loopreg_math_word

Standalone on purpose: the standard library and ``datasets`` (an lm-eval dependency) only; loopreg is imported
only by the generated tasks. Adding a task is a data file plus a YAML.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

DATA_DIR_ENV = "LOOPREG_EVALDATA"
ALLOW_HUB_ENV = "LOOPREG_ALLOW_HUB"
LOCAL_FIELDS = {"id": "{id}", "question": "{question}", "context": "{context}", "answers": "{answers}"}


class TaskDataError(ValueError):
    """A task's data is missing or malformed; ``str()`` is one line naming the task, the file and the line."""


# ------------------------------------------------------------------------------------------------- data
def data_dir() -> Path | None:
    """``$LOOPREG_EVALDATA``, else the first ``../shared/evaldata`` next to the working directory or the checkout
    this folder is in; ``None`` when there is none."""
    chosen = os.environ.get(DATA_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = (base / ".." / "shared" / "evaldata").resolve()
        if candidate.is_dir():
            return candidate
    return None


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _resolve(template: str | None, row: Mapping[str, Any]) -> Any:
    """``template`` over ``row``; a lone ``{field}`` gives the raw value (a list stays a list), a null one None."""
    if template is None:
        return None
    names = _template_fields(template)
    values = [string.Formatter().get_field(name, (), row)[0] for name in names]
    if any(value is None for value in values):
        return None
    return values[0] if len(names) == 1 and template == f"{{{names[0]}}}" else template.format_map(row)


def _item(task: str, fields: Mapping[str, str | None], row: Any, number: int, origin: str,
          uses_context: bool) -> dict[str, Any]:
    def fail(problem: str) -> TaskDataError:
        return TaskDataError(f"task {task}: {origin}:{number}: {problem}")

    if not isinstance(row, Mapping):
        raise fail(f"expected a JSON object, got {type(row).__name__}")
    try:
        values = {key: _resolve(fields.get(key), row) for key in ("id", "question", "answers")}
        values["context"] = _resolve(fields.get("context"), row) if uses_context else None
    except (KeyError, IndexError, TypeError) as err:
        raise fail(f"missing field {err}") from None
    answers = values["answers"]
    answers = [answers] if isinstance(answers, (str, int, float)) else answers
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) for a in answers):
        raise fail(f"answers must be a string or a list of strings, got {answers!r:.80}")
    if not isinstance(values["question"], str) or not values["question"].strip():
        raise fail("field question is missing, null or empty")
    if uses_context and not isinstance(values["context"], str):
        raise fail("field context is null but the prompt template uses {context}")
    item_id = f"{task}-{number}" if values["id"] is None else str(values["id"])
    return {"id": item_id, "question": values["question"], "context": values["context"],
            "answers": [str(a) for a in answers] or [""]}


def _jsonl(task: str, path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise TaskDataError(f"task {task}: {path}:{number}: malformed JSON: {err.msg}") from None


def _hub(hub: Mapping[str, Any]) -> Iterator[tuple[int, Any]]:
    import datasets

    rows = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    prefix, id_field = hub.get("id_prefix"), hub.get("fields", {}).get("id")
    for index, row in enumerate(rows):
        if prefix is None or str(_resolve(id_field, row)).startswith(prefix):
            yield index, row


def _generated(task: str, generator: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    from loopreg.data.synthetic import build_task  # the generated tasks' one loopreg import

    # the task dataclasses are frozen: YAML lists arrive as tuples
    knobs = {key: tuple(value) if isinstance(value, list) else value for key, value in
             (generator.get("knobs") or {}).items()}
    examples = build_task(generator["task"], **knobs).fixed_set(split, generator.get("n", 1000),
                                                                generator.get("seed", 0))
    return [{"id": f"{task}-{split}-{index}", "question": example.prompt, "context": None,
             "answers": [example.answer]} for index, example in enumerate(examples)]


def _unique(task: str, items: list[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for item in items:
        if item["id"] in seen:
            raise TaskDataError(f"task {task}: {origin}: duplicate id {item['id']!r}")
        seen.add(item["id"])
    if not items:
        raise TaskDataError(f"task {task}: {origin}: task has no examples")
    return items


def _local_path(local: str | None) -> Path | None:
    root = data_dir()
    return root / local if root is not None and local else None


def missing_data(name: str, local: str | None = None, hub: Mapping[str, Any] | None = None,
                 generator: Mapping[str, Any] | None = None, **_other: Any) -> str | None:
    """Why the task's data cannot be read, in one line naming the file and ``$LOOPREG_EVALDATA`` (its file is not in
    the pack, and the hub is not allowed), or ``None``; takes a task's ``dataset_kwargs`` (``name``: the task's)."""
    path = _local_path(local)
    if generator is not None or (path is not None and path.is_file()) or \
            (hub is not None and os.environ.get(ALLOW_HUB_ENV) == "1"):
        return None
    where = path or f"<{DATA_DIR_ENV} unset and no ../shared/evaldata>/{local}"
    return (f"task {name}: {where}: data file not found (set ${DATA_DIR_ENV} to the eval pack"
            + (f", or {ALLOW_HUB_ENV}=1 to read {hub['path']} from the hub)" if hub else ")"))


def read_items(task: str, template: str, local: str | None = None, hub: Mapping[str, Any] | None = None,
               generator: Mapping[str, Any] | None = None, fields: Mapping[str, str | None] | None = None,
               split: str | None = None) -> list[dict[str, Any]]:
    """The task's items in file order (``id``, ``question``, ``context``, ``answers``)."""
    if generator is not None:
        split = split or generator.get("split", "test")
        return _unique(task, _generated(task, generator, split), f"generator:{generator['task']}[{split}]")
    problem = missing_data(task, local, hub)
    if problem is not None:
        raise TaskDataError(problem)
    uses_context = "context" in _template_fields(template)
    path = _local_path(local)
    if path is not None and path.is_file():
        rows, origin, fields = _jsonl(task, path), str(path), {**LOCAL_FIELDS, **(fields or {})}
    else:
        rows, origin, fields = _hub(hub), f"hub:{hub['path']}[{hub['split']}]", hub.get("fields", {})
    return _unique(task, [_item(task, fields, row, n, origin, uses_context) for n, row in rows], origin)


# ---------------------------------------------------------------------------------------------- prompts
def select_shots(task: str, query: Mapping[str, Any], pool: Sequence[Mapping[str, Any]], k: int,
                 seed: int) -> list[Mapping[str, Any]]:
    """``k`` shots for ``query`` from ``pool``, never the query itself (same id or same question), seeded by the
    shot seed, the task and the query id: a query's shots depend neither on the order nor on ``--limit``."""
    if k == 0:
        return []
    question = query["question"].strip()
    candidates = [item for item in pool if item["id"] != query["id"] and item["question"].strip() != question]
    if len(candidates) < k:
        raise TaskDataError(f"task {task}: few-shot pool: needs {k} shots for query {query['id']!r} but only "
                            f"{len(candidates)} other examples are available")
    return random.Random(f"{seed}:{task}:{query['id']}").sample(candidates, k)


def build_prompt(task: str, query: Mapping[str, Any], pool: Sequence[Mapping[str, Any]], template: str,
                 k: int = 0, seed: int = 1234, answer_prefix: str = " ", shot_separator: str = "\n\n") -> str:
    """The k-shot prompt: each shot rendered with its first gold answer, then the rendered query."""
    def render(item: Mapping[str, Any]) -> str:
        return template.format(question=item["question"], context=item["context"])

    shots = [render(shot) + answer_prefix + shot["answers"][0] for shot in select_shots(task, query, pool, k, seed)]
    return shot_separator.join([*shots, render(query)])


def load(name: str, template: str, local: str | None = None, hub: Mapping[str, Any] | None = None,
         generator: Mapping[str, Any] | None = None, fields: Mapping[str, str | None] | None = None,
         fewshot: Mapping[str, Any] | None = None, answer_prefix: str = " ", shot_separator: str = "\n\n",
         **_metadata: Any) -> Any:
    """lm-eval's ``custom_dataset``: a ``DatasetDict`` whose ``test`` split holds the task's items, each with its
    ``prompt``. ``name`` seeds the shots (the task's name before it was namespaced, so the shots stay the same);
    ``fewshot: {k, seed, split}``: shots from the evaluated set, or from a generator's ``split``."""
    import datasets

    fewshot = dict(fewshot or {})
    items = read_items(name, template, local, hub, generator, fields)
    pool = read_items(name, template, local, hub, generator, fields, fewshot["split"]) if fewshot.get("split") \
        else items
    rows = [{**item, "prompt": build_prompt(name, item, pool, template, fewshot.get("k", 0),
                                            fewshot.get("seed", 1234), answer_prefix, shot_separator)}
            for item in items]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ---------------------------------------------------------------------------------------------- metrics
# SQuAD answer normalization (lower-case, no punctuation, no articles a/an/the, single spaces), as in the
# official SQuAD v2 evaluation script. lm-eval has no public SQuAD metric (each of its tasks carries its own copy)
# and this folder must run without loopreg or torchmetrics, so it is written out here.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# A thousands-separated integer ("1,000") or a plain one, an optional decimal part, an optional sign; or ".5".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def normalize_answer(text: str) -> str:
    """``"The  Beatles!"`` -> ``"beatles"``."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(answer) for answer in answers))


def _f1(prediction: str, answer: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted or not gold:  # an unanswerable question ([""]) scores 1 only for an empty prediction
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """The best SQuAD token-overlap F1 against the gold answers."""
    return max(_f1(prediction, answer) for answer in answers)


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (thousands commas allowed), or ``None``."""
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def numeric_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the first number of ``prediction`` is close (rel 1e-4, abs 1e-6) to a gold answer's."""
    predicted = parse_number(prediction)
    golds = [parse_number(answer) for answer in answers]
    return float(predicted is not None and any(
        gold is not None and math.isclose(predicted, gold, rel_tol=1e-4, abs_tol=1e-6) for gold in golds))


def exact(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the stripped prediction is a stripped gold answer, character for character (the synthetic
    tasks, whose one-letter answers SQuAD normalization would erase)."""
    return float(prediction.strip() in {answer.strip() for answer in answers})


METRICS = {"exact_match": exact_match, "f1": f1, "numeric": numeric_match, "exact": exact}


def _scorer(metric: str) -> Any:
    def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
        return {"score": METRICS[metric](results[0], doc["answers"])}

    process_results.__name__ = f"process_{metric}"
    return process_results


# ``process_results`` of the YAMLs, one per metric: {"score": ...} per item, averaged by lm-eval
process_exact_match, process_f1 = _scorer("exact_match"), _scorer("f1")
process_numeric, process_exact = _scorer("numeric"), _scorer("exact")
