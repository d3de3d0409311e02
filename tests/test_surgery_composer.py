"""``LoopSurgery`` in a real Composer ``Trainer`` on a Hugging Face model: at INIT, and at AFTER_LOAD to
resume from a pre-surgery checkpoint."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.core import Event
from composer.models import HuggingFaceModel
from transformers import LlamaConfig, LlamaForCausalLM

from loopreg.algorithms import LoopSurgery
from loopreg.registry import ALGORITHMS
from loopreg.surgery import LoopedLayers, get_layers
from loopreg.surgery.core import stored_layers
from tests.families import LLAMA_LIKE

pytestmark = pytest.mark.usefixtures("single_thread")


def hf_model() -> HuggingFaceModel:
    torch.manual_seed(0)
    return HuggingFaceModel(LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)), use_logits=True)


def batches(count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, LLAMA_LIKE["vocab_size"], (count * 2, 12), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer(model, optimizer, **kwargs) -> Trainer:
    return Trainer(model=model, train_dataloader=torch.utils.data.DataLoader(batches(), batch_size=2),
                   optimizers=optimizer, device="cpu", progress_bar=False, log_to_console=False, **kwargs)


def optimizer_params(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_registered_and_validates_event():
    assert ALGORITHMS["loop_surgery"] is LoopSurgery
    assert LoopSurgery("2x(1,2,1)", event="after_load").event == Event.AFTER_LOAD
    with pytest.raises(ValueError) as raised:
        LoopSurgery("2x(1,2,1)", event="fit_start")
    assert str(raised.value) == ("algorithms.loop_surgery.event: LoopSurgery event 'fit_start' "
                                 "must be one of ['init', 'after_load']")
    with pytest.raises(ValueError, match=r"^algorithms\.loop_surgery\.spec: loop count 0 in stage '2x0'"):
        LoopSurgery("2x0")


def test_surgery_at_init_trains_the_looped_model():
    model = hf_model()
    # decay / no-decay groups: dropped weights and norms live in different groups
    params = dict(model.model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if "norm" not in n]},
              {"params": [p for n, p in params.items() if "norm" in n], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    fit = trainer(model, optimizer, max_duration="2ba", algorithms=[LoopSurgery("1x(1,3,1)", tied=False)])
    layers = get_layers(model)
    assert len(layers) == 5 and optimizer_params(optimizer) == {id(p) for p in model.parameters()}
    copies = layers[2].self_attn.q_proj.weight, layers[3].self_attn.q_proj.weight
    assert torch.equal(*copies)
    fit.fit()
    assert fit.state.timestamp.batch.value == 2
    assert not torch.equal(*copies)  # the untied copies train separately


def test_resume_pre_surgery_checkpoint_with_surgery_after_load(tmp_path):
    model = hf_model()
    first = trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), max_duration="1ba",
                    save_folder=str(tmp_path), save_filename="pre.pt", save_interval="1ba")
    first.fit()
    saved = {name: tensor.clone() for name, tensor in model.model.state_dict().items()}

    resumed_model = hf_model()
    optimizer = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2)
    resumed = trainer(resumed_model, optimizer, max_duration="2ba", load_path=str(tmp_path / "pre.pt"),
                      algorithms=[LoopSurgery("2x(1,2,1)", event="after_load")],
                      save_folder=str(tmp_path), save_filename="post.pt", save_interval="2ba")
    layers = get_layers(resumed_model)
    assert isinstance(layers, LoopedLayers) and resumed.state.timestamp.batch.value == 1
    assert torch.equal(stored_layers(resumed_model)[2].mlp.up_proj.weight, saved["model.layers.2.mlp.up_proj.weight"])
    assert optimizer_params(optimizer) == {id(p) for p in resumed_model.parameters()}
    resumed.fit()
    assert resumed.state.timestamp.batch.value == 2

    # a post-surgery checkpoint holds the looped layout: resume it with the surgery at INIT
    final_model = hf_model()
    final = trainer(final_model, torch.optim.AdamW(final_model.parameters(), lr=1e-2), max_duration="3ba",
                    load_path=str(tmp_path / "post.pt"), algorithms=[LoopSurgery("2x(1,2,1)")])
    assert final.state.timestamp.batch.value == 2
    assert torch.equal(stored_layers(final_model)[2].mlp.up_proj.weight,
                       stored_layers(resumed_model)[2].mlp.up_proj.weight)
