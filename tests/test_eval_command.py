"""``loopreg eval`` on lm-eval end to end with a tiny looped LoopedLM: a group and a missing task at two loop counts,
the results files ``loopreg report`` reads, the per-sample logs beside them, scores that are the means of those
samples, the request cache, the model's properties in the results, and one-line user errors that write nothing."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from loopreg import LoopedLM, LoopedLMConfig
from loopreg.data.synthetic import char_tokenizer
from tests.conftest import run_cli, tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = string.ascii_lowercase + string.digits + " =?,\n()"
PRIMITIVES = ["primitives_code_d0", "primitives_math_d0", "primitives_code_d1", "primitives_math_d1"]
MATH_WORD = ["svamp", "asdiv", "mawps_addsub", "mawps_multiarith", "mawps_singleeq", "mawps_singleop"]


def model_folder(tmp_path: Path, spec: str = "2x2") -> Path:
    """A random tiny LoopedLM folder with its character tokenizer (the reasoning primitives encode in it)."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer(VOCAB)
    model = LoopedLM(LoopedLMConfig(spec=spec, vocab_size=tokenizer.get_vocab_size(), d_model=32, n_heads=4,
                                    max_seq_len=256))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def samples(results: Path, task: str) -> dict[str, dict]:
    """lm-eval's per-sample log of ``task`` beside ``results``, by item id."""
    lines = (results.with_name(f"{results.stem}_samples") / f"samples_loopreg_{task}.jsonl").read_text().splitlines()
    return {sample["doc"]["id"]: sample for sample in map(json.loads, lines)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sweep(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``loopreg eval`` at loop counts 1 and 3 over the primitives group (generated) and the math-word group, whose
    files are not in the (empty) pack given."""
    out = tmp_path_factory.mktemp("eval") / "m.json"
    empty = tmp_path_factory.mktemp("empty_pack")
    from loopreg.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["eval", str(folder), "--groups", "reasoning_primitives,math_word", "--loops", "1,3", "--limit", "4",
              "--batch-size", "2", "--data-dir", str(empty), "--out", str(out)])
    assert exited.value.code == 0
    return out


def test_results_files_per_loop_count(sweep: Path) -> None:
    for loops in (1, 3):
        data = json.loads(sweep.with_name(f"m_loops{loops}.json").read_text())
        assert data["schema"] == "loopreg.eval/1"
        assert (data["model"], data["spec"], data["loops"]) == (f"model@loops{loops}", f"2x{loops}", loops)
        assert (data["params_units"], data["flops_units"]) == (2, 2 * loops)
        assert set(data["tasks"]) == {*PRIMITIVES, *MATH_WORD}
        for task in PRIMITIVES:
            entry = data["tasks"][task]
            assert (entry["n"], entry["metric"], entry["group"], entry["missing"]) == (4, "exact",
                                                                                       "reasoning_primitives", None)
            assert entry["random_baseline"] == 0.1
            # the score is the mean of the per-sample scores lm-eval logged beside it
            assert entry["score"] == pytest.approx(sum(s["score"] for s in samples(
                sweep.with_name(f"m_loops{loops}.json"), task).values()) / 4)
        svamp = data["tasks"]["svamp"]
        assert svamp["score"] is None and "math_word/svamp.jsonl: data file not found" in svamp["missing"]
        assert "$LOOPREG_EVALDATA" in svamp["missing"]
        group = data["groups"]["reasoning_primitives"]
        assert group["score"] == pytest.approx(sum(data["tasks"][t]["score"] for t in PRIMITIVES) / 4)
        assert (group["n_tasks"], group["n_defined"], group["missing"]) == (4, 4, [])
        assert (data["groups"]["math_word"]["score"], data["groups"]["math_word"]["missing"]) == (None, MATH_WORD)


def test_the_loop_count_reaches_the_generations(sweep: Path) -> None:
    once, thrice = ([sample["resps"] for task in PRIMITIVES for sample in samples(
        sweep.with_name(f"m_loops{loops}.json"), task).values()] for loops in (1, 3))
    assert len(once) == len(thrice) == 16 and once != thrice


def test_report_reads_the_results(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, err = run_cli(["report", str(sweep.parent), "--markdown", str(tmp_path / "t.md")], capsys)
    assert status == 0, err
    table = (tmp_path / "t.md").read_text()
    assert "model@loops1" in table and "model@loops3" in table


def test_the_request_cache_resumes_a_run(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """A rerun with the same --use-cache generates nothing again and writes the same results."""
    from loopreg.evals.lm_eval_model import LoopregLM

    argv = ["eval", str(folder), "--tasks", "primitives_code_d0", "--limit", "3", "--use-cache", str(tmp_path / "c")]
    assert run_cli([*argv, "--out", str(tmp_path / "a.json")], capsys)[0] == 0
    calls = []
    original = LoopregLM._model_generate
    monkeypatch.setattr(LoopregLM, "_model_generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert run_cli([*argv, "--out", str(tmp_path / "b.json")], capsys)[0] == 0
    assert calls == []
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert first["tasks"] == second["tasks"]


def test_any_lm_eval_task_runs_beside_loopreg_tasks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A task of another folder (``--include-path``) through the same command: its first metric is its score."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(3)))
    (tasks / "plus.yaml").write_text(f"""task: plus_one
dataset_path: json
dataset_kwargs: {{data_files: {{test: {tasks / 'docs.jsonl'}}}, cache_dir: {tmp_path / 'hf_cache'}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 3, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""")
    model = tiny_llama(tmp_path / "llama")
    status, out, err = run_cli(["eval", str(model), "--tasks", "plus_one,svamp", "--include-path", str(tasks),
                                "--limit", "3", "--out", str(tmp_path / "r.json")], capsys)
    assert status == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["spec"], data["loops"]) == ("6x1", 1)
    assert data["tasks"]["plus_one"]["metric"] == "exact_match" and data["tasks"]["plus_one"]["n"] == 3
    assert data["tasks"]["svamp"]["metric"] == "numeric" and data["tasks"]["svamp"]["n"] == 3


# ------------------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("case, expected", [
    ("unknown_task", "--tasks: unknown task or group 'svmap' (did you mean 'svamp'?)"),
    ("unknown_group", "--tasks: unknown task or group 'math_wrd' (did you mean 'math_word'?)"),
    ("limit_zero", "argument --limit: must be > 0 (a count, or a fraction below 1), got '0'"),
    ("limit_text", "argument --limit: 'lots' is not a number"),
    ("loops_on_plain", "--loops: this LlamaForCausalLM does not loop (spec none)"),
    ("loops_text", "--loops: '1,x' is not a comma-separated list of integers"),
    ("unwritable_out", "cannot write"),
    ("data_dir", "--data-dir: "),
    ("named_task_without_data", "drop.jsonl: data file not found (set $LOOPREG_EVALDATA to the eval pack"),
])
def test_user_errors_are_one_line_and_write_nothing(case: str, expected: str, folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "out" / "r.json"
    argv = {"unknown_task": ["--tasks", "svmap"], "unknown_group": ["--groups", "math_wrd"],
            "limit_zero": ["--tasks", "svamp", "--limit", "0"], "limit_text": ["--tasks", "svamp", "--limit", "lots"],
            "loops_on_plain": ["--tasks", "svamp", "--loops", "2"],
            "loops_text": ["--tasks", "svamp", "--loops", "1,x"], "unwritable_out": ["--tasks", "svamp"],
            "data_dir": ["--tasks", "svamp", "--data-dir", str(tmp_path / "no")],
            "named_task_without_data": ["--tasks", "svamp,drop"]}[case]
    model = tiny_llama(tmp_path / "llama") if case == "loops_on_plain" else folder
    if case == "unwritable_out":
        out = blocker / "r.json"  # a file where its folder should be
    status, stdout, err = run_cli(["eval", str(model), *argv, "--out", str(out)], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_malformed_data_is_an_error_not_a_missing_task(folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    rows = [json.dumps({"id": f"q{i}", "question": f"{i}+1?", "answers": [str(i + 1)]}) for i in range(2)]
    (tmp_path / "data" / "math_word").mkdir(parents=True)
    (tmp_path / "data" / "math_word" / "svamp.jsonl").write_text("\n".join([*rows, '{"question": "broken']) + "\n")
    status, _, err = run_cli(["eval", str(folder), "--tasks", "svamp", "--data-dir", str(tmp_path / "data"),
                              "--out", str(tmp_path / "out" / "r.json")], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"error: task svamp: {tmp_path / 'data' / 'math_word' / 'svamp.jsonl'}:3: malformed JSON" in err
    assert not (tmp_path / "out").exists()
