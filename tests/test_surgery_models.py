"""Loop surgery on tiny random-init models of every supported family: exactness (logits and KV-cached
greedy generation), weight sharing, init values, save/reload, unrolled export, the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from loopreg.algorithms.loop_regularizer import loop_similarity, loop_target
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.spec import LoopSpec
from loopreg.surgery import (LoopedLayers, distinct_param_count, find_adapter, get_layers, layer_role_params,
                             loop_surgery)
from loopreg.surgery.cli import cli_main as surgery_cli
from loopreg.surgery.core import stored_layers
from loopreg.surgery.export import cli_main as export_cli
from loopreg.surgery.export import export_unrolled
from loopreg.loading import load
from loopreg.surgery.verify import compare, probe, verification_prompts

from .conftest import run_cli
from .families import BUILDERS, LAYERS, VOCAB

FAMILIES = list(BUILDERS)  # every family (test_layer_analysis runs these too)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """family → folder holding its tiny model, written with save_pretrained."""
    root = tmp_path_factory.mktemp("surgery_sources")
    folders = {}
    for family, build in BUILDERS.items():
        torch.manual_seed(0)
        folders[family] = root / family
        build().save_pretrained(folders[family])
    return folders


def logits(model, ids):
    return model(ids).logits.float()


def greedy(model, ids, use_cache=True):
    generated = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=use_cache)
    return generated[:, ids.shape[1]:]


PROMPT = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_source_schedule_spec_reproduces_the_source(sources, family):
    source, model = load(sources[family]).eval(), load(sources[family]).eval()
    prompts = verification_prompts(source)
    before = probe(source, prompts)
    assert loop_surgery(model, f"{LAYERS}x1") is model  # in place, same class
    agreement = compare(before, probe(model, prompts))
    assert agreement.max_abs_logit_diff <= 1e-5
    assert agreement.greedy_matches == agreement.greedy_total
    assert torch.equal(greedy(model, PROMPT), greedy(source, PROMPT))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_middle_looping_tied_equals_untied_and_its_cache(sources, family):
    tied = loop_surgery(load(sources[family]).eval(), "2x(1,2,1)")
    untied = loop_surgery(load(sources[family]).eval(), "2x(1,2,1)", tied=False)
    assert len(stored_layers(tied)) == 6 and len(stored_layers(untied)) == len(get_layers(untied)) == 8
    if family != "loopreg":  # a tied Hugging Face layer list reads as one entry per application
        assert len(get_layers(tied)) == 8
    assert (logits(tied, PROMPT) - logits(untied, PROMPT)).abs().max() <= 1e-5
    cached = greedy(tied, PROMPT)
    assert torch.equal(cached, greedy(tied, PROMPT, use_cache=False))
    assert torch.equal(cached, greedy(untied, PROMPT))


def test_tied_surgery_shares_weights_and_copies_nothing(sources):
    model = load(sources["llama"])
    source_layers = stored_layers(model)
    layer_params = sum(p.numel() for p in source_layers[0].parameters())
    base = distinct_param_count(model) - LAYERS * layer_params
    loop_surgery(model, "1x(1,3,1)")  # keeps layers 0, 2, 5; the middle one runs 3 times
    stack = get_layers(model)
    assert isinstance(stack, LoopedLayers) and stack.spec.schedule == (0, 1, 1, 1, 2)
    assert [stored_layers(model)[i] for i in range(3)] == [source_layers[i] for i in (0, 2, 5)]  # same objects
    assert distinct_param_count(model) == base + 3 * layer_params
    assert model.config.num_hidden_layers == 5 and model.config.loopreg_spec == "1x(1,3,1)"
    # FSDP wraps each stored layer once, however often it runs
    assert [m for m in model.modules() if model.fsdp_wrap_fn(m)] == stored_layers(model)


def test_fsdp_shards_each_stored_layer_once_and_matches(sources, tmp_path):
    from torch.distributed.fsdp import fully_shard

    reference = loop_surgery(load(sources["llama"]), "2x(1,2,1)")
    reference(PROMPT, labels=PROMPT).loss.backward()
    model = loop_surgery(load(sources["llama"]), "2x(1,2,1)")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for unit in [m for m in model.modules() if model.fsdp_wrap_fn(m)]:  # Composer's FSDP policy
            fully_shard(unit)
        fully_shard(model)
        loss = model(PROMPT, labels=PROMPT).loss
        loss.backward()
        grad = stored_layers(model)[2].self_attn.q_proj.weight.grad.full_tensor()
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(loss, reference(PROMPT, labels=PROMPT).loss)
    torch.testing.assert_close(grad, stored_layers(reference)[2].self_attn.q_proj.weight.grad)  # both applications


def test_average_and_stepwise_seed_values(sources):
    source = stored_layers(load(sources["llama"]))
    q = [layer.self_attn.q_proj.weight for layer in source]
    averaged = stored_layers(loop_surgery(load(sources["llama"]), "1x1+2x2+1x1", layers="0,1-4,5",
                                          init="average"))
    torch.testing.assert_close(averaged[1].self_attn.q_proj.weight, (q[1] + q[3]) / 2)
    torch.testing.assert_close(averaged[2].self_attn.q_proj.weight, (q[2] + q[4]) / 2)
    torch.testing.assert_close(averaged[3].self_attn.q_proj.weight, q[5])
    stepwise = stored_layers(loop_surgery(load(sources["llama"]), "1x1+2x2+1x1", layers="0,1-4,5",
                                          init="stepwise"))
    assert [torch.equal(stepwise[i].self_attn.q_proj.weight, q[j]) for i, j in ((1, 1), (2, 3))] == [True, True]


def test_untied_grouping_feeds_the_regularizer(sources):
    model = loop_surgery(load(sources["gpt2"]), "2x(1,2,1)", tied=False)
    assert loop_target(model) == LoopSpec.parse("2x(1,2,1)")
    adapter = find_adapter(model)
    roles = [layer_role_params(layer, adapter) for layer in get_layers(model)]
    assert roles[2]["attn_qkv"] is not roles[4]["attn_qkv"]  # separate copies of one distinct layer...
    assert torch.equal(roles[2]["attn_qkv"], roles[4]["attn_qkv"])
    assert loop_similarity(model)["mean"] == pytest.approx(1.0)  # ...that start out identical


def test_unsupported_architecture_is_one_line():
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                   vocab_size=32, word_embed_proj_dim=16))
    with pytest.raises(ValueError) as err:
        loop_surgery(opt, "1x2")
    assert str(err.value) == ("unsupported architecture 'opt' (OPTForCausalLM); supported families: "
                              "gemma3, gpt2, gpt_neox, llama, loopreg, mistral, olmo2, qwen2, qwen3")


@pytest.mark.parametrize("family, tied", [("qwen2", True), ("gpt2", True), ("mistral", False), ("loopreg", True),
                                          ("gemma3", True)])
@torch.no_grad()
def test_saved_surgery_result_reloads_looped(sources, family, tied, tmp_path):
    model = loop_surgery(load(sources[family]).eval(), "2x(1,2,1)", tied=tied)
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert len(stored_layers(reloaded)) == (6 if tied else 8)
    assert type(get_layers(reloaded)) is type(get_layers(model))
    assert torch.equal(logits(reloaded, PROMPT), logits(model, PROMPT))
    assert torch.equal(greedy(reloaded, PROMPT), greedy(model, PROMPT))


@torch.no_grad()
def test_stored_layers_keep_their_source_layers_kinds(sources, tmp_path):
    """Gemma 3 fixes each layer's kind (sliding or global: mask, window, RoPE) when it builds it, from
    ``config.layer_types``: a stored layer runs as its source layer did at every application and after reload, where
    from_pretrained builds it from the saved per-application kinds (source layers 1, 3, 4: global, global, sliding)."""
    kinds = load(sources["gemma3"]).config.layer_types
    model = loop_surgery(load(sources["gemma3"]).eval(), "1x1+2x3", layers="1,3-4")
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path).eval()
    expected = [kinds[1], kinds[3], kinds[4]]
    assert expected == ["full_attention", "full_attention", "sliding_attention"]  # not the source's first 3
    for layers in (stored_layers(model), stored_layers(reloaded)):
        assert [(layer.attention_type, layer.self_attn.is_sliding) for layer in layers] == [
            (kind, kind == "sliding_attention") for kind in expected]
    assert reloaded.config.layer_types == [expected[0], *expected[1:] * 3]
    reference = loop_surgery(load(sources["gemma3"]).eval(), "1x1+2x2", layers="1,3-4", tied=False)
    for loops, source in [(None, model), (2, reference)]:
        assert (reloaded(PROMPT, loops=loops).logits - logits(source, PROMPT)).abs().max() <= 1e-5, loops


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("llama", True), ("qwen2", False), ("mistral", False),
                                          ("gpt_neox", True), ("loopreg", True), ("qwen3", False), ("olmo2", True),
                                          ("gemma3", True)])
@torch.no_grad()
def test_unrolled_export_is_a_plain_checkpoint_with_equal_logits(sources, family, tied, tmp_path):
    model = loop_surgery(load(sources[family]).eval(), "2x(1,2,1)", tied=tied)
    export_unrolled(model, tmp_path / "unrolled")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "unrolled").eval()  # no loopreg code involved
    assert plain.config.num_hidden_layers == 8 and not hasattr(plain.config, "loopreg_spec")
    assert (logits(plain, PROMPT) - logits(model, PROMPT)).abs().max() <= 1e-5
    assert torch.equal(greedy(plain, PROMPT), greedy(model, PROMPT))


def test_gelu_looped_lm_cannot_export_as_llama(tmp_path):
    model = LoopedLM(LoopedLMConfig(spec="1x2", mlp="gelu", vocab_size=VOCAB, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="mlp='gelu' has no standard Hugging Face equivalent"):
        export_unrolled(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_surgery_verify_then_export(sources, tmp_path, capsys):
    assert surgery_cli([str(sources["mistral"]), "--spec", "6x1", "--verify", "--out", str(tmp_path / "looped")]) == 0
    printed = capsys.readouterr().out
    assert "max |Δlogit| = 0" in printed and "(100%)" in printed and "effective depth 6" in printed
    status, _, err = run_cli(["surgery", str(sources["mistral"]), "--spec", "2x(1,2,1)", "--init", "average",
                              "--layers", "0-1,2-5,4-5", "--out", str(tmp_path / "bad")], capsys)
    assert status == 2 and err.strip().splitlines() == [
        "error: layer ranges '2-5' and '4-5' in layer map '0-1,2-5,4-5' overlap; each source layer may seed one block"]
    assert export_cli([str(tmp_path / "looped"), "--unroll", "--out", str(tmp_path / "unrolled")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "unrolled").config.num_hidden_layers == 6


def test_load_source_tokenizer_for_each_kind_of_source(sources, tmp_path):
    """The one tokenizer loader: a loopreg folder's tokenizer.json, a Hugging Face folder's tokenizer, or None."""
    from tokenizers import Tokenizer

    from loopreg.data.text import byte_level_tokenizer
    from loopreg.surgery.sources import load_source_tokenizer

    from .conftest import hf_byte_tokenizer

    looped = tmp_path / "looped"
    LoopedLM(LoopedLMConfig(spec="2x1", vocab_size=257, d_model=16, n_heads=2)).save_pretrained(looped)
    assert load_source_tokenizer(looped) is None  # no tokenizer.json next to the model
    byte_level_tokenizer().save(str(looped / "tokenizer.json"))
    loaded = load_source_tokenizer(looped)
    assert isinstance(loaded, Tokenizer) and loaded.get_vocab() == byte_level_tokenizer().get_vocab()

    assert load_source_tokenizer(sources["llama"]) is None  # bare Hugging Face weights
    hf_folder = tmp_path / "hf"
    hf_byte_tokenizer().save_pretrained(hf_folder)
    hf = load_source_tokenizer(hf_folder)
    assert not isinstance(hf, Tokenizer) and hf("ab")["input_ids"] == hf_byte_tokenizer()("ab")["input_ids"]
