"""Loop overrides and update rules on tied Hugging Face retrofits and LoopedLM: ``loops=`` in forward and
generate, cached == uncached at every count, a keep-all retrofit at loops 1 is its source, the damped rule
(K = 1 or β = 1 is the source; a reference computation otherwise), truncated backprop, save/reload."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.spec import LoopSpec
from loopreg.surgery import get_layers, loop_surgery
from loopreg.surgery.core import looped_spec, stored_layers
from loopreg.loading import load

from .families import BUILDERS as ALL_BUILDERS
from .families import LLAMA_LIKE, NEW_FAMILIES, VOCAB

BUILDERS = {family: ALL_BUILDERS[family] for family in ["llama", "gpt2", "qwen2", *NEW_FAMILIES]}
KEEP_ALL = "2x1+2x2+2x1"  # every one of the 6 layers once, the middle two looped twice
KEEP_ALL_MAP = "0-1,2-3,4-5"


pytestmark = pytest.mark.usefixtures("single_thread")


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[family]().eval()


def retrofit(family: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    source = build(family)
    return source, loop_surgery(copy.deepcopy(source), KEEP_ALL, layers=KEEP_ALL_MAP, **kwargs).eval()


def prompt(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def unrolled_reference(source: torch.nn.Module, loops: int) -> torch.nn.Module:
    """The source with its layers laid out as the keep-all spec at ``loops`` — each application its own
    deep copy (a plain, unlooped HF model): what a tied retrofit at that loop count must compute."""
    spec = LoopSpec.parse(KEEP_ALL).with_loops(loops)
    return loop_surgery(copy.deepcopy(source), str(spec), layers=KEEP_ALL_MAP, tied=False).eval()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_keep_all_retrofit_at_one_loop_is_its_source(family):
    source, looped = retrofit(family)
    ids = prompt()
    with torch.no_grad():
        assert (looped(ids, loops=1).logits - source(ids).logits).abs().max() <= 1e-5
        assert (looped(ids).logits - source(ids).logits).abs().max() > 1e-3  # the default (2 loops) differs


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
def test_loop_override_matches_unrolled_reference(family, loops):
    source, looped = retrofit(family)
    ids = prompt()
    with torch.no_grad():
        expected = unrolled_reference(source, loops)(ids).logits
        assert (looped(ids, loops=loops).logits - expected).abs().max() <= 1e-5
    assert len(get_layers(looped)) == LoopSpec.parse(KEEP_ALL).effective_depth  # restored after the call
    assert looped.config.num_hidden_layers == 8


@pytest.mark.parametrize("family", ["llama", "gpt2", *NEW_FAMILIES])
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("update", ["plain", "damped"])
def test_cached_generation_equals_uncached(family, loops, update):
    _, looped = retrofit(family, update=update, anchor=0.3)
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    cached = looped.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, loops=loops,
                             pad_token_id=0)
    uncached = looped.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, loops=loops,
                               pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # The cached logits of the last step equal a full forward over the generated sequence.
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones_like(cached[:, ids.shape[1]:])], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        full = looped(cached, attention_mask=full_mask, position_ids=positions, loops=loops).logits[:, -2]
        stepped = looped.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, loops=loops,
                                  pad_token_id=0, output_logits=True, return_dict_in_generate=True).logits[-1]
    assert (full - stepped).abs().max() <= 1e-4


@pytest.mark.parametrize("family", list(BUILDERS))
def test_loop_override_never_writes_the_config(family):
    """A call at another depth than the config's leaves the model's config as it is, also while it runs."""
    _, looped = retrofit(family)
    config = looped.config
    before = config.to_dict()
    seen = []
    handle = stored_layers(looped)[2].register_forward_hook(  # the looped block's first layer
        lambda *_: seen.append((config.num_hidden_layers, list(getattr(config, "layer_types", None) or []))))
    with torch.no_grad():
        looped(prompt(), loops=4)
    handle.remove()
    assert len(seen) == 4 and {depth for depth, _ in seen} == {8}  # once per loop
    assert config.to_dict() == before


def test_generate_loops_changes_the_output_and_is_restored():
    _, looped = retrofit("llama")
    ids = prompt(1)
    outputs = {loops: looped.generate(ids, max_new_tokens=8, do_sample=False, loops=loops, pad_token_id=0)
               for loops in (1, 4)}
    assert not torch.equal(outputs[1], outputs[4])
    assert torch.equal(looped.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0),
                       looped.generate(ids, max_new_tokens=8, do_sample=False, loops=2, pad_token_id=0))


@pytest.mark.parametrize("family", ["llama", "gpt2", *NEW_FAMILIES])
def test_damped_with_one_loop_or_full_anchor_is_the_source(family):
    source = build(family)
    ids = prompt()
    with torch.no_grad():
        expected = source(ids).logits
        anchored = loop_surgery(copy.deepcopy(source), KEEP_ALL, layers=KEEP_ALL_MAP, update="damped", anchor=1.0)
        assert torch.equal(anchored(ids).logits, expected)
        assert torch.equal(anchored(ids, loops=4).logits, expected)  # β = 1 at any K
        damped = loop_surgery(copy.deepcopy(source), KEEP_ALL, layers=KEEP_ALL_MAP, update="damped", anchor=0.4)
        assert torch.equal(damped(ids, loops=1).logits, expected)  # K = 1


def damped_reference(source: LlamaForCausalLM, ids: torch.Tensor, loops: int, anchor: float) -> torch.Tensor:
    """The damped rule written out by hand over the source's own layers (no surgery code)."""
    inner = source.model
    h = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rope = inner.rotary_emb(h, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]

    def run(layers, x):
        for layer in layers:
            x = layer(x, attention_mask=mask, position_embeddings=rope, position_ids=positions)[0]
        return x

    layers = list(inner.layers)
    h = run(layers[:2], h)
    h0, state = h, h
    first = run(layers[2:4], h0)
    for _ in range(loops):
        state = state + (run(layers[2:4], state) - state) / loops
    h = anchor * first + (1 - anchor) * state
    return source.lm_head(inner.norm(run(layers[4:], h)))


@pytest.mark.parametrize("loops", [2, 3])
def test_damped_matches_a_hand_computation(loops):
    source, damped = retrofit("llama", update="damped", anchor=0.25)
    ids = prompt()
    with torch.no_grad():
        expected = damped_reference(source, ids, loops, 0.25)
        assert (damped(ids, loops=loops).logits - expected).abs().max() <= 1e-5


def test_update_rule_is_saved_and_reloaded(tmp_path):
    _, damped = retrofit("llama", update="damped", anchor=0.25)
    damped.save_pretrained(tmp_path / "retrofit")
    reloaded = load(tmp_path / "retrofit").eval()
    layers = get_layers(reloaded)
    assert (layers.update, layers.anchor) == ("damped", 0.25)
    assert reloaded.config.architectures == ["LlamaForCausalLM"]  # plain tools see the family's class
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, loops=3).logits, damped(ids, loops=3).logits)


def test_looped_retrofit_pickles_and_deep_copies():
    _, looped = retrofit("llama")
    ids = prompt()
    with torch.no_grad():
        expected = looped(ids, loops=3).logits
        for clone in (pickle.loads(pickle.dumps(looped)), copy.deepcopy(looped)):
            assert torch.equal(clone(ids, loops=3).logits, expected)


def test_truncated_backprop_keeps_values_and_skips_early_iterations():
    _, looped = retrofit("llama")
    looped.train()
    ids = prompt()
    full = looped(ids, labels=ids, loops=3)
    truncated = looped(ids, labels=ids, loops=3, grad_loops=1)
    assert torch.equal(full.logits, truncated.logits)
    truncated.loss.backward()
    middle = stored_layers(looped)[2]
    assert middle.self_attn.q_proj.weight.grad is not None
    assert looped.model.embed_tokens.weight.grad.abs().sum() > 0  # identity Jacobian through skipped loops


def test_untied_retrofit_refuses_loop_override():
    source = build("llama")
    untied = loop_surgery(copy.deepcopy(source), KEEP_ALL, layers=KEEP_ALL_MAP, tied=False)
    with pytest.raises(ValueError, match="needs a tied looped model"):
        untied(prompt(), loops=2)
    with pytest.raises(ValueError, match="needs a tied model"):
        loop_surgery(copy.deepcopy(source), KEEP_ALL, layers=KEEP_ALL_MAP, tied=False, update="damped")


@pytest.mark.parametrize("bad, match", [(dict(update="wild"), "unknown update rule 'wild'"),
                                        (dict(update="damped", anchor=1.5), "anchor must be in"),
                                        (dict(update="damped", anchor=-0.1), "anchor must be in")])
def test_bad_update_rules_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        loop_surgery(build("llama"), KEEP_ALL, layers=KEEP_ALL_MAP, **bad)


def test_looped_spec_names_what_runs():
    source, looped = retrofit("llama")
    assert looped_spec(source) is None
    assert str(looped_spec(looped)) == KEEP_ALL
    assert str(looped_spec(LoopedLM(LoopedLMConfig(spec="2x3", vocab_size=16, d_model=8, n_heads=2)))) == "2x3"


def test_looped_lm_damped_rule():
    torch.manual_seed(0)
    config = LoopedLMConfig(spec=KEEP_ALL, vocab_size=VOCAB, d_model=32, n_heads=4)
    plain = LoopedLM(config).eval()
    damped = LoopedLM(LoopedLMConfig(**{**config.__dict__, "update": "damped", "anchor": 0.25}))
    damped.load_state_dict(plain.state_dict())
    damped.eval()
    ids = prompt()
    with torch.no_grad():
        one_pass = plain(ids, loops=1).logits
        assert torch.equal(damped(ids, loops=1).logits, one_pass)
        anchored = LoopedLM(LoopedLMConfig(**{**config.__dict__, "update": "damped", "anchor": 1.0}))
        anchored.load_state_dict(plain.state_dict())
        assert torch.equal(anchored.eval()(ids, loops=4).logits, one_pass)
        # cached greedy decoding equals uncached under the damped rule, at several loop counts
        for loops in (2, 3):
            cached = damped.generate(ids, max_new_tokens=5, do_sample=False, loops=loops)
            uncached = damped.generate(ids, max_new_tokens=5, do_sample=False, loops=loops, use_cache=False)
            assert torch.equal(cached, uncached)
        assert not torch.equal(damped(ids, loops=3).logits, plain(ids, loops=3).logits)
    with pytest.raises(ValueError, match="model.update/model.anchor: anchor must be in"):
        LoopedLMConfig(spec="2x2", update="damped", anchor=2.0)


def test_composer_huggingface_model_passes_loops_from_the_batch():
    from composer.models import HuggingFaceModel

    _, looped = retrofit("llama")
    wrapped = HuggingFaceModel(looped, use_logits=True, shift_labels=True)
    assert {"input_ids", "labels", "loops", "grad_loops"} <= wrapped.model_forward_args
    ids = prompt()
    with torch.no_grad():
        for loops in (1, 3):
            out = wrapped({"input_ids": ids, "labels": ids, "loops": loops})
            assert torch.equal(out.logits, looped(ids, loops=loops).logits)


def keep_all_llama_retrofit() -> tuple:
    """(left-padding byte tokenizer, a tiny Llama sized to it, its tied keep-all retrofit): harness fixtures."""
    from .conftest import hf_byte_tokenizer

    tokenizer = hf_byte_tokenizer()
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**{**LLAMA_LIKE, "vocab_size": len(tokenizer)})).eval()
    return tokenizer, source, loop_surgery(copy.deepcopy(source), KEEP_ALL, layers=KEEP_ALL_MAP)


def test_eval_model_sweeps_a_retrofit_and_refuses_plain_models(tmp_path):
    from lm_eval.api.instance import Instance

    from loopreg.evals.lm_eval_model import LoopregLM

    tokenizer, source, looped = keep_all_llama_retrofit()
    requests = [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6}), index)
                for index, prompt in enumerate(["a=1, b=2, b=", "xy"])]

    def generate(model, **options):
        return LoopregLM(model, tokenizer=tokenizer, device="cpu", **options).generate_until(requests,
                                                                                            disable_tqdm=True)

    expected = generate(source)
    assert generate(looped, loops=1) == expected
    assert generate(looped, loops=4) != expected
    with pytest.raises(ValueError, match="--loops: this LlamaForCausalLM does not loop"):
        LoopregLM(source, tokenizer=tokenizer, loops=2)
    untied = loop_surgery(copy.deepcopy(source), KEEP_ALL, layers=KEEP_ALL_MAP, tied=False)
    with pytest.raises(ValueError, match="--loops: loops=2 needs a tied looped model; this one is untied"):
        LoopregLM(untied, tokenizer=tokenizer, loops=2)
    looped.save_pretrained(tmp_path / "retrofit")
    tokenizer.save_pretrained(tmp_path / "retrofit")
    info = LoopregLM(str(tmp_path / "retrofit"), loops=3, device="cpu").info
    assert (info.name, info.spec, info.flops_units) == ("retrofit@loops3", "2x1+2x3+2x1", 10)
