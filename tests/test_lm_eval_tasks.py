"""The lm-eval task folder (``evals/lm_eval_tasks``): every task loads in lm-eval and renders the prompts of the
harness it replaced string for string, its metrics score as that harness's did, a data file added to the pack is
picked up, a missing one is one line naming it, and plain ``lm_eval`` runs a task with loopreg unimportable.

The reference, ``tests/data/harness_prompts.json``, was written by the harness at 6d7bde6
(``benchmarks/reference/harness_prompts.py``): per task the SHA-256 of the first 8 items' prompts and answers (the
eval data stays out of the repo), its stop strings, token budget and metric, and its metrics on fixed pairs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import run_without_loopreg, tiny_llama

FOLDER = Path(__file__).resolve().parents[1] / "evals" / "lm_eval_tasks"
REFERENCE = json.loads((Path(__file__).with_name("data") / "harness_prompts.json").read_text())


def _utils():
    spec = importlib.util.spec_from_file_location("loopreg_lm_eval_task_utils", FOLDER / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(FOLDER), include_defaults=False)


@pytest.mark.parametrize("name", sorted(REFERENCE["tasks"]))
def test_every_task_renders_the_harness_prompts(name, task_manager, monkeypatch):
    expected = REFERENCE["tasks"][name]
    monkeypatch.setenv("LOOPREG_EVALDATA", str(_utils().data_dir()))
    if "missing" in expected:  # not in the offline pack (DROP, CoQA, MAWPS-SingleOp): the task says so
        with pytest.raises(ValueError, match=rf"task {name}: .*{expected['missing']}: data file not found "
                                             r"\(set \$LOOPREG_EVALDATA"):
            task_manager.load_task_or_group([f"loopreg_{name}"])
        return
    task = task_manager.load_task_or_group([f"loopreg_{name}"])[f"loopreg_{name}"]
    docs = list(task.test_docs())[:len(expected["items"])]
    assert [{"id": doc["id"], "answers_sha256": _sha(json.dumps(list(doc["answers"]))),
             "prompt_sha256": _sha(task.doc_to_text(doc))} for doc in docs] == expected["items"]
    config = task.config
    assert config.generation_kwargs["until"] == (expected["stop"] or config.generation_kwargs["until"])
    assert config.generation_kwargs["max_gen_toks"] == expected["max_new_tokens"]
    assert config.process_results.__name__ == f"process_{expected['metric']}"


@pytest.mark.parametrize("metric", sorted(REFERENCE["metrics"]))
def test_metrics_equal_the_harness(metric):
    utils = _utils()
    for prediction, answers, value in REFERENCE["metrics"][metric]:  # the harness's F1 was torchmetrics' float32
        assert utils.METRICS[metric](prediction, answers) == pytest.approx(value, abs=1e-6), (prediction, answers)


def test_a_data_file_added_to_the_pack_is_picked_up(tmp_path, monkeypatch, task_manager):
    """The held-out-task path: DROP is not in the offline pack; a file at its path makes its YAML run."""
    rows = [{"id": f"d{i}", "question": f"How many goals in game {i}?", "context": f"Game {i} had {i} goals.",
             "answers": [str(i)]} for i in range(3)]
    (tmp_path / "open_book").mkdir()
    (tmp_path / "open_book" / "drop.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("LOOPREG_EVALDATA", str(tmp_path))
    task = task_manager.load_task_or_group(["loopreg_drop"])["loopreg_drop"]
    docs = list(task.test_docs())
    assert [doc["id"] for doc in docs] == ["d0", "d1", "d2"]
    assert docs[2]["prompt"].endswith("Game 2 had 2 goals.\n\nQ: How many goals in game 2?\nA:")
    shot = docs[2]["prompt"].split("\n\n")[0]  # its 1-shot example: another item of the same file
    assert shot in {"Game 0 had 0 goals.", "Game 1 had 1 goals."}


def test_a_missing_data_file_names_the_file_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPREG_EVALDATA", str(tmp_path))
    with pytest.raises(ValueError, match=rf"^task svamp: {tmp_path}/math_word/svamp.jsonl: data file not found "
                                         r"\(set \$LOOPREG_EVALDATA") as error:
        _utils().load(name="svamp", template="Q: {question}\nA:", local="math_word/svamp.jsonl")
    assert "\n" not in str(error.value)


def test_groups_are_plain_means_of_their_tasks(task_manager):
    import yaml

    def members(group: str) -> list[str]:
        return yaml.safe_load((FOLDER / f"loopreg_{group}.yaml").read_text())["task"]

    assert members("all_tasks") == members("closed_book") + members("open_book") + members("math_word")
    for group in ("closed_book", "open_book", "math_word", "reasoning_primitives", "synthetic", "all_tasks"):
        config = yaml.safe_load((FOLDER / f"loopreg_{group}.yaml").read_text())
        assert config["aggregate_metric_list"] == [{"metric": "score", "aggregation": "mean",
                                                    "weight_by_size": False}]


@pytest.mark.slow
def test_plain_lm_eval_runs_a_task_without_loopreg(tmp_path):
    """What a user without loopreg runs: lm-eval's own `hf` model and command line, and this folder."""
    model = tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    script = f"""
import sys
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval", "--model", "hf", "--model_args", "pretrained={model}", "--device", "cpu",
            "--include_path", "{FOLDER}", "--tasks", "loopreg_svamp", "--limit", "3", "--output_path", "{out}"]
cli_evaluate()
"""
    run_without_loopreg(script, {"LOOPREG_EVALDATA": str(_utils().data_dir())})
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["loopreg_svamp"]["score,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert results["n-samples"]["loopreg_svamp"]["effective"] == 3
