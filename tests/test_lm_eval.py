"""``loopreg eval`` on any lm-eval task and the ``loopreg`` lm-eval model: a local task folder (generate_until,
multiple choice, rolling loglikelihood) at two loop counts through the CLI (and its old name ``loopreg lm-eval``);
loop count 1 of a keep-all retrofit scores exactly as the source through lm-eval's own ``hf`` model; loglikelihoods
and generations equal references computed with the model's own forward; one-line user errors."""

from __future__ import annotations

import contextlib
import io
import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopreg.loading import load

from .conftest import REPO, run_cli

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = "2x1+2x3+2x1"  # a keep-all retrofit of the 6-layer tiny Llama: at loop count 1 it is the source
TASKS = "loopreg_gen,loopreg_mc,loopreg_ppl"
GEN = [(f"Q: {a}+{b}=", str(a + b)) for a, b in [(1, 1), (2, 3), (12, 30), (7, 8), (100, 5), (3, 3)]]


def _task_folder(folder: Path) -> Path:
    """Three lm-eval tasks over local JSONL files (``dataset_path: json``; datasets' cache inside ``folder``)."""
    folder.mkdir(parents=True)
    rows = {"gen": [{"prompt": prompt, "answer": answer} for prompt, answer in GEN],
            "mc": [{"question": f"The color of item {i} is", "choices": [" red", " green", " blue"], "label": i % 3}
                   for i in range(6)],
            "ppl": [{"text": text} for text in ("the looped model thinks", "a short line",
                                                "another document of text to score here")]}
    for name, docs in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))

    def head(name: str) -> str:
        return (f"task: loopreg_{name}\ndataset_path: json\ntest_split: test\ndataset_kwargs: "
                f"{{data_files: {{test: {folder / name}.jsonl}}, cache_dir: {folder / 'datasets_cache'}}}\n")

    mean = "aggregation: mean\n    higher_is_better: true"
    (folder / "gen.yaml").write_text(head("gen") + f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list:
  - metric: exact_match
    {mean}
""")
    (folder / "mc.yaml").write_text(head("mc") + f"""output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    {mean}
  - metric: acc_norm
    {mean}
""")
    (folder / "ppl.yaml").write_text(head("ppl") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _task_folder(tmp_path_factory.mktemp("lm_eval") / "tasks")


def _surgery(source: Path, out: Path, *extra: str) -> Path:
    from loopreg.surgery.cli import cli_main

    with contextlib.redirect_stdout(io.StringIO()):
        cli_main([str(source), "--spec", SPEC, "--layers", "0-1,2-3,4-5", "--out", str(out), *extra])
    return out


@pytest.fixture(scope="module")
def keepall(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tied keep-all retrofit of ``source`` (layers 2-3 looped 3 times), written by ``loopreg surgery``."""
    return _surgery(source, tmp_path_factory.mktemp("keepall") / "model")


def _main(argv: list[str]) -> tuple[int, str]:
    from loopreg.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exited:
        main(argv)
    return int(exited.value.code or 0), out.getvalue()


@pytest.fixture(scope="module")
def sweep(keepall: Path, tasks: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``loopreg eval`` at loop counts 1 and 3: (results path, stdout)."""
    out = tmp_path_factory.mktemp("sweep") / "r.json"
    status, stdout = _main(["eval", str(keepall), "--loops", "1,3", "--tasks", TASKS, "--include-path", str(tasks),
                            "--out", str(out), "--batch-size", "4", "--device", "cpu"])
    assert status == 0
    return out, stdout


def _samples(out: Path, loops: int, task: str) -> list[dict]:
    folder = out.with_name(f"{out.stem}_loops{loops}_samples")
    lines = (folder / f"samples_loopreg_{task}.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda sample: sample["doc_id"])


def _results(out: Path, loops: int) -> dict:
    return json.loads(out.with_name(f"{out.stem}_loops{loops}.json").read_text())


FIRST_METRIC = {"gen": "exact_match", "mc": "acc", "ppl": "word_perplexity"}


def test_cli_writes_results_per_loop_count(sweep):
    out, stdout = sweep
    for loops, spec in ((1, "2x1+2x1+2x1"), (3, SPEC)):
        results = _results(out, loops)
        assert (results["schema"], results["loops"], results["spec"]) == ("loopreg.eval/1", loops, spec)
        assert {name: task["metric"] for name, task in results["tasks"].items()} == {
            f"loopreg_{task}": metric for task, metric in FIRST_METRIC.items()}
        assert results["tasks"]["loopreg_mc"]["n"] == 6
    assert "model@loops1" in stdout and "model@loops3" in stdout and "wrote" in stdout


def test_loop_count_changes_every_kind_of_output(sweep):
    out, _ = sweep
    for task in ("mc", "ppl"):  # loglikelihoods: every one moves with the loop count
        once, thrice = _samples(out, 1, task), _samples(out, 3, task)
        assert all(a["resps"] != b["resps"] for a, b in zip(once, thrice))
    generated = [[sample["resps"] for sample in _samples(out, loops, "gen")] for loops in (1, 3)]
    assert generated[0] != generated[1]
    ppl = [_results(out, loops)["tasks"]["loopreg_ppl"]["score"] for loops in (1, 3)]
    assert ppl[0] != ppl[1]


def test_keepall_at_loop_count_1_scores_as_the_source_through_hf(sweep, source, tasks):
    """The same numbers, exactly (the same layers run in the same order): scores and every response."""
    from lm_eval.tasks import TaskManager

    out, _ = sweep
    reference = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(source), "device": "cpu"}, batch_size=4, tasks=TASKS.split(","),
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True)
    ours = _results(out, 1)["tasks"]
    for task, metric in FIRST_METRIC.items():
        assert ours[f"loopreg_{task}"]["score"] == reference["results"][f"loopreg_{task}"][f"{metric},none"]
        theirs = sorted(reference["samples"][f"loopreg_{task}"], key=lambda sample: sample["doc_id"])
        assert [s["resps"] for s in _samples(out, 1, task)] == json.loads(json.dumps([s["resps"] for s in theirs]))


def test_the_old_command_name_is_an_alias(keepall, tasks, tmp_path, capsys):
    status, out, err = run_cli(["lm-eval", str(keepall), "--tasks", "loopreg_mc", "--include-path", str(tasks),
                                "--limit", "2", "--log-samples", "--out", str(tmp_path / "old")], capsys)
    assert status == 0 and "`loopreg lm-eval` is now `loopreg eval`" in err
    assert json.loads((tmp_path / "old" / "results.json").read_text())["tasks"]["loopreg_mc"]["n"] == 2


def _lm(folder: Path, loops: int | None, batch_size: int = 1):
    from loopreg.evals.lm_eval_model import LoopregLM

    return LoopregLM(str(folder), loops=loops, device="cpu", batch_size=batch_size)


def _reference_loglikelihood(model, tokenizer, context: str, continuation: str, loops: int) -> tuple[float, bool]:
    """log P(continuation | context) from one unpadded forward: log_softmax, gather, sum (as lm-eval does)."""
    ids = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), loops=loops)
        logprobs = torch.log_softmax(getattr(logits, "logits", logits), dim=-1)[0]  # HF output or LoopedLM tensor
    targets = torch.tensor(ids[start:])
    picked = logprobs[start - 1:].gather(-1, targets[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs[start - 1:].argmax(-1) == targets).all())


REQUESTS = [("Q: 1+1=", "2"), ("The color of item 4 is", " green"), ("a", " longer continuation here"),
            ("The color of item 4 is", " blue")]


def test_loglikelihood_equals_the_forward_reference(keepall):
    from lm_eval.api.instance import Instance

    model = load(keepall).eval()
    requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(REQUESTS)]
    # loops=2, not the model's own 3: an override that did not reach the model would fail
    single, batched = _lm(keepall, 2), _lm(keepall, 2, batch_size=3)
    reference = [_reference_loglikelihood(model, single.tokenizer, *pair, loops=2) for pair in REQUESTS]
    assert single.loglikelihood(requests, disable_tqdm=True) == reference  # the same computation: exact
    # Right-padded rows of another length: other kernel shapes, equal to float32 rounding
    got = batched.loglikelihood(requests, disable_tqdm=True)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in reference]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got]), torch.tensor([lp for lp, _ in reference]),
                               rtol=1e-5, atol=1e-5)
    own = [_reference_loglikelihood(model, single.tokenizer, *pair, loops=3)[0] for pair in REQUESTS]
    assert all(abs(a - b[0]) > 1e-3 for a, b in zip(own, reference))  # so the check above tells them apart


def test_loglikelihood_rolling_equals_the_forward_reference(keepall):
    from lm_eval.api.instance import Instance

    model, lm = load(keepall).eval(), _lm(keepall, 2)
    text = "the looped model thinks over latent thoughts"
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [lm.prefix_token_id] + lm.tokenizer(text)["input_ids"]  # one window: the prefix token, then every token
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]), loops=2).logits, dim=-1)[0]
    assert got == [float(logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum())]


def _reference_generation(model, tokenizer, prompt: str, loops: int, max_new_tokens: int) -> str:
    """Greedy decoding by full forwards (no cache, no padding), stopped at end-of-text and cut at a newline."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new]), loops=loops).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]


def test_generate_until_left_padded_batch_equals_single_and_the_reference(keepall):
    from lm_eval.api.instance import Instance

    model = load(keepall).eval()
    prompts = ["Q: 100+5=", "hi", "The color of item 4 is", "a b"]  # different lengths: left padding in a batch
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 6}), i)
                for i, p in enumerate(prompts)]
    single = _lm(keepall, 2).generate_until(requests, disable_tqdm=True)
    assert _lm(keepall, 2, batch_size=4).generate_until(requests, disable_tqdm=True) == single
    tokenizer = _lm(keepall, 2).tokenizer
    assert single == [_reference_generation(model, tokenizer, p, loops=2, max_new_tokens=6) for p in prompts]
    own = [_reference_generation(model, tokenizer, p, loops=3, max_new_tokens=6) for p in prompts]
    assert single != own  # the override reaches generate (the model's own count generates otherwise)


def test_registered_model_takes_lm_eval_model_args(keepall):
    from lm_eval.api.registry import get_model

    from loopreg.evals.lm_eval_model import LoopregLM

    lm = get_model("loopreg").create_from_arg_string(f"pretrained={keepall},loops=2,device=cpu", {"batch_size": 2})
    assert isinstance(lm, LoopregLM) and (lm.loops, lm.info.spec, lm.batch_size) == (2, "2x1+2x2+2x1", 2)
    assert lm.get_model_info()["model_num_parameters"] == sum(p.numel() for p in lm.model.parameters())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lm_eval_own_cli_runs_the_loopreg_model(keepall, tasks, tmp_path):
    """``python -m loopreg.evals.lm_eval_model`` is lm-eval's command line with ``--model loopreg`` registered
    (its default ``--device cuda:0`` runs on the CPU where there is no CUDA, as its ``hf`` model does)."""
    command = [sys.executable, "-m", "loopreg.evals.lm_eval_model", "--model", "loopreg", "--model_args",
               f"pretrained={keepall},loops=2", "--tasks", "loopreg_mc", "--include_path", str(tasks),
               "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert (results["config"]["loops"], results["config"]["spec"]) == (2, "2x1+2x2+2x1")
    assert "acc,none" in results["results"]["loopreg_mc"]


# ------------------------------------------------------------------------------------------------ user errors
@pytest.fixture(scope="module")
def untied(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _surgery(source, tmp_path_factory.mktemp("untied") / "model", "--untied")


@pytest.mark.parametrize("case, expected", [
    ("loops_text", "--loops: '1,x' is not a comma-separated list of integers"),
    ("loops_zero", "--loops: every loop count must be >= 1"),
    ("unknown_task", "--tasks: unknown task or group 'loopreg_gn' (did you mean 'loopreg_gen'?)"),
    ("include_path", "--include-path: "),
    ("missing_model", "not a model folder, a .gguf file, a Composer checkpoint or a hub id"),
    ("plain_model", "--loops: this LlamaForCausalLM does not loop"),
    ("untied_model", "--loops: loops=2 needs a tied looped model; this one is untied"),
])
def test_user_errors_are_one_line(case, expected, source, keepall, untied, tasks, tmp_path, capsys):
    model, loops, task = keepall, "2", "loopreg_gen"
    include = tasks
    if case == "loops_text":
        loops = "1,x"
    elif case == "loops_zero":
        loops = "0,2"
    elif case == "unknown_task":
        task = "loopreg_gn"
    elif case == "include_path":
        include = tmp_path / "no_such_folder"
    elif case == "missing_model":
        model = tmp_path / "no_such_model"
    elif case == "plain_model":
        model = source
    elif case == "untied_model":
        model = untied
    status, out, err = run_cli(["eval", str(model), "--loops", loops, "--tasks", task, "--include-path",
                                str(include), "--out", str(tmp_path / "out" / "r.json")], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "out").exists()  # nothing is written before every input is checked


def test_bad_batch_size_is_refused_by_the_parser(keepall, tmp_path, capsys):
    status, _, err = run_cli(["eval", str(keepall), "--tasks", "x", "--batch-size", "four", "--out",
                              str(tmp_path / "r.json")], capsys)
    assert status == 2 and "--batch-size: 'four' is not a positive integer, 'auto' or 'auto:N'" in err


# ------------------------------------------------------------------------------------------------ LoopedLM folders
VOCAB = string.ascii_lowercase + string.digits + " =?,\n()+:"


def _looped_lm_folder(folder: Path) -> Path:
    from loopreg import LoopedLM, LoopedLMConfig
    from loopreg.data.synthetic import char_tokenizer

    torch.manual_seed(0)
    tokenizer = char_tokenizer(VOCAB)
    LoopedLM(LoopedLMConfig(spec="1x1+2x3+1x1", vocab_size=tokenizer.get_vocab_size(), d_model=32, n_heads=4,
                            max_seq_len=128)).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_a_loopreg_folder_tokenizer_encodes_as_its_models_were_trained(tmp_path):
    """``<bos>`` first, then the character ids; end-of-text, BOS and pad named."""
    from tokenizers import Tokenizer

    from loopreg.evals.lm_eval_model import hf_tokenizer

    raw = Tokenizer.from_file(str(_looped_lm_folder(tmp_path / "model") / "tokenizer.json"))
    tokenizer = hf_tokenizer(raw)
    bos, eos = raw.token_to_id("<bos>"), raw.token_to_id("<eos>")
    assert tokenizer("a=1, b=?")["input_ids"] == [bos, *raw.encode("a=1, b=?", add_special_tokens=False).ids]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (bos, eos, "left")


def test_looped_lm_folder_loglikelihood_equals_its_forward(tmp_path):
    """Through lm-eval's HFLM (its batching and padding, which may take other kernels than one plain forward):
    equal to float32 rounding."""
    from lm_eval.api.instance import Instance

    folder = _looped_lm_folder(tmp_path / "model")
    lm, model = _lm(folder, 2), load(folder).eval()
    pairs = [("a=1, a=?", " 1"), ("q: 2+3=", "5")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    reference = [_reference_loglikelihood(model, lm.tokenizer, *pair, loops=2) for pair in pairs]
    assert [greedy for _, greedy in got] == [greedy for _, greedy in reference]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in reference], abs=1e-5)
