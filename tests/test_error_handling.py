"""Only user errors become one ``error:`` line and exit 2: an internal error in a command keeps its traceback,
``LOOPREG_DEBUG=1`` shows a user error's traceback too, and library code raises :class:`UserError` where it checks
what the user gave (docs/RELIABILITY.md, "Errors")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from loopreg.cli import main as loopreg_main
from loopreg.errors import DataError, RecipeError, UserError, under_key, writing
from loopreg.model import LoopedLM, LoopedLMConfig


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untied LoopedLM folder (spec 2x2: four stored layers), with its tokenizer."""
    from loopreg.data.text import byte_level_tokenizer

    folder = tmp_path_factory.mktemp("models") / "untied"
    torch.manual_seed(0)
    LoopedLM(LoopedLMConfig(spec="2x2", tied=False, vocab_size=257, d_model=16, n_heads=2,
                            d_ff=32)).save_pretrained(folder)
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def truncated(untied: Path) -> Path:
    """``untied`` with its weights file cut short: safetensors raises its own error (no ValueError, no OSError)."""
    folder = untied.with_name("truncated")
    folder.mkdir()
    for file in untied.iterdir():
        data = file.read_bytes()
        (folder / file.name).write_bytes(data[:300] if file.suffix == ".safetensors" else data)
    return folder


def _status(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(argv)
    return exit_info.value.code, capsys.readouterr().err


# (command line, a function deep inside the command, the internal error it raises there); {m}: the model folder
INTERNAL = {
    "surgery": (["surgery", "{m}", "--spec", "1x(1,2,1)", "--out", "{tmp}/o"], "loopreg.surgery.cli.plan_surgery",
                ValueError),
    "export": (["export", "{m}", "--unroll", "--out", "{tmp}/o"], "loopreg.surgery.export.unrolled_model", OSError),
    "layers": (["layers", "{m}", "--text", "{tmp}/t.txt"], "loopreg.surgery.layers_cli.calibration_tokens",
               ValueError),
    "snap": (["snap", "{m}", "--out", "{tmp}/o"], "loopreg.snap.snap_model", KeyError),
    "similarity": (["similarity", "{m}"], "loopreg.algorithms.loop_similarity", OSError),
    "eval": (["eval", "{m}", "--tasks", "svamp", "--out", "{tmp}/e.json"], "loopreg.evals.run.resolve_tasks",
             ValueError),
    "report": (["report", "{tmp}"], "loopreg.evals.report.load_results", ValueError),
}


@pytest.mark.parametrize("command", list(INTERNAL))
def test_an_internal_error_keeps_its_traceback(command, untied, tmp_path, monkeypatch, capsys):
    argv, target, error = INTERNAL[command]

    def bug(*args, **kwargs):
        raise error("boom")

    monkeypatch.setattr(target, bug)
    with pytest.raises(error, match="boom") as raised:
        loopreg_main([part.format(m=untied, tmp=tmp_path) for part in argv])
    assert not isinstance(raised.value, UserError)  # not caught as a user error: Python prints its traceback
    assert "error:" not in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("debug", [False, True])
def test_loopreg_debug_prints_the_traceback_of_a_user_error(debug, truncated, monkeypatch, capsys):
    if debug:
        monkeypatch.setenv("LOOPREG_DEBUG", "1")
    else:
        monkeypatch.delenv("LOOPREG_DEBUG", raising=False)
    status, err = _status(["similarity", str(truncated)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"error: {truncated}: "), err
    assert err.endswith(lines[0] + "\n")  # the one line comes last
    assert ("Traceback (most recent call last)" in err) == debug
    # the library error that the UserError replaced (`raise ... from None`) is shown too
    assert ("During handling of the above exception" in err) == debug


def test_loopreg_debug_in_the_recipe_entry(tmp_path, monkeypatch, capsys):
    from loopreg.train import main as train_main

    monkeypatch.setenv("LOOPREG_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["train"])
    with pytest.raises(SystemExit) as exit_info:
        train_main(str(tmp_path / "missing.yaml"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback (most recent call last)" in err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1 and "missing.yaml" in err


def test_library_checks_of_user_input_raise_user_errors(untied, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from loopreg.algorithms.loop_regularizer import loop_target
    from loopreg.data.text import text_stream
    from loopreg.evals.lm_eval_model import check_loop_override
    from loopreg.loading import load
    from loopreg.surgery.adapters import find_adapter
    from loopreg.surgery.layer_map import parse_layer_map

    with pytest.raises(UserError, match="is out of range: the source model has layers 0-3"):
        parse_layer_map("0-1,5-6", "2x2", 4)
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16))
    with pytest.raises(UserError, match="unsupported architecture 'opt'"):
        find_adapter(opt)
    with pytest.raises(UserError, match="missing: not a model folder"):
        load(tmp_path / "missing")
    with pytest.raises(DataError, match="not found"):
        text_stream(str(tmp_path / "missing.jsonl"))
    model = LoopedLM.from_pretrained(untied)
    with pytest.raises(UserError, match="block_size=3 does not divide the 4 layers"):
        loop_target(model, block_size=3)
    with pytest.raises(UserError, match="--loops: loops=2 needs a tied looped model; this one is untied"):
        check_loop_override(model, loops=2)


def test_an_unwritable_output_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=f"^cannot write {blocker}/out.md: Not a directory$"):
        with writing(blocker / "out.md"):
            (blocker / "out.md").write_text("")


def test_under_key_makes_a_plain_user_error_a_recipe_error_and_keeps_a_data_error():
    with pytest.raises(RecipeError, match="^model.pretrained: x: not found$"):
        with under_key("model.pretrained"):
            raise UserError("x: not found")
    with pytest.raises(DataError, match="^train_data.source: data source 'x' not found$"):
        with under_key("train_data.source"):
            raise DataError("data source 'x' not found")
