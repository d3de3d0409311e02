"""Adaptive exit from the thinking loop and the KV policies (loopreg.adaptive), on a LoopedLM and a tied Llama
retrofit: threshold 0 is the fixed-loop computation exactly; tokens whose state stops changing exit at the first
iteration under the threshold; cached decoding equals recomputation and a row does not depend on its batch; the
batch stops iterating once every token exited; the shared policy keeps one slot per stored layer; bad options
are one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from loopreg.adaptive import ExitRule, ExitStats
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.surgery import loop_surgery

from .families import BUILDERS, NEW_FAMILIES

SPEC, LOOPS = "1x1+2x4+1x1", 4  # the thinking block: stored layers 1-2, applied 4 times
VOCAB = 96
# per model kind, thresholds at which some tokens exit early and others do not (random init)
PARTIAL = {"looped": ("kl:1e-4", "latent:0.1"), "llama": ("kl:1e-3", "latent:0.5")}

pytestmark = pytest.mark.usefixtures("single_thread")


def looped_lm() -> LoopedLM:
    torch.manual_seed(0)
    return LoopedLM(LoopedLMConfig(spec=SPEC, vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2)).eval()


def llama_retrofit(spec: str = SPEC, tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return loop_surgery(source, spec, layers="0,1-2,3", tied=tied).eval()


def family_retrofit(family: str) -> torch.nn.Module:
    """The tiny 6-layer ``family`` model of tests/families.py under SPEC (its layers 3 and 4 dropped)."""
    torch.manual_seed(0)
    return loop_surgery(BUILDERS[family]().eval(), SPEC, layers="0,1-2,5").eval()


MODELS = {"looped": looped_lm, "llama": llama_retrofit}
# the families whose own code adaptive exit runs through only in test_threshold_zero_is_the_fixed_loop_output
FAMILY_RETROFITS = {family: lambda family=family: family_retrofit(family) for family in NEW_FAMILIES}


def prompt(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor, cached: bool = False, **options) -> torch.Tensor:
    """One forward's logits; ``cached`` writes through a (fresh) KV cache, as a prefill does."""
    with torch.no_grad():
        return model(ids, use_cache=cached, **options).logits


def generate(model: torch.nn.Module, ids: torch.Tensor, use_cache: bool = True, new: int = 6,
             **options) -> torch.Tensor:
    """Greedy new tokens (B, new)."""
    return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=use_cache,
                          **options)[:, ids.shape[1]:]


def block_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The thinking block's stored layers."""
    layers = model.layers if isinstance(model, LoopedLM) else list(model.model.layers.children())
    return [layers[1], layers[2]]


def freeze_block(model: torch.nn.Module) -> None:
    """Zero the block's output projections: each iteration is the identity, h_t == h_{t-1} for every token."""
    for layer in block_layers(model):
        attn = layer.attn if isinstance(model, LoopedLM) else layer.self_attn
        attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()


def perturb(model: torch.nn.Module, where: dict[tuple[int, int], tuple[float, ...]]) -> dict[str, int]:
    """After the block's last layer at iteration t, add ``scale[t]`` times a fixed direction to the hidden state
    of position (row, col): the state of a frozen block changes exactly where and when a scale is non-zero.
    Returns the call counter (t = calls mod 4): set its ``n`` to 0 before each forward."""
    calls = {"n": 0}
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))

    def hook(_module, _inputs, output):
        step, calls["n"] = calls["n"] % LOOPS, calls["n"] + 1
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        for (row, col), scales in where.items():
            hidden[row, col] += scales[step] * direction
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    block_layers(model)[1].register_forward_hook(hook)
    return calls


# ------------------------------------------------------------------ threshold 0 is the fixed-loop computation
@pytest.mark.parametrize("kind", [*MODELS, *FAMILY_RETROFITS])
@pytest.mark.parametrize("criterion", ["kl", "latent"])
def test_threshold_zero_is_the_fixed_loop_output(kind, criterion):
    model, ids, rule = {**MODELS, **FAMILY_RETROFITS}[kind](), prompt(), f"{criterion}:0"
    for cached in (False, True):
        stats = ExitStats()
        assert torch.equal(logits(model, ids, cached, exit=rule, exit_stats=stats), logits(model, ids, cached))
        assert stats.as_dict() == {"tokens": ids.numel(), "mean_loops": LOOPS, "executed_loops": LOOPS,
                                   "max_loops": LOOPS}
    assert torch.equal(logits(model, ids, exit=rule, loops=6), logits(model, ids, loops=6))  # a loop override too
    fixed = generate(model, ids)
    assert torch.equal(generate(model, ids, exit=rule), fixed)
    assert torch.equal(generate(model, ids, use_cache=False, exit=rule), fixed)


# ------------------------------------------------------------------ a token exits at the first iteration under it
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("criterion", ["kl", "latent"])
def test_a_frozen_block_exits_after_the_first_iteration(kind, criterion):
    model, ids = MODELS[kind](), prompt()
    freeze_block(model)
    stats = ExitStats()
    out = logits(model, ids, exit=f"{criterion}:1e-6", exit_stats=stats)
    assert stats.mean_loops == 1 and stats.executed_loops == 1
    assert torch.equal(out, logits(model, ids, loops=1))
    assert torch.equal(generate(model, ids, exit=f"{criterion}:1e-6"), generate(model, ids, loops=1))


@pytest.mark.parametrize("kind", list(MODELS))
def test_tokens_exit_at_their_first_iteration_under_the_threshold(kind):
    model, ids = MODELS[kind](), prompt()
    freeze_block(model)
    # (0, 3) changes in iterations 1-2 and not in 3: it exits after 3; every other token after 1
    calls = perturb(model, {(0, 3): (1.0, 1.0, 0.0, 0.0)})
    stats = ExitStats()
    out = logits(model, ids, exit="latent:1e-6", exit_stats=stats)
    assert stats.mean_loops == (ids.numel() - 1 + 3) / ids.numel()
    assert stats.executed_loops == 3  # the batch stopped after iteration 3: the 4th was never computed
    # The exited tokens' states would not have changed after their exit: the result is the fixed loop's.
    calls["n"] = 0
    assert torch.allclose(out, logits(model, ids), atol=1e-6)


@pytest.mark.parametrize("kind", list(MODELS))
def test_one_token_that_keeps_changing_keeps_the_batch_iterating(kind):
    model, ids = MODELS[kind](), prompt()
    freeze_block(model)
    perturb(model, {(1, 6): (1.0, 1.0, 1.0, 1.0)})
    stats = ExitStats()
    logits(model, ids, exit="latent:1e-6", exit_stats=stats)
    assert stats.executed_loops == LOOPS
    assert stats.mean_loops == (ids.numel() - 1 + LOOPS) / ids.numel() < LOOPS


# ------------------------------------------------------------------ cached == uncached, batch-invariance
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("which", [0, 1])
def test_cached_decoding_equals_recomputation(kind, which):
    model, ids, rule = MODELS[kind](), prompt(), PARTIAL[kind][which]
    stats = ExitStats()
    cached = generate(model, ids, exit=rule, exit_stats=stats)
    assert 1 < stats.mean_loops < LOOPS  # some tokens exited early, some did not: the stand-ins were used
    assert torch.equal(cached, generate(model, ids, use_cache=False, exit=rule))
    # The last step's cached logits equal a forward over the whole sequence: allclose, not equal, since the
    # cached step multiplies one query row where the full forward multiplies all of them (other kernel blocking).
    full = torch.cat([ids, cached], 1)
    with torch.no_grad():
        cache = DynamicCache()
        model(full[:, :-1], past_key_values=cache, use_cache=True, exit=rule)
        stepped = model(full[:, -1:], past_key_values=cache, use_cache=True, exit=rule).logits[:, -1]
    assert torch.allclose(stepped, logits(model, full, exit=rule)[:, -1], atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_row_alone_equals_the_row_in_a_batch(kind):
    model, rule = MODELS[kind](), PARTIAL[kind][0]
    ids = prompt(3)
    alone, batch = ExitStats(), ExitStats()
    row = generate(model, ids[1:2], exit=rule, exit_stats=alone)
    assert torch.equal(row, generate(model, ids, exit=rule, exit_stats=batch)[1:2])
    assert alone.executed_loops <= batch.executed_loops  # alone it may stop earlier; its tokens are the same
    assert torch.allclose(logits(model, ids[1:2], exit=rule), logits(model, ids, exit=rule)[1:2], atol=1e-5)


def test_left_padding_neither_holds_the_batch_nor_counts():
    model = looped_lm()
    freeze_block(model)
    ids, mask = prompt(), torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    perturb(model, {(0, 1): (1.0, 1.0, 1.0, 1.0)})  # a padding position that never converges
    stats = ExitStats()
    with torch.no_grad():
        model(ids, attention_mask=mask, exit="latent:1e-6", exit_stats=stats)
    assert stats.as_dict() == {"tokens": 11, "mean_loops": 1.0, "executed_loops": 1.0, "max_loops": LOOPS}


@pytest.mark.parametrize("kind", list(MODELS))
def test_generate_passes_the_exit_keywords_to_every_forward(kind):
    """transformers' generate equals a hand-written cached greedy loop of forwards with the same keywords."""
    model, ids, rule = MODELS[kind](), prompt(), PARTIAL[kind][0]
    ours, theirs = ExitStats(), ExitStats()
    for kv_policy in ("per_application", "shared"):
        cache, step, expected = DynamicCache(), ids, []
        with torch.no_grad():
            for _ in range(6):
                out = model(step, past_key_values=cache, use_cache=True, exit=rule, kv_policy=kv_policy,
                            exit_stats=ours)
                step = out.logits[:, -1].argmax(-1, keepdim=True)
                expected.append(step)
        found = generate(model, ids, exit=rule, kv_policy=kv_policy, exit_stats=theirs)
        assert torch.equal(found, torch.cat(expected, 1)), kv_policy
    assert theirs.as_dict() == ours.as_dict() and ours.mean_loops < LOOPS


# ------------------------------------------------------------------ the compute saved
def test_early_exit_skips_the_remaining_layer_applications():
    model = looped_lm()
    calls = []
    for layer in block_layers(model):
        layer.register_forward_hook(lambda *_: calls.append(1))
    logits(model, prompt(), exit="latent:100")  # every token exits after iteration 1
    assert len(calls) == 2  # iteration 1 only: 2 block layers, not 2 x 4


# ------------------------------------------------------------------ KV policies
@pytest.mark.parametrize("kind", list(MODELS))
def test_shared_policy_keeps_one_slot_per_stored_layer(kind):
    model, ids = MODELS[kind](), prompt()
    caches = {policy: DynamicCache() for policy in ("per_application", "shared")}
    with torch.no_grad():
        for policy, cache in caches.items():
            model(ids, past_key_values=cache, use_cache=True, kv_policy=policy)
    sizes = {policy: sum(keys.nbytes for keys, _ in cache) for policy, cache in caches.items()}
    assert len(caches["shared"]) == 4 and len(caches["per_application"]) == 10  # prelude + block + coda vs depth
    assert sizes["shared"] / sizes["per_application"] == 4 / 10


@pytest.mark.parametrize("kind", list(MODELS))
def test_shared_policy_at_one_loop_equals_per_application(kind):
    model, ids = MODELS[kind](), prompt()
    assert torch.equal(generate(model, ids, loops=1, kv_policy="shared"), generate(model, ids, loops=1))
    assert torch.equal(logits(model, ids, True, loops=1, kv_policy="shared"), logits(model, ids, True, loops=1))


@pytest.mark.parametrize("kind", list(MODELS))
def test_shared_policy_decodes_with_exit(kind):
    model, ids = MODELS[kind](), prompt()
    stats = ExitStats()
    out = generate(model, ids, kv_policy="shared", exit=PARTIAL[kind][0], exit_stats=stats)
    assert out.shape == (2, 6) and stats.mean_loops < LOOPS
    # one forward over a prompt computes what per_application does: each iteration reads its own keys
    assert torch.allclose(logits(model, ids, True, kv_policy="shared"), logits(model, ids, True), atol=1e-6)


# ------------------------------------------------------------------ options and errors
def test_exit_rule_parses_and_prints():
    assert ExitRule.parse("kl:0.01") == ExitRule("kl", 0.01) and str(ExitRule.parse(" latent:5e-2 ")) == "latent:0.05"
    stats = ExitStats()
    stats.record(torch.tensor([1, 2]), executed=2, max_loops=4)
    other = ExitStats()
    other.record(torch.tensor([4, 4]), executed=4, max_loops=4)
    assert stats.merge(other).as_dict() == {"tokens": 4, "mean_loops": 2.75, "executed_loops": 3.0, "max_loops": 4}


@pytest.mark.parametrize("text, message", [
    ("foo:0.1", "--exit: unknown criterion 'foo' in 'foo:0.1'; valid: kl, latent"),
    ("kl:-1", "--exit: threshold -1.0 in 'kl:-1.0' must be a finite number >= 0"),
    ("latent:inf", "--exit: threshold inf in 'latent:inf' must be a finite number >= 0"),
    ("kl:abc", "--exit: threshold 'abc' in 'kl:abc' is not a number"),
    ("kl:nan", "--exit: threshold nan in 'kl:nan' must be a finite number >= 0"),
    ("kl", "--exit: 'kl' is not CRITERION:THRESHOLD (e.g. kl:0.01); valid criteria: kl, latent"),
])
def test_bad_exit_rules_are_one_line_errors(text, message):
    with pytest.raises(ValueError) as err:
        ExitRule.parse(text)
    assert str(err.value) == message


def test_bad_options_for_the_model_are_one_line_errors():
    model, ids = looped_lm(), prompt()
    with pytest.raises(ValueError, match=r"^unknown kv_policy 'latest'; valid: per_application, shared$"):
        logits(model, ids, kv_policy="latest")
    untied = LoopedLM(LoopedLMConfig(spec=SPEC, tied=False, vocab_size=VOCAB, d_model=32, n_heads=4))
    with pytest.raises(ValueError, match=r"^exit=kl:0.01 needs a tied looped model; this one is untied"):
        logits(untied, ids, exit="kl:0.01")
    flat = LoopedLM(LoopedLMConfig(spec="4x1", vocab_size=VOCAB, d_model=32, n_heads=4))
    with pytest.raises(ValueError, match=r"^exit=kl:0.01 needs a looped block; loop spec '4x1' has none$"):
        logits(flat, ids, exit="kl:0.01")
    with pytest.raises(ValueError, match=r"^unknown kv_policy 'latest'"):
        generate(llama_retrofit(), ids, kv_policy="latest")
    untied_retrofit = llama_retrofit("1x1+2x2+1x1", tied=False)
    with pytest.raises(ValueError, match=r"^exit=kl:0.01 needs a tied looped model; this one is untied"):
        logits(untied_retrofit, ids, exit="kl:0.01")
