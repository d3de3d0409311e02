import pytest
import torch
from transformers import DynamicCache

from loopreg import LoopedLM, LoopedLMConfig, LoopSpec, load
from loopreg.errors import UserError
from loopreg.model import Layer, LoopedLMOutput, rotary


def tiny(spec: str, **kw) -> LoopedLM:
    torch.manual_seed(0)
    return LoopedLM(LoopedLMConfig(spec=spec, vocab_size=61, d_model=32, n_heads=4, d_ff=48, **kw)).eval()


def greedy(model: LoopedLM, ids: torch.Tensor, new: int, **options) -> torch.Tensor:
    """The ``new`` tokens transformers' ``generate`` picks greedily after ``ids``."""
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **options)
    return out[:, ids.shape[1]:]


def layer_params(model: LoopedLM) -> int:
    return sum(p.numel() for p in model.layers.parameters())


def test_tied_param_count_is_k_layers():
    one_layer = layer_params(tiny("1x1"))
    assert layer_params(tiny("6x4")) == 6 * one_layer
    assert layer_params(tiny("4x(1,4,1)")) == 12 * one_layer
    assert layer_params(tiny("6x4", tied=False)) == 24 * one_layer
    assert len(tiny("12x2", tied=False).layers) == 24


def test_looped_forward_equals_block_applied_by_hand():
    model = tiny("3x4", mlp="gelu")
    ids = torch.randint(0, 61, (2, 9))
    x = model.embed(ids)
    rope = rotary(torch.arange(9).expand(2, 9), model.config.head_dim, model.config.rope_theta, x.dtype)
    for _ in range(4):
        for layer in model.layers:
            x = layer(x, rope)
    expected = model.lm_head(model.norm(x))
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_middle_loop_forward_by_hand():
    model = tiny("1x(1,3,1)")
    ids = torch.randint(0, 61, (1, 7))
    x = model.embed(ids)
    rope = rotary(torch.arange(7)[None], model.config.head_dim, model.config.rope_theta, x.dtype)
    for index in (0, 1, 1, 1, 2):
        x = model.layers[index](x, rope)
    torch.testing.assert_close(model(ids).logits, model.lm_head(model.norm(x)), rtol=0, atol=0)


def test_loop_override_runs_more_loops_without_new_weights():
    model = tiny("2x3")
    ids = torch.randint(0, 61, (1, 6))
    deeper = tiny("2x6")
    deeper.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids, loops=6).logits, deeper(ids).logits, rtol=0, atol=0)
    assert not torch.equal(model(ids, loops=6).logits, model(ids).logits)
    with pytest.raises(ValueError, match="untied"):
        tiny("2x3", tied=False)(ids, loops=4)


@pytest.mark.parametrize("spec, loops, learned", [("2x3", None, False), ("1x(1,3,1)", None, False), ("2x2", 5, False),
                                                 ("2x3", None, True)])
def test_kv_cache_matches_recomputation(spec, loops, learned):
    model = tiny(spec, n_kv_heads=2, learned_positions=learned)
    ids = torch.randint(0, 61, (3, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[1, :1] = 0
    cached = greedy(model, ids, 12, attention_mask=mask, loops=loops)
    uncached = greedy(model, ids, 12, attention_mask=mask, loops=loops, use_cache=False)
    assert torch.equal(cached, uncached)
    # a left-padded row generates exactly what the unpadded prompt generates alone
    alone = greedy(model, ids[:1, 2:], 12, loops=loops)
    assert torch.equal(cached[:1], alone)


def test_cached_logits_equal_full_forward():
    model = tiny("2x3")
    ids = torch.randint(0, 61, (2, 10))
    cache = DynamicCache()
    parts = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([p.logits for p in parts], 1), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(cache) == 6  # one slot per layer application, not per distinct layer


def test_sampling_is_seeded():
    model = tiny("1x2")
    ids = torch.randint(0, 61, (2, 4))
    sampled = []
    for _ in range(2):
        torch.manual_seed(3)
        sampled.append(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=10, pad_token_id=0))
    assert torch.equal(*sampled)


def test_eos_stops_rows():
    model = tiny("1x2")
    ids = torch.randint(0, 61, (2, 4))
    eos = int(greedy(model, ids, 6)[0, 1])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos)[:, 4:]
    assert (out[0, 1:] == eos).all()


def test_save_load_round_trip(tmp_path):
    model = tiny("4x(1,2,1)", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = LoopedLM.from_pretrained(tmp_path)
    assert loaded.config.arch == model.config.arch
    assert loaded.spec == LoopSpec.parse("4x(1,2,1)")
    ids = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.embed.weight


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text('{"loopreg": {"spec": "2x2", "bogus": 1}}')
    with pytest.raises(UserError, match="bogus"):
        load(tmp_path)


def test_meta_init_then_fsdp_style_materialisation():
    config = LoopedLMConfig(spec="2x3", vocab_size=61, d_model=32, n_heads=4)
    with torch.device("meta"):
        model = LoopedLM(config)
    assert all(p.is_meta for p in model.parameters())
    # What Composer's FSDP does per module: to_empty(recurse=False), then param_init_fn(module).
    for module in model.modules():
        module.to_empty(device="cpu", recurse=False)
        model.param_init_fn(module)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.layers[0].attn.o_proj.weight.std() < model.layers[0].attn.q_proj.weight.std()  # depth-scaled


def test_fsdp_units_are_distinct_layers():
    model = tiny("4x(1,4,1)")
    units = [m for m in model.modules() if model.fsdp_wrap_fn(m)]
    assert len(units) == 12 and all(isinstance(m, Layer) for m in units)


@pytest.mark.parametrize("spec, init_depth, depth", [("8x1", None, 8), ("2x2", None, 4), ("8x1", 2, 2),
                                                     ("2x4", 2, 2)])
def test_residual_projections_are_initialised_for_init_depth(spec: str, init_depth: int | None, depth: int):
    model = LoopedLM(LoopedLMConfig(spec=spec, vocab_size=61, d_model=256, n_heads=4, init_depth=init_depth))
    std = 0.02 / (2 * depth) ** 0.5
    for layer in model.layers:  # residual outputs at std / sqrt(2D), every other projection at std
        assert abs(layer.attn.o_proj.weight.std().item() / std - 1) < 0.02
        assert abs(layer.attn.q_proj.weight.std().item() / 0.02 - 1) < 0.02
    with pytest.raises(UserError, match="model.init_depth must be >= 1"):
        LoopedLMConfig(spec=spec, init_depth=0)


def test_bad_configs():
    with pytest.raises(ValueError, match="n_heads"):
        LoopedLMConfig(spec="2x2", d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="loop count 0"):
        LoopedLMConfig(spec="2x0")
    with pytest.raises(ValueError, match="mlp"):
        LoopedLMConfig(mlp="relu")


# ------------------------------------------------ forward vs the plain loop written out independently
def plain_loop(model: LoopedLM, ids: torch.Tensor, loops=None, grad_loops=None):
    """nanoGPT's forward over ``model.layers[i] for i in schedule``: logits and the residual stream after each
    application; with ``grad_loops`` the early thinking iterations run without a graph and count as the
    identity in backward."""
    x = model.embed(ids)
    rope = rotary(torch.arange(ids.shape[1]).expand_as(ids), model.config.head_dim, model.config.rope_theta, x.dtype)
    spec = model.spec if loops is None else model.spec.with_loops(loops)
    skipped = spec.truncated_applications(grad_loops)
    states = []
    for slot, index in enumerate(model.schedule(loops)):
        if slot == skipped.start:
            start = x
        if slot in skipped:
            with torch.no_grad():
                x = model.layers[index](x, rope)
            if slot == skipped.stop - 1:
                x = x.detach() + (start - start.detach())
        else:
            x = model.layers[index](x, rope)
        states.append(x)
    return model.lm_head(model.norm(x)), states


def grads_of(model: LoopedLM, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = run()
    getattr(logits, "logits", logits).square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return getattr(logits, "logits", logits).detach(), grads


@pytest.mark.parametrize("spec, tied, loops", [("2x3", True, None), ("1x1+2x4+1x1", True, 3), ("2x3", False, None)])
def test_forward_equals_the_plain_loop_for_every_training_option(spec, tied, loops):
    model = tiny(spec, tied=tied).train()
    ids = torch.randint(0, 61, (2, 9))
    for options in ({}, {"grad_loops": 1}, {"checkpoint": True}, {"grad_loops": 1, "checkpoint": True}):
        expected, expected_grads = grads_of(model, lambda options=options: plain_loop(model, ids, loops,
                                                                                      options.get("grad_loops"))[0])
        logits, grads = grads_of(model, lambda options=options: model(ids, loops=loops, **options))
        assert torch.equal(logits, expected), options
        assert grads.keys() == expected_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-6, atol=1e-7)
    truncated = grads_of(model, lambda: model(ids, loops=loops, grad_loops=1))[1]
    full = grads_of(model, lambda: model(ids, loops=loops))[1]
    name = "layers.0.mlp.up_proj.weight"  # truncation changes its gradient (untied: it runs without a graph)
    assert (name not in truncated) if not tied else not torch.equal(truncated[name], full[name])


@pytest.mark.parametrize("spec, loops", [("2x3", None), ("1x(1,3,1)", 5)])
def test_output_hidden_returns_the_residual_stream_of_the_chosen_applications(spec, loops):
    model = tiny(spec)
    ids = torch.randint(0, 61, (2, 7))
    expected, states = plain_loop(model, ids, loops)
    plain = model(ids, loops=loops)
    assert torch.equal(plain.logits, expected) and plain.hidden_states is None  # the default: no hidden states
    everything = model(ids, loops=loops, output_hidden=True)
    assert isinstance(everything, LoopedLMOutput) and torch.equal(everything.logits, expected)
    assert list(everything.hidden_states) == list(range(len(states)))
    assert all(torch.equal(everything.hidden_states[slot], state) for slot, state in enumerate(states))
    chosen = model(ids, loops=loops, output_hidden=[len(states) - 1, 1])
    assert sorted(chosen.hidden_states) == [1, len(states) - 1]
    assert torch.equal(chosen.hidden_states[1], states[1]) and torch.equal(chosen.logits, expected)
    assert model(ids, output_hidden=[]).hidden_states == {}
    with pytest.raises(ValueError, match=f"layer application {len(states)} is out of range"):
        model(ids, loops=loops, output_hidden=[len(states)])


@pytest.mark.parametrize("spec, loops", [("2x3", None), ("1x(1,3,1)", 5)])
def test_cached_forward_equals_the_plain_loop(spec, loops):
    model = tiny(spec, n_kv_heads=2)
    ids = torch.randint(0, 61, (2, 8))
    expected, states = plain_loop(model, ids, loops)
    cache = DynamicCache()
    parts = [model(ids[:, :5], cache=cache, loops=loops, output_hidden=True)]
    parts += [model(ids[:, t:t + 1], cache=cache, loops=loops, output_hidden=True) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat([p.logits for p in parts], 1), expected, rtol=1e-5, atol=1e-5)
    last = torch.cat([p.hidden_states[len(states) - 1] for p in parts], 1)
    torch.testing.assert_close(last, states[-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model(ids, cache=DynamicCache(), loops=loops, checkpoint=True)
