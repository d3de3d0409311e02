"""Layer analysis (``loopreg layers``) and ``loopreg surgery --spec auto``: exact per-layer angular distance and
block influence, the knee split, the keep-all proposal, the CLIs and their one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopreg.cli import main as loopreg_main
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.surgery import (Split, calibration_tokens, find_adapter, layer_analysis, loop_surgery,
                             plan_surgery, propose_split, token_windows)
from loopreg.surgery.core import stored_layers
from loopreg.loading import load

from .conftest import hf_byte_tokenizer
from .test_error_audit import _error_line
from .test_surgery_models import BUILDERS, FAMILIES, LAYERS, VOCAB, logits

IDENTITY = (1, 2, 3, 4)  # layers made the identity: first layer, four pass-through layers, last layer
BATCHES = [torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2)),
           torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))]


pytestmark = pytest.mark.usefixtures("single_thread")


def build(family: str, identity: tuple[int, ...] = ()) -> torch.nn.Module:
    """The tiny ``family`` model (eval mode) with the layers in ``identity`` passing the residual unchanged:
    their attention output and MLP down projections (weights and biases) are zero."""
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    adapter = find_adapter(model)
    with torch.no_grad():
        for index in identity:
            layer = stored_layers(model)[index]
            for role in ("attn_o", "mlp_down"):
                name = adapter.roles[role]
                layer.get_parameter(name).zero_()
                bias = name.removesuffix("weight") + "bias"
                if bias in dict(layer.named_parameters()):
                    layer.get_parameter(bias).zero_()
    return model


def reference_states(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(h_in, h_out) of every layer, independently of the hooks: LoopedLM's hidden states (``output_hidden``)
    after its embedding; for HF models ``output_hidden_states`` (whose last entry is after the final norm, so
    the last layer is left out)."""
    if isinstance(model, LoopedLM):
        states = [model.embed(ids), *model(ids, output_hidden=True).hidden_states.values()]
        return list(zip(states[:-1], states[1:]))
    hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    return list(zip(hidden[:-2], hidden[1:-1]))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_matches_float64_reference(family):
    model = build(family)
    analysis = layer_analysis(model, BATCHES)
    per_batch = [reference_states(model, ids) for ids in BATCHES]
    assert analysis.tokens == sum(ids.numel() for ids in BATCHES)
    for layer in range(len(per_batch[0])):
        cos = torch.cat([torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1).flatten()
                         for states in per_batch for h_in, h_out in [states[layer]]])
        assert analysis.angular_distance[layer] == pytest.approx((cos.clamp(-1, 1).acos() / math.pi).mean().item(),
                                                                 abs=2e-6)
        assert analysis.block_influence[layer] == pytest.approx((1 - cos).mean().item(), abs=2e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_layers_have_distance_zero_and_set_the_split(family):
    analysis = layer_analysis(build(family, IDENTITY), BATCHES)
    for layer in range(LAYERS):
        if layer in IDENTITY:
            assert analysis.angular_distance[layer] == pytest.approx(0, abs=1e-6)
            assert analysis.block_influence[layer] == pytest.approx(0, abs=1e-6)
        else:
            assert analysis.angular_distance[layer] > 1e-3 and analysis.block_influence[layer] > 1e-5
    # curve (a, 0, 0, 0, 0, f): the encoder ends at the first zero, the decoder's knee is the last zero
    assert analysis.split() == Split(encoder=1, thinking=4, decoder=1)
    assert analysis.to_json(loops=3) | {"angular_distance": None, "block_influence": None} == {
        "tokens": 31, "angular_distance": None, "block_influence": None,
        "split": {"encoder": 1, "thinking": 4, "decoder": 1}, "loops": 3, "spec": "1x1+4x3+1x1", "layer_map": "0,1-4,5"}


@pytest.mark.parametrize("curve, expected", [
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.06, 0.055, 0.05, 0.045, 0.04] + [0.05 + 0.01 * k for k in range(1, 19)],
     (7, 5, 18)),                                    # ETD shape on 30 layers: steep, flat, slow rise
    ([0.9, 0.3, 0.12, 0.1, 0.11, 0.1, 0.3, 0.7], (1, 5, 2)),
    ([0.8, 0.4, 0.2, 0.1], (1, 3, 0)),               # no rise: no decoder
    ([0.1, 0.2, 0.4, 0.8], (0, 3, 1)),               # no fall: no encoder
    ([0.3, 0.1, 0.3], (1, 1, 1)),
    ([0.2, 0.2, 0.2, 0.2], (0, 1, 3)),               # flat: no knee, the thinking block is the first minimum
    ([0.5], (0, 1, 0)),
])
def test_knee_rule_on_synthetic_curves(curve, expected):
    split = propose_split(curve)
    assert (split.encoder, split.thinking, split.decoder) == expected
    assert propose_split([10 * v + 3 for v in curve]) == split  # the knee ignores the curve's scale and offset
    for loops in (1, 2, 5):
        plan = plan_surgery(len(curve), split.spec(loops), layers=split.layer_map())
        assert [seed for seeds in plan.seeds for seed in seeds] == list(range(len(curve)))  # every layer, once
        assert plan.spec.effective_depth == len(curve) + (loops - 1) * split.thinking


def test_proposal_text():
    assert str(Split(7, 5, 18).spec(2)) == "7x1+5x2+18x1" and Split(7, 5, 18).layer_map() == "0-6,7-11,12-29"
    assert str(Split(0, 4, 0).spec(3)) == "4x3" and Split(0, 4, 0).layer_map() == "0-3"
    with pytest.raises(ValueError, match="--loops"):
        Split(1, 1, 1).spec(0)
    with pytest.raises(ValueError, match="finite"):
        propose_split([0.1, float("nan")])


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_surgery_with_the_proposal_at_loops_1_keeps_the_logits(family):
    model = build(family)
    before = logits(model, BATCHES[0])
    split = layer_analysis(model, BATCHES).split()
    looped = loop_surgery(model, split.spec(loops=1), layers=split.layer_map())
    assert len(stored_layers(looped)) == LAYERS
    torch.testing.assert_close(logits(looped, BATCHES[0]), before, rtol=0, atol=1e-5)


def test_tied_looped_source_is_refused():
    model = LoopedLM(LoopedLMConfig(spec="1x1+2x2+1x1", vocab_size=VOCAB, d_model=32, n_heads=4))
    with pytest.raises(ValueError, match=r"looped \('1x1\+2x2\+1x1': 4 stored layers run 6 times\)"):
        layer_analysis(model, BATCHES)


def test_token_windows():
    model = LoopedLM(LoopedLMConfig(spec="2x1", vocab_size=VOCAB, d_model=32, n_heads=4, max_seq_len=100))
    batches = token_windows(model, torch.arange(1050), batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 100), (4, 100), (2, 100), (1, 50)]
    assert torch.equal(torch.cat([b.flatten() for b in batches]), torch.arange(1050))
    assert [tuple(b.shape) for b in token_windows(model, torch.arange(30))] == [(1, 30)]


# ---------------------------------------------------------------- CLIs on a tiny Llama folder
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama (6 layers, layers 1-4 the identity) saved with its byte-level tokenizer, and a
    JSONL calibration text of about 3,000 bytes."""
    root = tmp_path_factory.mktemp("layers")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=260,
                                         bos_token_id=257, eos_token_id=256, pad_token_id=256))
    with torch.no_grad():
        for layer in model.model.layers[1:5]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(root / "llama")
    hf_byte_tokenizer().save_pretrained(root / "llama")
    lines = [json.dumps({"text": f"passage {i}: looped layers think in latent space. " * 3}) for i in range(20)]
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_calibration_tokens_joins_documents_with_eos(llama_folder):
    ids = calibration_tokens(llama_folder / "llama", llama_folder / "calib.jsonl", tokens=400)
    first = json.loads((llama_folder / "calib.jsonl").read_text().splitlines()[0])["text"]
    first_ids = hf_byte_tokenizer()(first, add_special_tokens=False)["input_ids"]  # no <s>: documents join by EOS
    assert len(first_ids) == len(first.encode()) and 257 not in first_ids
    assert ids.shape == (400,) and ids[:len(first_ids)].tolist() == first_ids and ids[len(first_ids)].item() == 256


def test_layers_cli_writes_json_and_png(llama_folder, tmp_path, capsys):
    source, text = llama_folder / "llama", llama_folder / "calib.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(["layers", str(source), "--text", str(text), "--tokens", "1100", "--loops", "3",
                      "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.png")])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "1x1+4x3+1x1" in out and "0,1-4,5" in out and "thinking" in out
    data = json.loads((tmp_path / "a.json").read_text())
    model = load(source)
    expected = layer_analysis(model, token_windows(model, calibration_tokens(source, text, 1100)))
    assert data == {"source": str(source), **expected.to_json(loops=3)}
    assert {"angular_distance", "block_influence", "spec", "layer_map"} <= set(data) and data["tokens"] == 1100
    assert data["angular_distance"][1:5] == pytest.approx([0] * 4, abs=1e-6)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]  # no staging files left


def test_layers_cli_on_a_loopreg_folder(llama_folder, tmp_path, capsys):
    """A loopreg folder's tokenizer is its tokenizer.json (documents joined by <|endoftext|>)."""
    from loopreg.data.text import byte_level_tokenizer

    torch.manual_seed(0)
    LoopedLM(LoopedLMConfig(spec="4x1", vocab_size=257, d_model=32, n_heads=4)).save_pretrained(tmp_path / "m")
    byte_level_tokenizer().save(str(tmp_path / "m" / "tokenizer.json"))
    ids = calibration_tokens(tmp_path / "m", llama_folder / "calib.jsonl", tokens=500)
    assert (ids == 256).nonzero().flatten().tolist() == [144, 289, 434]  # an EOS after each 144-byte document
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(["layers", str(tmp_path / "m"), "--text", str(llama_folder / "calib.jsonl"), "--tokens", "500",
                      "--json", str(tmp_path / "m.json")])
    capsys.readouterr()
    model = load(tmp_path / "m")
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "m.json").read_text())["angular_distance"] == list(
        layer_analysis(model, token_windows(model, ids)).angular_distance)


def test_surgery_spec_auto(llama_folder, tmp_path, capsys):
    out = tmp_path / "auto"
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(["surgery", str(llama_folder / "llama"), "--spec", "auto", "--loops", "3", "--text",
                      str(llama_folder / "calib.jsonl"), "--tokens", "600", "--update", "damped", "--anchor", "0.25",
                      "--out", str(out)])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--spec 1x1+4x3+1x1 --layers 0,1-4,5" in printed and "damped, anchor β = 0.25" in printed
    looped = load(out)
    assert (looped.config.loopreg_spec, looped.config.loopreg_update, looped.config.loopreg_anchor) == (
        "1x1+4x3+1x1", "damped", 0.25)
    assert len(stored_layers(looped)) == LAYERS


# ---------------------------------------------------------------- user errors: one line, exit 2, nothing written
def test_spec_auto_without_text(llama_folder, tmp_path, capsys):
    line = _error_line(["surgery", str(llama_folder / "llama"), "--spec", "auto", "--out", str(tmp_path / "o")], capsys)
    assert "--spec auto needs --text" in line and not (tmp_path / "o").exists()


def test_calibration_text_shorter_than_requested(llama_folder, tmp_path, capsys):
    text = llama_folder / "calib.jsonl"
    total = sum(len(json.loads(line)["text"].encode()) + 1 for line in text.read_text().splitlines())
    line = _error_line(["surgery", str(llama_folder / "llama"), "--spec", "auto", "--text", str(text),
                        "--tokens", "100000", "--out", str(tmp_path / "o")], capsys)
    assert line == f"error: {text}: calibration text has {total} tokens, fewer than the 100000 requested (--tokens)"
    line = _error_line(["layers", str(llama_folder / "llama"), "--text", str(text), "--tokens", "100000",
                        "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.png")], capsys)
    assert f"{total} tokens" in line and "100000" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_source(llama_folder, tmp_path, capsys):
    line = _error_line(["layers", str(tmp_path / "nope"), "--text", str(llama_folder / "calib.jsonl")], capsys)
    assert line == f"error: {tmp_path / 'nope'}: not found; expected a model folder, a .gguf file or a hub id"


@pytest.mark.parametrize("extra, message", [
    (["--spec", "1x1+4x2+1x1", "--loops", "2"], "--loops is for --spec auto"),
    (["--spec", "auto", "--text", "x.jsonl", "--layers", "0-5"], "--layers 0-5 with --spec auto"),
    # the two below exercise the update rules of loop_surgery (update=/anchor=, the lead's core change)
    (["--spec", "1x1+4x2+1x1", "--update", "damped", "--anchor", "1.5"], "--anchor must be in [0, 1], got 1.5"),
    (["--spec", "1x1+4x2+1x1", "--anchor", "0.5"], "--anchor 0.5 needs --update damped"),
    (["--spec", "1x1+4x2+1x1", "--update", "wild"], "--update: unknown update rule 'wild'; valid: plain, damped"),
])
def test_surgery_option_errors(llama_folder, tmp_path, capsys, extra, message):
    line = _error_line(["surgery", str(llama_folder / "llama"), *extra, "--out", str(tmp_path / "o")], capsys)
    assert message in line and not (tmp_path / "o").exists()


def test_thinking_layers_picks_the_flattest_window_between_the_knees():
    curve = [0.5, 0.2, 0.09, 0.08, 0.05, 0.04, 0.06, 0.09, 0.1, 0.3]
    wide = propose_split(curve)
    narrow = propose_split(curve, thinking_layers=2)
    assert (narrow.encoder, narrow.thinking) == (4, 2)  # layers 4-5 have the smallest mean
    assert wide.encoder <= narrow.encoder and narrow.encoder + 2 <= wide.encoder + wide.thinking
    assert narrow.encoder + narrow.thinking + narrow.decoder == len(curve)
    assert propose_split(curve, thinking_layers=50) == wide  # wider than the span: the span
    with pytest.raises(ValueError, match="thinking_layers must be an integer >= 1"):
        propose_split(curve, thinking_layers=0)
