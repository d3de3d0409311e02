"""The lm-eval task folder (``evals/lm_eval_tasks``): every task loads in lm-eval and renders the harness's prompts
string for string, its metrics score as the harness's do, a missing data file is one line naming it, and plain
``lm_eval`` runs a task with loopreg unimportable."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from loopreg.evals.metrics import METRICS as HARNESS_METRICS
from loopreg.evals.tasks import TaskDataMissing, load_task_specs, resolve_data_dir, task_prompts
from tests.conftest import run_without_loopreg, tiny_llama

FOLDER = Path(__file__).resolve().parents[1] / "evals" / "lm_eval_tasks"
ITEMS = 8  # items compared per task


def _utils():
    spec = importlib.util.spec_from_file_location("loopreg_lm_eval_task_utils", FOLDER / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(FOLDER), include_defaults=False)


@pytest.mark.parametrize("spec", load_task_specs(), ids=lambda spec: spec.name)
def test_every_task_renders_the_harness_prompts(spec, task_manager, monkeypatch):
    data_dir = resolve_data_dir()
    monkeypatch.setenv("LOOPREG_EVALDATA", str(data_dir))
    try:
        expected = task_prompts(spec, data_dir, limit=ITEMS)
    except TaskDataMissing:  # not in the offline pack (DROP, CoQA, MAWPS-SingleOp): the new task says so too
        with pytest.raises(ValueError, match=rf"task {spec.name}: .*{spec.source.local}: data file not found "
                                             r"\(set \$LOOPREG_EVALDATA"):
            task_manager.load_task_or_group([f"loopreg_{spec.name}"])
        return
    task = task_manager.load_task_or_group([f"loopreg_{spec.name}"])[f"loopreg_{spec.name}"]
    docs = list(task.test_docs())[:ITEMS]
    assert [task.doc_to_text(doc) for doc in docs] == [prompt for _, prompt in expected]
    assert [(doc["id"], tuple(doc["answers"])) for doc in docs] == [(ex.id, ex.answers) for ex, _ in expected]
    config = task.config
    assert config.generation_kwargs["until"] == (spec.stop or config.generation_kwargs["until"])
    assert config.generation_kwargs["max_gen_toks"] == spec.max_new_tokens
    assert config.process_results.__name__ == f"process_{spec.metric.value}"


PAIRS = [("The Beatles!", ["beatles"]), ("an apple", ["Apple"]), ("big cat", ["the big dog"]), ("", [""]),
         ("something", [""]), ("", ["an answer"]), (" 42\n", ["42"]), ("It costs $1,000.", ["1000"]),
         ("0.6667 apples", ["0.6666666666666666"]), ("2.50", ["2.5"]), ("-3 degrees", ["-3"]), ("no number", ["7"]),
         (" a", ["a"]), ("a", ["b", "a"]), ("Paris, France", ["paris", "France"]), ("the the", ["the"]),
         ("1,000 people", ["1000 people"]), ("x y z", ["x z y w"]), (".5", ["0.5"])]


@pytest.mark.parametrize("metric", sorted(HARNESS_METRICS))
def test_metrics_equal_the_harness(metric):
    utils = _utils()
    for prediction, answers in PAIRS:  # the harness's F1 is torchmetrics', in float32 percent: 1e-6 apart at most
        assert utils.METRICS[metric](prediction, answers) == pytest.approx(
            HARNESS_METRICS[metric](prediction, answers), abs=1e-6), (metric, prediction, answers)


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
    run_without_loopreg(script, {"LOOPREG_EVALDATA": str(resolve_data_dir())})
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["loopreg_svamp"]["score,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert results["n-samples"]["loopreg_svamp"]["effective"] == 3
