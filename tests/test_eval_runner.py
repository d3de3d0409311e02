"""The model-agnostic runner: scoring, sidecar predictions, resumption, missing tasks, atomic results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loopreg.evals import (RESULTS_SCHEMA, EvalDataError, GroupSpec, ModelInfo, TaskSpec, evaluate, load_results,
                           parse_task_spec, task_prompts, truncate_at_stop)


class GoldForEvenItems:
    """A fake model: the gold answer (plus a run-on next question) for even items, a wrong one otherwise."""

    def __init__(self, prompted: list[tuple[Any, str]], fail_after_calls: int | None = None):
        self.answers = {prompt: (ex.answers[0] if index % 2 == 0 else "wrong")
                        for index, (ex, prompt) in enumerate(prompted)}
        self.prompts_seen: list[str] = []
        self.fail_after_calls = fail_after_calls

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        if self.fail_after_calls is not None and len(self.prompts_seen) >= self.fail_after_calls * len(prompts):
            raise KeyboardInterrupt  # the run is killed mid-task
        self.prompts_seen += prompts
        return [f" {self.answers[prompt]}\nQ: and then?" for prompt in prompts]


def toy_task(name: str, metric: str = "exact_match", **overrides: Any) -> TaskSpec:
    return parse_task_spec({"name": name, "title": name.upper(), "group": "toy", "source": {"local": f"{name}.jsonl"},
                            "prompt": {"template": "Q: {question}\nA:"}, "fewshot": {"k": 1}, "metric": metric,
                            "max_new_tokens": 8, **overrides})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "evaldata"
    folder.mkdir()
    rows = [{"id": f"q{i}", "question": f"What is {i} times 3?", "context": None, "answers": [f"{3 * i:,}"]}
            for i in range(10)]
    (folder / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


GROUPS = {"toy": GroupSpec(name="toy", title="Toy", tasks=["qa", "absent"])}


def run(generator: Any, data_dir: Path, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    return evaluate(generator, [toy_task("qa"), toy_task("absent")], data_dir, batch_size=3,
                    sidecar_path=tmp_path / "run" / "predictions.jsonl", progress=False,
                    results_path=tmp_path / "run" / "eval.json", groups=GROUPS, **kwargs)


def test_truncate_at_stop_uses_the_earliest_stop() -> None:
    assert truncate_at_stop(" 42\n\nQ:", ["Q:", "\n"]) == " 42"
    assert truncate_at_stop(" 42", []) == " 42"


def test_scores_sidecar_and_results_file(data_dir: Path, tmp_path: Path) -> None:
    generator = GoldForEvenItems(task_prompts(toy_task("qa"), data_dir))
    results = run(generator, data_dir, tmp_path, model=ModelInfo.from_spec("loop-12x2", "12x2", perplexity=7.9))
    assert results["schema"] == RESULTS_SCHEMA
    assert (results["model"], results["spec"], results["loops"], results["params_units"], results["flops_units"]) == \
        ("loop-12x2", "12x2", 2, 12, 24)
    qa = results["tasks"]["qa"]
    assert (qa["score"], qa["n"], qa["metric"], qa["group"]) == (0.5, 10, "exact_match", "toy")
    assert 0.1 < qa["stderr"] < 0.25
    absent = results["tasks"]["absent"]
    assert absent["score"] is None and absent["n"] == 0 and "absent.jsonl: local file not found" in absent["missing"]
    assert results["groups"]["toy"] == {"score": 0.5, "stderr": pytest.approx(qa["stderr"]), "n_tasks": 1,
                                        "n_defined": 2, "missing": ["absent"]}
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == results
    assert load_results([tmp_path / "run" / "eval.json"])[0].info.perplexity == 7.9
    assert not list((tmp_path / "run").glob("*.tmp"))  # the atomic write left no temporary file
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(10)]
    assert records[0]["prediction"] == " 0" and records[0]["score"] == 1.0  # cut at the "\n" stop
    assert records[1]["prediction"] == " wrong" and records[1]["score"] == 0.0


def test_interrupted_run_resumes_without_redoing_examples(data_dir: Path, tmp_path: Path) -> None:
    prompted = task_prompts(toy_task("qa"), data_dir)
    with pytest.raises(KeyboardInterrupt):
        run(GoldForEvenItems(prompted, fail_after_calls=2), data_dir, tmp_path)
    sidecar = tmp_path / "run" / "predictions.jsonl"
    assert len(sidecar.read_text().splitlines()) == 6  # two batches of 3 were flushed
    assert not (tmp_path / "run" / "eval.json").exists()
    with sidecar.open("a") as handle:
        handle.write('{"task": "qa", "id": "q6", "req')  # a record cut short by the kill

    resumed = GoldForEvenItems(prompted)
    results = run(resumed, data_dir, tmp_path)
    assert resumed.prompts_seen == [prompt for _, prompt in prompted[6:]]
    assert results["tasks"]["qa"]["score"] == 0.5 and results["tasks"]["qa"]["n"] == 10
    assert len(sidecar.read_text().splitlines()) == 10

    again = GoldForEvenItems(prompted)
    assert run(again, data_dir, tmp_path)["tasks"]["qa"] == results["tasks"]["qa"]
    assert again.prompts_seen == []  # everything came from the sidecar


def test_a_changed_request_is_generated_again(data_dir: Path, tmp_path: Path) -> None:
    prompted = task_prompts(toy_task("qa"), data_dir)
    run(GoldForEvenItems(prompted), data_dir, tmp_path)
    longer = GoldForEvenItems(prompted)
    evaluate(longer, [toy_task("qa", max_new_tokens=16)], data_dir, sidecar_path=tmp_path / "run" / "predictions.jsonl",
             progress=False, groups=GROUPS)
    assert len(longer.prompts_seen) == 10


def test_numeric_metric_and_limit(data_dir: Path, tmp_path: Path) -> None:
    spec = toy_task("qa", metric="numeric")
    results = evaluate(GoldForEvenItems(task_prompts(spec, data_dir)), [spec], data_dir, limit=4, progress=False,
                       groups=GROUPS)
    assert (results["tasks"]["qa"]["score"], results["tasks"]["qa"]["n"]) == (0.5, 4)


def test_corrupt_sidecar_line_is_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    sidecar = tmp_path / "predictions.jsonl"
    sidecar.write_text('{"task": "qa", "id": "q0", "request": "x", "prediction": "0"}\nnot json\n{}\n')
    with pytest.raises(EvalDataError, match=rf"^{sidecar}:2: corrupt sidecar record"):
        evaluate(GoldForEvenItems([]), [toy_task("qa")], data_dir, sidecar_path=sidecar, progress=False)


def test_generator_returning_the_wrong_count_is_an_error(data_dir: Path) -> None:
    class Silent:
        def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
            return []

    with pytest.raises(ValueError, match="returned 0 completions for 10 prompts"):
        evaluate(Silent(), [toy_task("qa")], data_dir, batch_size=10, progress=False, groups=GROUPS)


class CountingGold(GoldForEvenItems):
    """:class:`GoldForEvenItems` that counts a prompt's length in characters and records its batches."""

    def __init__(self, prompted: list[tuple[Any, str]], fail_after_calls: int | None = None):
        super().__init__(prompted, fail_after_calls)
        self.batches: list[list[str]] = []

    def prompt_length(self, prompt: str) -> int:
        return len(prompt)

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        completions = super().generate(prompts, max_new_tokens, stop)
        self.batches.append(prompts)
        return completions


def test_batches_are_longest_first_and_scores_unchanged(data_dir: Path) -> None:
    spec = toy_task("qa")
    prompted = task_prompts(spec, data_dir)
    assert len({len(prompt) for _, prompt in prompted}) > 1  # the shots' answers give the prompts different lengths
    counting, plain = CountingGold(prompted), GoldForEvenItems(prompted)
    sorted_run = evaluate(counting, [spec], data_dir, batch_size=3, progress=False, groups=GROUPS)
    file_order_run = evaluate(plain, [spec], data_dir, batch_size=3, progress=False, groups=GROUPS)
    expected = sorted((prompt for _, prompt in prompted), key=lambda prompt: (-len(prompt), prompt))
    assert counting.batches == [expected[i:i + 3] for i in range(0, 10, 3)]
    assert plain.prompts_seen == [prompt for _, prompt in prompted]  # no prompt_length: file order
    assert sorted_run["tasks"] == file_order_run["tasks"]


def test_a_resumed_sorted_run_generates_only_the_rest(data_dir: Path, tmp_path: Path) -> None:
    spec = toy_task("qa")
    prompted = task_prompts(spec, data_dir)
    sidecar = tmp_path / "predictions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(CountingGold(prompted, fail_after_calls=2), [spec], data_dir, batch_size=3, sidecar_path=sidecar,
                 progress=False, groups=GROUPS)
    resumed = CountingGold(prompted)
    results = evaluate(resumed, [spec], data_dir, batch_size=3, sidecar_path=sidecar, progress=False, groups=GROUPS)
    expected = sorted((prompt for _, prompt in prompted), key=lambda prompt: (-len(prompt), prompt))
    assert resumed.prompts_seen == expected[6:]
    assert (results["tasks"]["qa"]["score"], results["tasks"]["qa"]["n"]) == (0.5, 10)
