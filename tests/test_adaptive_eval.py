"""``loopreg eval --exit`` / ``--kv-policy`` end to end on a tiny LoopedLM (issue #17): the results fields, threshold 0
is the fixed-loop run, one-line errors, and ``loopreg report --compute`` over the files it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_cli
from .test_eval_command import model_folder as _model_folder
from .test_eval_command import samples

pytestmark = pytest.mark.usefixtures("single_thread")

TASKS = ("primitives_math_d0", "primitives_code_d0")


def _eval(capsys: pytest.CaptureFixture, folder: Path, out: Path, *extra: str) -> dict:
    status, _, err = run_cli(["eval", str(folder), "--tasks", ",".join(TASKS), "--limit", "4", "--batch-size", "2",
                              "--loops", "4", "--out", str(out), *extra], capsys)
    assert status == 0, err
    return json.loads(out.read_text())


def _predictions(results: Path) -> dict[tuple[str, str], str]:
    return {(task, item): sample["resps"] for task in TASKS for item, sample in samples(results, task).items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_folder(tmp_path_factory.mktemp("tiny"))


def test_threshold_zero_is_the_fixed_loop_run(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fixed = _eval(capsys, folder, tmp_path / "fixed.json")
    zero = _eval(capsys, folder, tmp_path / "kl0.json", "--exit", "kl:0")
    assert (fixed["exit"], fixed["kv_policy"]) == (None, None) and "mean_loops" not in fixed["tasks"][TASKS[0]]
    assert (zero["exit"], zero["kv_policy"], zero["model"]) == ("kl:0", "per_application", fixed["model"])
    for task in TASKS:
        assert zero["tasks"][task]["score"] == fixed["tasks"][task]["score"]
        assert zero["tasks"][task]["mean_loops"] == zero["tasks"][task]["executed_loops"] == 4.0  # never exits
    assert _predictions(tmp_path / "kl0.json") == _predictions(tmp_path / "fixed.json")


def test_a_loose_threshold_exits_after_the_first_iteration(folder: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    # an iteration never changes the residual stream by 100x its norm: every token exits at iteration 1
    loose = _eval(capsys, folder, tmp_path / "latent.json", "--exit", "latent:100", "--kv-policy", "shared")
    assert (loose["exit"], loose["kv_policy"]) == ("latent:100", "shared")
    for task in TASKS:
        assert loose["tasks"][task]["mean_loops"] == loose["tasks"][task]["executed_loops"] == 1.0


def test_each_loop_count_is_a_maximum_and_perplexity_counts_loops(folder: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "text.txt"
    text.write_text("a=1, b=2, b=? 2\nc=9, c=? 9\n" * 20)
    status, _, err = run_cli(["eval", str(folder), "--ppl-text", str(text), "--ppl-seq-len", "32", "--loops", "2,3",
                              "--exit", "kl:0", "--out", str(tmp_path / "ppl.json")], capsys)
    assert status == 0, err
    for loops in (2, 3):
        data = json.loads((tmp_path / f"ppl_loops{loops}.json").read_text())
        assert data["loops"] == loops and data["perplexity"] > 1
        assert data["perplexity_loops"] == {"mean_loops": loops, "executed_loops": loops}


def test_report_compute_over_the_eval_files(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    _eval(capsys, folder, runs / "fixed.json")
    _eval(capsys, folder, runs / "kl0.json", "--exit", "kl:0")
    _eval(capsys, folder, runs / "latent100.json", "--exit", "latent:100")
    status, out, err = run_cli(["report", str(runs), "--compute", "--json", str(tmp_path / "c.json")], capsys)
    assert status == 0, err
    rows = [row["values"] for row in json.loads((tmp_path / "c.json").read_text())["rows"]]
    tasks = [*TASKS, "mean (2 tasks)"]
    assert [(r["Exit"], r["Task"]) for r in rows] == [(rule, task) for rule in (None, "kl:0", "latent:100")
                                                     for task in tasks]
    assert all(r["Δ acc"] == 0 and r["Fewer"] == 0 for r in rows[:6])
    assert all(r["Fewer"] == 75 for r in rows[6:])  # 1 of 4 iterations
    assert "model@loops4" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--exit", "foo:0.1"], "--exit: unknown criterion 'foo' in 'foo:0.1'; valid: kl, latent"),
    (["--exit", "kl:-1"], "--exit: threshold"),
    (["--exit", "kl:lots"], "--exit: threshold 'lots' in 'kl:lots' is not a number"),
    (["--exit", "kl"], "--exit: 'kl' is not CRITERION:THRESHOLD"),
    (["--kv-policy", "latest"], "--kv-policy: unknown policy 'latest'; valid: per_application, shared"),
])
def test_bad_exit_and_kv_policy_are_one_line_errors(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    argv: list[str], message: str) -> None:
    status, out, err = run_cli(["eval", str(folder), "--tasks", TASKS[0], "--out", str(tmp_path / "x.json"), *argv],
                               capsys)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and message in err


def test_exit_on_a_model_that_does_not_loop_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flat = _model_folder(tmp_path, "2x1")
    status, _, err = run_cli(["eval", str(flat), "--tasks", TASKS[0], "--exit", "kl:0.01",
                              "--out", str(tmp_path / "x.json")], capsys)
    assert status == 2 and err.count("\n") == 1 and "--exit: this LoopedLM does not loop (spec 2x1)" in err


def test_a_tied_retrofit_generates_with_an_exit_rule() -> None:
    """lm-eval's model passes the rule to a tied HF retrofit's generate (LoopedCausalLM): threshold 0 gives the
    fixed-loop completions and the maximum iterations; a loose one exits every token after iteration 1."""
    from lm_eval.api.instance import Instance

    from loopreg.errors import UserError
    from loopreg.evals.lm_eval_model import LoopregLM

    from .test_loop_override import keep_all_llama_retrofit

    tokenizer, source, looped = keep_all_llama_retrofit()
    requests = [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6}), index)
                for index, prompt in enumerate(["a=1, b=2, b=", "xy"])]

    def generate(**options) -> tuple[list[str], LoopregLM]:
        lm = LoopregLM(looped, loops=3, tokenizer=tokenizer, device="cpu", batch_size=2, **options)
        return lm.generate_until(requests, disable_tqdm=True), lm

    fixed, _ = generate()
    for rule, kv_policy, loops in (("kl:0", "per_application", 3.0), ("latent:100", "shared", 1.0)):
        completions, lm = generate(exit=rule, kv_policy=kv_policy)
        stats = lm.exit_stats
        assert stats.tokens > 0 and stats.mean_loops == stats.executed_loops == loops
        if rule == "kl:0":
            assert completions == fixed
    with pytest.raises(UserError, match="--exit: this LlamaForCausalLM does not loop"):
        LoopregLM(source, tokenizer=tokenizer, exit="kl:0.1", device="cpu")
