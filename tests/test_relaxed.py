"""Relaxed recursion (per-application low-rank deltas, issue #25): at full rank the retrofit is its source, a rank-r
delta is the truncated SVD of its application's difference, zero deltas are the tied retrofit; loop overrides,
cached decoding, adaptive exit, save/reload and the unrolled export keep working (plain transformers reads relaxed
folders in test_consumers.py); Composer trains the deltas (with source distillation and random loops); bad options
fail in one line with nothing written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from transformers import LlamaConfig, LlamaForCausalLM

from loopreg.algorithms import LoopSurgery, RandomLoops, SourceDistillation
from loopreg.errors import UserError
from loopreg.folders import write_model_folder
from loopreg.loading import load
from loopreg.looping import LoopPlan
from loopreg.relaxed import application_state, relaxation_params
from loopreg.surgery import loop_surgery
from loopreg.surgery.core import distinct_param_count, stored_layers
from loopreg.surgery.export import unrolled_model
from loopreg.surgery.relax import delta_param_count

from .conftest import run_cli
from .families import BUILDERS, LLAMA_LIKE, VOCAB

pytestmark = pytest.mark.usefixtures("single_thread")

# Every one of the 6 layers has an application: the middle four are two stored layers applied twice
SPEC, LAYERS, AVERAGE = "1x1+2x2+1x1", "0,1-4,5", dict(layers="0,1-4,5", init="average")


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[family]().eval()


def prompt_ids(rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def relaxed(source: torch.nn.Module, rank, init: str = "svd", spec: str = SPEC, **kwargs) -> torch.nn.Module:
    return loop_surgery(copy.deepcopy(source), spec, **{**AVERAGE, **kwargs}, lora_rank=rank, lora_init=init).eval()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_full_rank_is_the_source(family):
    source, ids = build(family), prompt_ids()
    # A stored layer runs with its own attention kind at every application; the tiny Qwen2's layers 0-2 are global
    # and 3-5 sliding, so its looped layer comes from the sliding ones (SPEC would pair layer 1 with layer 3).
    layout = dict(spec="3x1+1x3", layers="0-2,3-5") if family == "qwen2" else {}
    model = relaxed(source, "full", **layout)
    with torch.no_grad():
        assert (model(ids).logits - source(ids).logits).abs().max() <= 1e-4
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       source.generate(ids, max_new_tokens=6, do_sample=False))
    assert delta_param_count(stored_layers(model)) > 0


def test_a_rank_r_delta_is_the_truncated_svd_of_its_difference():
    source = build("llama")
    sources = stored_layers(source)
    for rank in (1, 4, 16):
        model = relaxed(source, rank)
        shared = stored_layers(model)[1]  # position 0 of the looped block: source layers 1 and 3, averaged
        for application, index in enumerate((1, 3)):
            merged = application_state(shared, application)["self_attn.q_proj.weight"]
            target = sources[index].self_attn.q_proj.weight
            singular = torch.linalg.svdvals(target - shared.self_attn.q_proj.weight)
            # Eckart-Young: the error of the best rank-r approximation is the norm of the dropped singular values
            assert torch.allclose(torch.linalg.norm(merged - target), singular[rank:].norm(), atol=1e-5)
            assert torch.allclose(application_state(shared, application)["input_layernorm.weight"],
                                  sources[index].input_layernorm.weight)


def test_zero_deltas_are_the_tied_retrofit():
    source, ids = build("llama"), prompt_ids()
    model, plain = relaxed(source, 4, init="zero"), loop_surgery(copy.deepcopy(source), SPEC, **AVERAGE).eval()
    assert torch.equal(model(ids).logits, plain(ids).logits)
    for name, (delta, _) in relaxation_params(stored_layers(model)[1]).items():
        assert bool(delta.any()) == name.endswith("lora_A"), name  # LoRA's start: B = 0, A random


def unrolled_reference(model: torch.nn.Module, loops: int) -> torch.nn.Module:
    """A plain Llama running ``model``'s applications at ``loops``, its layers merged per application."""
    steps = LoopPlan(model.loop_spec, True, loops).steps
    reference = LlamaForCausalLM(LlamaConfig(**{**LLAMA_LIKE, "num_hidden_layers": len(steps)})).eval()
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("model.layers.")}
    stored = stored_layers(model)
    for slot, step in enumerate(steps):
        state.update({f"model.layers.{slot}.{name}": tensor
                      for name, tensor in application_state(stored[step.layer], step.application).items()})
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("loops", [1, 2, 3])
def test_a_loop_override_runs_each_iteration_with_its_own_deltas(loops):
    """Past the stored count the last application's deltas repeat (loops=3 runs deltas 0, 1, 1)."""
    model, ids = relaxed(build("llama"), 4), prompt_ids()
    reference = unrolled_reference(model, loops)
    with torch.no_grad():
        assert torch.allclose(model(ids, loops=loops).logits, reference(ids).logits, atol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, loops=loops),
                       reference.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma3", "loopreg"])
@pytest.mark.parametrize("loops", [1, 4])
def test_cached_decoding_equals_uncached_with_left_padding(family, loops):
    model, ids = relaxed(build(family), 3), prompt_ids()
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, loops=loops, pad_token_id=0)
    assert torch.equal(model.generate(ids, **options), model.generate(ids, use_cache=False, **options))


def test_adaptive_exit_and_the_damped_rule_run_through_the_deltas():
    source, ids = build("llama"), prompt_ids()
    model = relaxed(source, 3)
    with torch.no_grad():
        assert torch.equal(model(ids, exit="latent:0").logits, model(ids).logits)  # threshold 0: the fixed loop
        damped = loop_surgery(copy.deepcopy(source), SPEC, **AVERAGE, update="damped", anchor=1.0,
                              lora_rank="full").eval()
        # beta = 1: the block's output is its single application, so only deltas 0 matter
        assert (damped(ids).logits - damped(ids, loops=1).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "loopreg"])
def test_saved_folder_reloads_and_unrolls_exactly(family, tmp_path):
    model, ids = relaxed(build(family), 5), prompt_ids()
    write_model_folder(model, tmp_path / "relaxed")
    again = load(tmp_path / "relaxed").eval()
    assert {n: t.shape for n, t in again.state_dict().items()} == {n: t.shape for n, t in model.state_dict().items()}
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(again(ids).logits, expected)
        assert torch.equal(again(ids, loops=3).logits, model(ids, loops=3).logits)
        unrolled = unrolled_model(again)
        assert not any("lora" in name or "deltas" in name for name in unrolled.state_dict())
        assert (unrolled(ids).logits - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- Composer
def lm_batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, VOCAB, (count, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def test_composer_trains_the_deltas_with_distillation_and_random_loops(tmp_path):
    source = build("llama")
    source.save_pretrained(tmp_path / "source")  # the teacher
    model = HuggingFaceModel(copy.deepcopy(source).train(), use_logits=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    algorithms = [LoopSurgery(SPEC, layers=LAYERS, init="average", lora_rank=4),
                  SourceDistillation(str(tmp_path / "source"), ce_weight=0.5),
                  RandomLoops({"kind": "uniform", "low": 1, "high": 3})]
    fit = Trainer(model=model, train_dataloader=torch.utils.data.DataLoader(lm_batches(), batch_size=2),
                  optimizers=optimizer, device="cpu", progress_bar=False, log_to_console=False, max_duration="2ba",
                  algorithms=algorithms)
    deltas = relaxation_params(stored_layers(model)[1])
    before = {name: delta.detach().clone() for name, (delta, _) in deltas.items()}
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(delta) in in_optimizer for delta, _ in deltas.values())
    fit.fit()
    assert all(not torch.equal(before[name], delta) for name, (delta, _) in deltas.items())


def test_recipe_keys_reach_the_surgery():
    surgery = LoopSurgery(SPEC, lora_rank="full", lora_init="zero", lora_roles=["attn"])
    assert (surgery.lora_rank, surgery.lora_init, surgery.lora_roles) == ("full", "zero", ["attn"])
    with pytest.raises(UserError, match=r"^algorithms\.loop_surgery\.lora_rank: .*positive integer or 'full', got 0$"):
        LoopSurgery(SPEC, lora_rank=0)


def test_roles_choose_the_relaxed_projections():
    model = relaxed(build("llama"), 2, lora_roles=["attn_q", "mlp"])
    names = {name for name in relaxation_params(stored_layers(model)[1]) if "lora" in name}
    assert {name.rpartition(".")[0] for name in names} == {"self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj",
                                                           "mlp.down_proj"}


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options, message", [
    (["--lora-rank", "0"], "--lora-rank must be a positive integer or 'full', got 0"),
    (["--lora-rank", "-2"], "--lora-rank must be a positive integer or 'full', got -2"),
    (["--lora-rank", "many"], "--lora-rank must be a positive integer or 'full', got 'many'"),
    (["--lora-rank", "17"], "--lora-rank 17 is above the smaller dimension of projection self_attn.k_proj (16x32); "
                            "use at most 16 or 'full'"),
    (["--lora-rank", "4", "--untied"], "--lora-rank 4 needs a tied retrofit: an --untied one already has its own "
                                       "layer per application"),
    (["--lora-rank", "4", "--init", "copy", "--layers", "0,1-2,5"],
     "--lora-init svd: application 2 of block 1 (2x2) has no source layer of its own: the layer map gives the block "
     "'1-2' (2 layers, 4 needed: use --init average or stepwise with such a range), or use --lora-init zero"),
    (["--lora-rank", "4", "--lora-roles", "attn_z"], "--lora-roles: unknown role 'attn_z'; family llama has "
                                                     "attn_q, attn_k, attn_v, attn_o, mlp_up, mlp_gate, mlp_down "
                                                     "(or a prefix: attn, mlp)"),
    (["--lora-roles", "attn"], "--lora-init and --lora-roles go with --lora-rank R|full"),
])
def test_bad_lora_options_fail_in_one_line_and_write_nothing(tmp_path, options, message, capsys):
    build("llama").save_pretrained(tmp_path / "source")
    layers = [] if "--layers" in options else ["--layers", LAYERS, "--init", "average"]
    code, _, err = run_cli(["surgery", str(tmp_path / "source"), "--spec", SPEC, *layers, *options,
                                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "loopreg"])
def test_activation_checkpointing_refuses_a_relaxed_layer(family):
    """Composer's wrapper would recompute a relaxed layer in backward with the last application's deltas."""
    model, plain = relaxed(build(family), 2), loop_surgery(build(family), SPEC, **AVERAGE)
    stored = stored_layers(model)
    assert model.activation_checkpointing_fn(stored[0]) and plain.activation_checkpointing_fn(stored_layers(plain)[1])
    with pytest.raises(UserError, match=r"^fsdp_config\.activation_checkpointing would recompute a relaxed layer"):
        model.activation_checkpointing_fn(stored[1])


@pytest.mark.parametrize("family, tied_key", [("llama", "loopreg_tied"), ("loopreg", "tied")])
def test_an_untied_config_with_deltas_fails_in_one_line(family, tied_key, tmp_path):
    """Only a hand-edited config can ask for deltas on an untied model (one stored layer per application)."""
    write_model_folder(relaxed(build(family), 2), tmp_path / "relaxed")
    config = json.loads((tmp_path / "relaxed" / "config.json").read_text())
    (tmp_path / "relaxed" / "config.json").write_text(json.dumps({**config, tied_key: False}))
    with pytest.raises(UserError, match=r"^loopreg_relax: .* but this 1x1\+2x2\+1x1 model is untied") as error:
        load(tmp_path / "relaxed")
    assert "\n" not in str(error.value)


def test_a_spec_without_a_loop_has_nothing_to_relax():
    with pytest.raises(UserError, match=r"^--lora-rank 4: loop spec '6x1' applies no layer twice"):
        loop_surgery(build("llama"), "6x1", lora_rank=4)


def test_the_cli_reports_shared_and_delta_parameters(tmp_path, capsys):
    build("llama").save_pretrained(tmp_path / "source")
    code, out, _ = run_cli(["surgery", str(tmp_path / "source"), "--spec", SPEC, "--layers", LAYERS, "--init",
                                         "average", "--lora-rank", "full", "--verify", "--out", str(tmp_path / "out")],
                           capsys)
    model = load(tmp_path / "out")
    deltas = delta_param_count(stored_layers(model))
    assert code == 0 and f"{distinct_param_count(model) - deltas:,} shared + {deltas:,} deltas" in out
