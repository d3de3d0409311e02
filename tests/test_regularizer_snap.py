"""snap-to-looped (function and ``loopreg snap``) and ``loopreg similarity``."""

from __future__ import annotations

import json

import pytest
import torch

from loopreg.algorithms import loop_similarity, snap_to_looped
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.similarity import cli_main as similarity_main
from loopreg.snap import cli_main as snap_main
from loopreg.spec import LoopSpec

from .conftest import run_cli


def untied(spec: str = "2x3") -> LoopedLM:
    torch.manual_seed(0)
    return LoopedLM(LoopedLMConfig(spec=spec, tied=False, vocab_size=32, d_model=16, n_heads=2, d_ff=32))


def make_blocks_identical(model: LoopedLM, target: LoopSpec) -> None:
    """Copy each block position's first layer over the others that ``target`` ties to it."""
    with torch.no_grad():
        for applications in target.tie_groups:
            for application in applications[1:]:
                model.layers[application].load_state_dict(model.layers[applications[0]].state_dict())


TOKENS = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("spec, layout, target", [("2x3", {}, "2x3"), ("6x1", {"block_size": 2}, "2x3"),
                                                  ("2x(1,2,1)", {}, "2x(1,2,1)"),
                                                  ("8x1", {"blocks": [[2, 3], [4, 5]]}, "2x1+2x2+2x1")])
def test_snap_of_identical_blocks_changes_no_logit(spec: str, layout: dict, target: str):
    model = untied(spec)
    make_blocks_identical(model, LoopSpec.parse(target))
    snapped = snap_to_looped(model, **layout)
    assert snapped.config.tied and str(snapped.spec) == target
    assert torch.equal(snapped(TOKENS).logits, model(TOKENS).logits)


def test_snap_averages_block_positions_and_saves_a_tied_looped_model(tmp_path):
    model = untied("2x3")
    snapped = snap_to_looped(model)
    expected = torch.stack([model.layers[i].mlp.down_proj.weight for i in (1, 3, 5)]).mean(0)
    torch.testing.assert_close(snapped.layers[1].mlp.down_proj.weight, expected)
    torch.testing.assert_close(snapped.embed.weight, model.embed.weight)
    snapped.save_pretrained(tmp_path / "looped")
    loaded = LoopedLM.from_pretrained(tmp_path / "looped")
    assert loaded.config.tied and str(loaded.spec) == "2x3"
    assert loaded.num_distinct_layers == 2  # distinct params = k layers
    per_layer = sum(p.numel() for p in loaded.layers[0].parameters())
    others = sum(p.numel() for name, p in loaded.named_parameters() if not name.startswith("layers."))
    assert sum(p.numel() for p in loaded.parameters()) == 2 * per_layer + others
    assert torch.equal(loaded(TOKENS).logits, snapped(TOKENS).logits)


def test_snap_rejects_models_it_cannot_tie():
    tied = LoopedLM(LoopedLMConfig(spec="2x3", vocab_size=32, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="needs an untied LoopedLM; got LoopedLM"):
        snap_to_looped(tied)
    with pytest.raises(ValueError, match="needs an untied LoopedLM; got Linear"):
        snap_to_looped(torch.nn.Linear(2, 2))


def test_similarity_cli_prints_the_function_numbers(tmp_path, capsys):
    model = untied("6x1")
    model.save_pretrained(tmp_path / "m")
    assert similarity_main([str(tmp_path / "m"), "--block-size", "3", "--json", "--heatmaps", str(tmp_path / "h")]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = loop_similarity(model, block_size=3)
    assert report["similarity"] == pytest.approx({k: v for k, v in expected.items() if k != "mean"}, abs=1e-7)
    assert report["mean"] == pytest.approx(expected["mean"], abs=1e-7) and report["target"] == "3x2"
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == sorted(f"{g}.png" for g in report["similarity"])
    assert similarity_main([str(tmp_path / "m"), "--block-size", "3"]) == 0
    assert "mean" in capsys.readouterr().out


def test_similarity_cli_on_a_hugging_face_folder(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, vocab_size=32))
    model.save_pretrained(tmp_path / "hf")
    assert similarity_main([str(tmp_path / "hf"), "--blocks", "1-1,2-2", "--include-norms", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["class"] == "LlamaForCausalLM" and report["target"] == "1x1+1x2+1x1"
    assert report["similarity"] == pytest.approx(
        {k: v for k, v in loop_similarity(model, blocks=[[1], [2]], include_norms=True).items() if k != "mean"},
        abs=1e-6)


def test_snap_cli_writes_a_loadable_looped_model(tmp_path, capsys):
    model = untied("2x3")
    make_blocks_identical(model, model.spec)
    model.save_pretrained(tmp_path / "untied")
    assert snap_main([str(tmp_path / "untied"), "--out", str(tmp_path / "looped")]) == 0
    assert "looped (2⊗3), distinct layers: 2" in capsys.readouterr().out
    loaded = LoopedLM.from_pretrained(tmp_path / "looped")
    assert loaded.config.tied and torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


@pytest.mark.parametrize("command, args, fragment", [
    ("similarity", ["{m}", "--block-size", "4"], "block_size=4 does not divide the 6 layers of LoopedLM"),
    ("similarity", ["{tmp}/missing"], "not a model folder"),
    ("snap", ["{m}", "--out", "{tmp}/o", "--block-size", "5"], "block_size=5 does not divide"),
    ("snap", ["{tmp}/ckpt.pt", "--out", "{tmp}/o"], "pass --recipe"),
])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, command, args, fragment):
    untied("2x3").save_pretrained(tmp_path / "m")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    status, _, err = run_cli([command, *(a.format(m=tmp_path / "m", tmp=tmp_path) for a in args)], capsys)
    err = err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err and fragment in err, err
