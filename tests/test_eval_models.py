"""Model-side eval: batched left-padded greedy generation equals one-by-one generation; the HF generator's
token counts and cached stop criteria; the CLI end to end."""

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from loopreg import LoopedLM, LoopedLMConfig
from loopreg.data.synthetic import char_tokenizer
from loopreg.evals.models import ModelGenerator, model_info
from tests.conftest import tiny_llama

VOCAB = string.ascii_lowercase + string.digits + " =?,\n()"


def _model_folder(tmp_path: Path, spec: str = "2x2") -> Path:
    torch.manual_seed(0)
    tokenizer = char_tokenizer(VOCAB)
    model = LoopedLM(LoopedLMConfig(spec=spec, vocab_size=tokenizer.get_vocab_size(), d_model=32, n_heads=4,
                                    max_seq_len=256))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_batched_generation_equals_single(tmp_path):
    folder = _model_folder(tmp_path)
    model, tokenizer = LoopedLM.from_pretrained(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    generator = ModelGenerator(model, tokenizer, loops=3)
    prompts = ["a=1, b=2, b=? ", "c=9, c=? ", "a=1, b=2, c=3, d=4, a=? "]
    batched = generator.generate(prompts, max_new_tokens=6, stop=[])
    single = [generator.generate([p], max_new_tokens=6, stop=[])[0] for p in prompts]
    assert batched == single


def test_stop_sequences_end_generation_early(tmp_path):
    folder = _model_folder(tmp_path)
    model, tokenizer = LoopedLM.from_pretrained(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    generator = ModelGenerator(model, tokenizer)
    free = generator.generate(["a=1, a=? "], max_new_tokens=12, stop=[])[0]
    stop = free[2] if len(free) > 2 else free[:1]
    stopped = generator.generate(["a=1, a=? "], max_new_tokens=12, stop=[stop])[0]
    assert stop in stopped and len(stopped) <= len(free)
    assert free.startswith(stopped[: stopped.index(stop)])


def test_model_info_units(tmp_path):
    model = LoopedLM.from_pretrained(_model_folder(tmp_path, "4x(1,2,1)"))
    info = model_info("m", model, loops=3)
    assert (info.spec, info.params_units, info.flops_units) == ("4x(1,3,1)", 12, 20)


@pytest.mark.slow
def test_eval_cli_loop_sweep_and_report(tmp_path):
    folder = _model_folder(tmp_path)
    out = tmp_path / "eval" / "m.json"
    run = lambda *args: subprocess.run([sys.executable, "-m", "loopreg.cli", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    result = run("eval", str(folder), "--groups", "reasoning_primitives", "--limit", "3", "--loops", "1,2",
                 "--batch-size", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    for loops in (1, 2):
        data = json.loads((tmp_path / "eval" / f"m_loops{loops}.json").read_text())
        assert data["spec"] == f"2x{loops}" and data["flops_units"] == 2 * loops
        assert set(data["tasks"]) == {"primitives_math_d0", "primitives_math_d1", "primitives_code_d0",
                                      "primitives_code_d1"}
    report = run("report", str(tmp_path / "eval"), "--markdown", str(tmp_path / "t.md"))
    assert report.returncode == 0, report.stderr
    assert "model@loops2" in (tmp_path / "t.md").read_text()
    bad = run("eval", str(folder), "--tasks", "nope", "--out", str(out))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope" in bad.stderr


def test_hf_generator_counts_tokens_and_stops_like_stop_strings(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    generator = ModelGenerator(model, tokenizer)
    prompts = ["a=1, b=2, b=? ", "c=9, c=? "]
    assert [generator.prompt_length(p) for p in prompts] == [len(tokenizer(p)["input_ids"]) for p in prompts]
    free = generator.generate(prompts, max_new_tokens=12, stop=[])
    stop = [next(c for c in free[0][1:] if c.isascii() and c.isalnum())]  # produced, so generation stops early
    batch = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    reference = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, stop_strings=stop, tokenizer=tokenizer)
    reference = [tokenizer.decode(row, skip_special_tokens=True) for row in reference[:, batch["input_ids"].shape[1]:]]
    for _ in range(2):  # the second call reuses the criteria built by the first
        assert generator.generate(prompts, max_new_tokens=12, stop=stop) == reference
    assert len(reference[0]) < len(free[0]) and free[0].startswith(reference[0])


def test_windowed_stop_criterion_equals_decoding_the_whole_completion():
    """The stop check decodes only a row's newest tokens; at every step it must agree with a check over the row's
    whole decoded completion (byte-level tokens, multi-byte characters and stop strings included)."""
    from loopreg.data.text import byte_level_tokenizer
    from loopreg.evals.models import _DecodedStop, _Tokens

    tokens = _Tokens(byte_level_tokenizer())
    stop = ["\n\n", "é!", "Q:"]
    rows = ["ab\n\ncd", "xyé!", "no stop here at all", "héllo Q: world", "ééé\n"]
    encoded = [tokens.encode("prompt")[:2] + tokens.encode(text) for text in rows]
    length = max(map(len, encoded))
    ids = torch.tensor([row + [tokens.encode(" ")[0]] * (length - len(row)) for row in encoded])
    criterion, width = _DecodedStop(tokens, stop, 2), 2
    for end in range(width + 1, length + 1):
        expected = [any(s in tokens.decode(row[width:end]) for s in stop) for row in ids.tolist()]
        assert criterion(ids[:, :end], None).tolist() == expected
    assert criterion(ids, None).tolist() == [True, True, False, True, False]
