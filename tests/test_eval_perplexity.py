"""Perplexity equals the model's own ``labels=`` loss and a log_softmax hand computation on the same windows,
for a Hugging Face Llama with its HF tokenizer and a LoopedLM with a ``tokenizers.Tokenizer``; the CLI
stores it and ``loopreg report`` shows it in the PPL column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopreg.data.text import EOS_TOKEN, byte_level_tokenizer
from loopreg.evals import load_results, perplexity, report_main, text_windows
from loopreg.evals.cli import cli_main as eval_cli
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.surgery import loop_surgery
from loopreg.surgery.cli import cli_main as surgery_cli
from loopreg.loading import load

from .conftest import hf_byte_tokenizer, run_cli

DOCS = ["the looped model applies its block again.", "latent thoughts: a=1, b=2, so b=2!",
        "a third, longer document about reasoning with depth, loops and shared weights."]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS))
    return path


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def hand_nll(logits_of, windows: torch.Tensor) -> float:
    """Mean next-token NLL over all windows, one window at a time, in float64."""
    total, count = 0.0, 0
    for window in windows:
        log_probs = torch.log_softmax(logits_of(window[None])[0, :-1].double(), dim=-1)
        total -= log_probs.gather(-1, window[1:, None]).sum().item()
        count += len(window) - 1
    return total / count


def stream(encode, eos: int) -> list[int]:
    return [token for doc in DOCS for token in encode(doc) + [eos]]


def test_windows_join_documents_with_eos_and_start_with_bos(text_file: Path) -> None:
    tokenizer = hf_byte_tokenizer()
    ids = stream(lambda doc: tokenizer(doc, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
    windows = text_windows(tokenizer, str(text_file), seq_len=16)
    chunks = [ids[i:i + 15] for i in range(0, len(ids) - 14, 15)]  # the last partial window is dropped
    assert windows.tolist() == [[tokenizer.bos_token_id] + chunk for chunk in chunks]
    assert text_windows(tokenizer, str(text_file), seq_len=16, max_windows=2).tolist() == windows[:2].tolist()


def test_windows_without_bos_are_the_plain_stream(text_file: Path) -> None:
    tokenizer = byte_level_tokenizer()
    ids = stream(lambda doc: tokenizer.encode(doc).ids, tokenizer.token_to_id(EOS_TOKEN))
    windows = text_windows(tokenizer, str(text_file), seq_len=16)
    assert windows.tolist() == [ids[i:i + 16] for i in range(0, len(ids) - 15, 16)]


def test_hf_perplexity_equals_labels_loss_and_hand_computation(text_file: Path) -> None:
    tokenizer = hf_byte_tokenizer()
    model = tiny_llama(len(tokenizer)).eval()
    result = perplexity(model, tokenizer, str(text_file), seq_len=16, max_tokens=None, batch_size=3)
    windows = text_windows(tokenizer, str(text_file), seq_len=16)
    assert (result.windows, result.tokens) == (len(windows), 15 * len(windows)) and len(windows) % 3 != 0
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
        hand = hand_nll(lambda ids: model(input_ids=ids).logits, windows)
    labels_nll = sum(15 * loss for loss in losses) / result.tokens  # token-weighted over the windows
    assert result.nll == pytest.approx(labels_nll, rel=1e-5) and result.nll == pytest.approx(hand, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(labels_nll), rel=1e-5)


def test_max_tokens_takes_whole_windows(text_file: Path) -> None:
    tokenizer = hf_byte_tokenizer()
    result = perplexity(tiny_llama(len(tokenizer)), tokenizer, str(text_file), seq_len=16, max_tokens=16)
    assert (result.windows, result.tokens) == (2, 30)  # ceil(16 / 15) windows


def test_looped_lm_perplexity_with_loop_override(text_file: Path) -> None:
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    model = LoopedLM(LoopedLMConfig(spec="2x2", vocab_size=tokenizer.get_vocab_size(), d_model=32, n_heads=4,
                                    d_ff=64, max_seq_len=32)).eval()
    result = perplexity(model, tokenizer, str(text_file), max_tokens=None, loops=3)
    windows = text_windows(tokenizer, str(text_file), seq_len=32)  # default: min(512, max_seq_len)
    assert result.windows == len(windows) >= 2
    with torch.no_grad():
        hand = hand_nll(lambda ids: model(ids, loops=3).logits, windows)
        stored = hand_nll(lambda ids: model(ids).logits, windows)
    assert result.nll == pytest.approx(hand, rel=1e-5) and abs(hand - stored) > 1e-4  # the override is used


def test_tied_hf_retrofit_perplexity_with_loop_override(text_file: Path) -> None:
    tokenizer = hf_byte_tokenizer()
    model = loop_surgery(tiny_llama(len(tokenizer)), "1x1+1x2").eval()  # 2 distinct layers, middle looped
    result = perplexity(model, tokenizer, str(text_file), seq_len=16, max_tokens=None, loops=4)
    windows = text_windows(tokenizer, str(text_file), seq_len=16)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None], loops=4).loss.item() for w in windows]
        stored = hand_nll(lambda ids: model(input_ids=ids).logits, windows)
    assert result.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5) and abs(result.nll - stored) > 1e-4


def test_short_source_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short")
    tokenizer = hf_byte_tokenizer()
    with pytest.raises(ValueError, match=r"short.txt: the text is shorter than one window of 64 tokens") as err:
        perplexity(tiny_llama(len(tokenizer)), tokenizer, str(short))
    assert "\n" not in str(err.value)


@pytest.fixture
def llama_folder(tmp_path: Path) -> Path:
    tokenizer = hf_byte_tokenizer()
    folder = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_cli_stores_hf_perplexity_and_report_shows_it(llama_folder: Path, text_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval" / "llama.json"
    assert eval_cli([str(llama_folder), "--ppl-text", str(text_file), "--ppl-seq-len", "16", "--ppl-tokens", "30",
                     "--out", str(out)]) == 0
    tokenizer = hf_byte_tokenizer()
    expected = perplexity(LlamaForCausalLM.from_pretrained(llama_folder), tokenizer, str(text_file), seq_len=16,
                          max_tokens=30)
    stored = json.loads(out.read_text())["perplexity"]
    assert stored == pytest.approx(expected.ppl, rel=1e-6) and load_results([out])[0].info.perplexity == stored
    markdown = tmp_path / "t.md"
    assert report_main([str(out), "--markdown", str(markdown)]) == 0
    row = next(line for line in markdown.read_text().splitlines() if line.startswith("| tiny-llama |"))
    assert row.split(" | ")[2] == f"{expected.ppl:.2f}"  # the PPL ↓ column
    capsys.readouterr()


def test_eval_cli_loop_sweep_of_a_retrofit_stores_each_perplexity(llama_folder: Path, text_file: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    retrofit = tmp_path / "retrofit"
    assert surgery_cli([str(llama_folder), "--spec", "1x1+1x2", "--out", str(retrofit)]) == 0
    out = tmp_path / "eval" / "retrofit.json"
    assert eval_cli([str(retrofit), "--ppl-text", str(text_file), "--ppl-seq-len", "16", "--loops", "1,3",
                     "--out", str(out)]) == 0
    model, tokenizer, stored = load(retrofit), hf_byte_tokenizer(), []
    for loops, depth in ((1, 2), (3, 4)):
        data = json.loads((tmp_path / "eval" / f"retrofit_loops{loops}.json").read_text())
        expected = perplexity(model, tokenizer, str(text_file), seq_len=16, loops=loops).ppl
        assert (data["model"], data["flops_units"]) == (f"retrofit@loops{loops}", depth)
        assert data["perplexity"] == pytest.approx(expected, rel=1e-6)
        stored.append(data["perplexity"])
    assert stored[0] != pytest.approx(stored[1], rel=1e-4)  # each loop count was scored with its own override
    capsys.readouterr()


def test_eval_cli_short_ppl_text_exits_2_with_one_line(llama_folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short")
    status, _, err = run_cli(["eval", str(llama_folder), "--ppl-text", str(short), "--out", str(tmp_path / "x.json")],
                             capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and "short.txt" in err
