"""The cosine regularizer's value against a direct evaluation of the paper's formula, its gradient, its
numerics, its parameter groups on Hugging Face families, and its one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loopreg.algorithms import block_similarity, loop_regularization, loop_similarity, loop_target
from loopreg.model import LoopedLM, LoopedLMConfig

LOOPREG_NAMES = {"attn_q": "attn.q_proj.weight", "attn_k": "attn.k_proj.weight", "attn_v": "attn.v_proj.weight",
                 "attn_o": "attn.o_proj.weight", "mlp_up": "mlp.up_proj.weight", "mlp_gate": "mlp.gate_proj.weight",
                 "mlp_down": "mlp.down_proj.weight"}


def untied(spec: str = "2x3", **kwargs) -> LoopedLM:
    torch.manual_seed(0)
    return LoopedLM(LoopedLMConfig(spec=spec, tied=False, vocab_size=32, d_model=16, n_heads=2, d_ff=32, **kwargs))


def formula(model: nn.Module, layers: str, names: dict[str, str], pairs: list[tuple[int, int]]) -> dict[str, float]:
    """R_G = mean over the pairs of the cosine of the flattened weights, in float64, straight from the names."""
    params = dict(model.named_parameters())
    return {role: sum(F.cosine_similarity(params[f"{layers}.{a}.{name}"].double().flatten(),
                                          params[f"{layers}.{b}.{name}"].double().flatten(), dim=0).item()
                      for a, b in pairs) / len(pairs)
            for role, name in names.items()}


def test_value_is_the_formula_on_hand_built_weights():
    """Layer l's weights are cos(φ_l)·U + sin(φ_l)·V (U ⟂ V, equal norms): cos between layers is cos(φ_a − φ_b)."""
    model = untied("2x3")
    angles = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.4, 2.0])  # 6 layers, blocks of k = 2
    with torch.no_grad():
        for name in LOOPREG_NAMES.values():
            base = torch.linalg.qr(torch.randn(model.layers[0].get_parameter(name).numel(), 2))[0].T
            for layer, angle in enumerate(angles):
                weight = model.layers[layer].get_parameter(name)
                weight.copy_((angle.cos() * base[0] + angle.sin() * base[1]).view_as(weight) * (1 + layer))
    # R_G(k) = 1/(L−k) Σ_i Σ_j cos(θ^(ik+j), θ^((i+1)k+j)): pairs (0,2), (1,3), (2,4), (3,5)
    expected = sum(torch.cos(angles[a] - angles[a + 2]) for a in range(4)).item() / 4
    result = loop_regularization(model)
    for role in LOOPREG_NAMES:
        assert result.similarity[role].item() == pytest.approx(expected, abs=1e-6)
    assert result.penalty.item() == pytest.approx(1 - expected, abs=1e-6)  # mean over groups of 1 − R_G


def test_value_matches_formula_on_random_weights_and_block_size_overrides_the_spec():
    model = untied("6x1")  # one untied 6-layer block: the layout comes from block_size
    pairs = [(0, 3), (1, 4), (2, 5)]
    expected = formula(model, "layers", LOOPREG_NAMES, pairs)
    similarity = loop_similarity(model, block_size=3)
    assert similarity == pytest.approx({**expected, "mean": sum(expected.values()) / len(expected)}, abs=1e-6)


def test_middle_loop_regularizes_only_the_middle_blocks():
    model = untied("2x(1,2,1)")  # 8 layers: A = 0-1, B = 2-3 and 4-5 (tied), C = 6-7
    expected = formula(model, "layers", LOOPREG_NAMES, [(2, 4), (3, 5)])
    from_spec = loop_similarity(model)
    from_blocks = loop_similarity(model, blocks=[[2, 3], [4, 5]])
    assert from_spec == pytest.approx(from_blocks, abs=1e-7)
    assert {k: v for k, v in from_spec.items() if k != "mean"} == pytest.approx(expected, abs=1e-6)
    assert str(loop_target(model, blocks=[[2, 3], [4, 5]])) == "2x1+2x2+2x1"


def test_gradient_raises_every_group_similarity():
    model = untied("2x3")
    before = loop_regularization(model)
    before.penalty.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 0.05 * param.grad / param.grad.norm()
    after = loop_regularization(model).similarity
    assert all(after[role] > before.similarity[role] for role in after), (before.similarity, after)


def test_group_weights_and_norm_groups():
    model = untied("2x3")
    plain = loop_regularization(model)
    only_q = loop_regularization(model, group_weights={role: 0.0 for role in plain.similarity if role != "attn_q"})
    assert only_q.penalty.item() == pytest.approx(1 - plain.similarity["attn_q"].item())
    with_norms = loop_similarity(model, include_norms=True)
    assert {"norm_attn", "norm_mlp"} <= set(with_norms) and with_norms["norm_attn"] == pytest.approx(1.0)


def test_block_similarity_matrix_holds_every_block_pair():
    model = untied("2x3")
    matrices = block_similarity(model)
    assert matrices["attn_q"].shape == (3, 3)
    assert torch.equal(matrices["attn_q"].diagonal(), torch.ones(3))
    expected = formula(model, "layers", {"attn_q": LOOPREG_NAMES["attn_q"]}, [(0, 4), (1, 5)])["attn_q"]
    assert matrices["attn_q"][0, 2].item() == pytest.approx(expected, abs=1e-6)
    assert matrices["attn_q"][0, 1].item() == pytest.approx(loop_similarity(model, blocks=[[0, 1], [2, 3]])["attn_q"],
                                                            abs=1e-6)


def test_zero_and_tiny_norms_and_bf16_are_safe():
    model = untied("2x3")
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.zero_()
        model.layers[2].attn.k_proj.weight.mul_(1e-30)
    result = loop_regularization(model)
    result.penalty.backward()
    assert torch.isfinite(result.penalty)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    half = untied("2x3").to(torch.bfloat16)
    reference = untied("2x3")
    with torch.no_grad():  # the same bf16-rounded weights, in fp32
        for mine, theirs in zip(reference.parameters(), half.parameters()):
            mine.copy_(theirs.float())
    low = loop_regularization(half)
    assert low.penalty.dtype == torch.float32
    assert low.penalty.item() == pytest.approx(loop_regularization(reference).penalty.item(), abs=1e-6)
    low.penalty.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in half.layers.parameters() if p.grad is not None)


HF_FAMILIES = {
    # family: (config class, model class, kwargs, layer-list name, role -> parameter name in a layer)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=4, n_embd=16, n_head=2, vocab_size=32, n_positions=16),
             "transformer.h", {"attn_qkv": "attn.c_attn.weight", "attn_o": "attn.c_proj.weight",
                               "mlp_up": "mlp.c_fc.weight", "mlp_down": "mlp.c_proj.weight"}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=4, hidden_size=16, intermediate_size=32,
                                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=32),
              "model.layers", {"attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
                               "attn_v": "self_attn.v_proj.weight", "attn_o": "self_attn.o_proj.weight",
                               "mlp_up": "mlp.up_proj.weight", "mlp_gate": "mlp.gate_proj.weight",
                               "mlp_down": "mlp.down_proj.weight"}),
}


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_hugging_face_groups_are_found_by_name(family: str):
    import transformers

    config_class, model_class, kwargs, layers, names = HF_FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    similarity = loop_similarity(model, block_size=2)
    expected = formula(model, layers, names, [(0, 2), (1, 3)])
    assert {k: v for k, v in similarity.items() if k != "mean"} == pytest.approx(expected, abs=1e-6)
    loop_regularization(model, block_size=2).penalty.backward()
    assert all(model.get_submodule(layers)[0].get_parameter(n).grad is not None for n in names.values())


def one_line_error(call, *fragments: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_bad_inputs_give_one_line_errors_naming_the_model():
    model = untied("2x3")
    one_line_error(lambda: loop_regularization(model, block_size=4), "block_size=4", "6 layers of LoopedLM",
                   "[1, 2, 3]")
    one_line_error(lambda: loop_regularization(model, blocks=[[0, 1], [2]]), "blocks=[[0, 1], [2]]", "LoopedLM")
    one_line_error(lambda: loop_regularization(model, block_size=6), "ties no layers", "LoopedLM")
    one_line_error(lambda: loop_regularization(model, group_weights={"attn_x": 1.0}), "'attn_x'", "LoopedLM")
    one_line_error(lambda: loop_regularization(nn.Linear(2, 2), block_size=1), "Linear", "supported families")
    tied = LoopedLM(LoopedLMConfig(spec="2x3", vocab_size=32, d_model=16, n_heads=2))
    one_line_error(lambda: loop_regularization(tied), "LoopedLM", "already looped", "block_size")
    model.layers[2].attn.q_proj = nn.Linear(16, 8, bias=False)  # blocks of mismatched shapes
    one_line_error(lambda: loop_regularization(model), "LoopedLM", "attn_q", "layers 0 and 2", "(16, 16)", "(8, 16)")
