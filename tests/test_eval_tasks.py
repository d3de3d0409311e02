"""Task/group YAMLs, example loading with one-line data errors, and few-shot prompt assembly."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from loopreg.evals import (DATA_DIR_ENV, EvalConfigError, EvalDataError, TaskDataMissing, build_prompt, load_examples,
                           load_groups, load_task_spec, load_task_specs, parse_task_spec, resolve_data_dir,
                           select_shots, task_prompts)
from loopreg.evals.tasks import TASKS_DIR, EvalExample


def qa_config(**overrides: Any) -> dict[str, Any]:
    config = {"name": "toy", "title": "Toy", "group": "toy_group", "source": {"local": "toy.jsonl"},
              "prompt": {"template": "Q: {question}\nA:"}, "metric": "exact_match", "max_new_tokens": 8,
              "fewshot": {"k": 2, "seed": 7}}
    return {**config, **overrides}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def toy_rows(count: int) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "question": f"What is {i}+{i}?", "context": None, "answers": [str(2 * i)]}
            for i in range(count)]


# ---------------------------------------------------------------------------------------- the YAMLs
def test_every_builtin_task_yaml_loads() -> None:
    specs = load_task_specs()
    assert len(specs) == 22
    assert {spec.name for spec in specs} == {path.stem for path in TASKS_DIR.glob("*.yaml")}


def test_groups_match_the_paper() -> None:
    groups = load_groups()
    sizes = {name: len(group.tasks) for name, group in groups.items()}
    assert sizes == {"closed_book": 4, "open_book": 5, "math_word": 6, "reasoning_primitives": 4,
                     "synthetic": 3, "all_tasks": 15}
    assert groups["all_tasks"].tasks == groups["closed_book"].tasks + groups["open_book"].tasks + \
        groups["math_word"].tasks
    for name, group in groups.items():
        if not group.groups:
            assert {spec.group for spec in load_task_specs([name])} == {name}


def test_load_task_specs_expands_groups_in_order() -> None:
    names = [spec.name for spec in load_task_specs(["svamp", "math_word"])]
    assert names == ["svamp", "asdiv", "mawps_addsub", "mawps_multiarith", "mawps_singleeq", "mawps_singleop"]
    with pytest.raises(EvalConfigError, match="no such task or group"):
        load_task_specs(["nope"])


@pytest.mark.parametrize(("change", "key"), [
    ({"surprise": 1}, "surprise"),
    ({"max_new_tokens": "lots"}, "max_new_tokens"),
    ({"metric": "bleu"}, "metric"),
    ({"fewshot": {"k": 1, "shots_from": "train"}}, "fewshot.shots_from"),
    ({"prompt": {"template": "{question} {answer}"}}, "prompt.template"),
    ({"random_baseline": 1.5}, "random_baseline"),
    ({"source": {"local": "x.jsonl", "generator": {"task": "phop"}}}, "source"),
])
def test_bad_task_yaml_names_file_and_key_in_one_line(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text(json.dumps(qa_config(**change)))  # JSON is YAML
    with pytest.raises(EvalConfigError) as raised:
        load_task_spec(path)
    message = str(raised.value)
    assert str(path) in message and f"key '{key}'" in message and "\n" not in message


def test_task_name_must_match_its_file(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(json.dumps(qa_config()))
    with pytest.raises(EvalConfigError, match="key 'name'"):
        load_task_spec(path)


# ---------------------------------------------------------------------------------------- data errors
@pytest.mark.parametrize(("line", "problem"), [
    ('{"id": "x", "question": ', "malformed JSON"),
    ({"id": "x", "answers": ["1"]}, "missing field 'question'"),
    ({"id": "x", "question": "Q?", "answers": {"text": "1"}}, "answers must be"),
    ({"id": "q0", "question": "Again?", "answers": ["1"]}, "duplicate id 'q0'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_line_raises_one_line_error_naming_task_file_and_line(tmp_path: Path, line: Any, problem: str) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", [*toy_rows(2), line])
    with pytest.raises(EvalDataError) as raised:
        load_examples(parse_task_spec(qa_config()), tmp_path)
    message = str(raised.value)
    assert message.startswith(f"task toy: {path}:3: ") and problem in message and "\n" not in message


def test_empty_task_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", ["", "  "])
    with pytest.raises(EvalDataError, match="no examples"):
        load_examples(parse_task_spec(qa_config()), tmp_path)


def test_missing_file_is_reported_as_missing(tmp_path: Path) -> None:
    with pytest.raises(TaskDataMissing, match=r"task toy: .*toy.jsonl: local file not found"):
        load_examples(parse_task_spec(qa_config()), tmp_path)


def test_null_context_in_an_open_book_task_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", toy_rows(2))
    spec = parse_task_spec(qa_config(prompt={"template": "{context}\nQ: {question}\nA:"}))
    with pytest.raises(EvalDataError, match=r"toy.jsonl:1: field context is null"):
        load_examples(spec, tmp_path)


def test_numeric_task_needs_numeric_gold(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", [*toy_rows(1), {"id": "w", "question": "Q?", "answers": ["many"]}])
    with pytest.raises(EvalDataError, match=r"toy.jsonl:2: no gold answer is a number"):
        load_examples(parse_task_spec(qa_config(metric="numeric")), tmp_path)


def test_field_templates_map_other_schemas(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", [{"Body": "Tom has 3 apples.", "Question": "How many?",
                                          "answer": {"aliases": ["3", "three"]}, "unanswerable": []}])
    spec = parse_task_spec(qa_config(fields={"id": None, "question": "{Body} {Question}",
                                             "answers": "{answer[aliases]}"}))
    assert load_examples(spec, tmp_path) == [EvalExample("toy-1", "Tom has 3 apples. How many?", None, ("3", "three"))]
    spec = parse_task_spec(qa_config(fields={"id": None, "question": "{Body}", "answers": "{unanswerable}"}))
    assert load_examples(spec, tmp_path)[0].answers == ("",)  # SQuAD v2 convention for "no answer"


def test_data_dir_comes_from_the_argument_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "..") == tmp_path / ".."
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(EvalDataError, match="absent: evaldata directory does not exist"):
        resolve_data_dir()


# ---------------------------------------------------------------------------------------- few-shot
def test_few_shot_prompt_is_deterministic_and_never_contains_the_query(tmp_path: Path) -> None:
    rows = toy_rows(12)
    rows.append({"id": "twin", "question": rows[0]["question"], "answers": ["0"]})  # same question, other id
    write_jsonl(tmp_path / "toy.jsonl", rows)
    spec = parse_task_spec(qa_config(fewshot={"k": 5, "seed": 7}))
    pool = load_examples(spec, tmp_path)
    query = pool[0]
    shots = select_shots(spec, query, pool)
    assert len(shots) == 5 and shots == select_shots(spec, query, pool)
    for example in pool:
        chosen = select_shots(spec, example, pool)
        assert all(s.id != example.id and s.question != example.question for s in chosen)
    assert "twin" not in {s.id for s in shots}
    prompt = build_prompt(spec, query, pool)
    assert prompt.endswith("\n\nQ: What is 0+0?\nA:") and prompt.count("Q: ") == 6
    assert prompt.count("What is 0+0?") == 1
    assert prompt.startswith(f"Q: {shots[0].question}\nA: {shots[0].answers[0]}\n\n")


def test_shots_do_not_depend_on_limit_or_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", toy_rows(20))
    spec = parse_task_spec(qa_config(fewshot={"k": 3, "seed": 1}))
    full = dict((ex.id, prompt) for ex, prompt in task_prompts(spec, tmp_path))
    limited = task_prompts(spec, tmp_path, limit=4)
    assert [ex.id for ex, _ in limited] == ["q0", "q1", "q2", "q3"]
    assert all(full[ex.id] == prompt for ex, prompt in limited)
    other_seed = parse_task_spec(qa_config(fewshot={"k": 3, "seed": 2}))
    assert task_prompts(other_seed, tmp_path, limit=4) != limited


def test_too_small_pool_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", toy_rows(3))
    with pytest.raises(EvalDataError, match="needs 5 shots"):
        task_prompts(parse_task_spec(qa_config(fewshot={"k": 5})), tmp_path)


def test_primitives_prompt_has_the_generator_layout() -> None:
    spec = load_task_spec(TASKS_DIR / "primitives_math_d1.yaml")
    (query, prompt), = task_prompts(spec, None, limit=1)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 6 and blocks[-1] == query.question + " "
    assert all(block.endswith("=? " + block[-1]) for block in blocks[:-1])  # "..., f=? 4"
    code = load_task_spec(TASKS_DIR / "primitives_code_d0.yaml")
    (query, prompt), = task_prompts(code, None, limit=1)
    assert prompt.endswith("\n\n" + query.question) and query.question.endswith(")\n")


def test_hub_source_maps_rows_and_filters_by_id_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        return [{"id": "english-1", "question": "Who?", "context": "Ann did it.", "answers": {"text": ["Ann"]}},
                {"id": "arabic-2", "question": "Who?", "context": "...", "answers": {"text": ["..."]}}]

    # a stand-in for the datasets package: the hub path runs, nothing touches the network
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    spec = load_task_spec(TASKS_DIR / "tydiqa_goldp.yaml")
    with pytest.raises(TaskDataMissing, match="hub loading is off"):
        load_examples(spec, tmp_path)
    examples = load_examples(spec, tmp_path, allow_hub=True)
    assert calls == [("google-research-datasets/tydiqa", "secondary_task", "validation")]
    assert examples == [EvalExample("english-1", "Who?", "Ann did it.", ("Ann",))]


# ---------------------------------------------------------------------------------------- the offline pack
@pytest.mark.skipif(resolve_data_dir() is None, reason="offline evaldata pack not found")
def test_offline_pack_loads_and_absent_tasks_are_missing() -> None:
    data_dir = resolve_data_dir()
    for spec in load_task_specs(["closed_book", "open_book", "math_word"]):
        if spec.name in {"drop", "coqa", "mawps_singleop"}:
            with pytest.raises(TaskDataMissing):
                task_prompts(spec, data_dir, limit=2)
        else:
            pairs = task_prompts(spec, data_dir, limit=2)
            assert len(pairs) == 2 and all(prompt.endswith("A:") or prompt.endswith("Answer:") for _, prompt in pairs)


def test_eval_errors_are_user_errors_that_keep_their_one_line_format() -> None:
    from loopreg.errors import UserError

    config = EvalConfigError("tasks/svamp.yaml", "metric", "unknown metric 'exactish'")
    data = TaskDataMissing("svamp", "/data/svamp.jsonl", "local file not found", line=None)
    assert isinstance(config, UserError) and isinstance(data, UserError)
    assert str(config) == "tasks/svamp.yaml: key 'metric': unknown metric 'exactish'" and config.field == "metric"
    assert str(data) == "task svamp: /data/svamp.jsonl: local file not found"
    under = config.at("callbacks.downstream_eval")  # a recipe entry puts its key path in front, once
    assert str(under) == "callbacks.downstream_eval: tasks/svamp.yaml: key 'metric': unknown metric 'exactish'"
    assert under.at("callbacks") is under
