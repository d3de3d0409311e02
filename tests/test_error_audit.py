"""The error audit (README "Reliability"): every user-facing failure mode prints one ``error:`` line that
names the key, file or value, and exits 2 without a traceback. One test per row of the README table,
through the real ``loopreg`` entry (``loopreg.cli.main``; a subprocess where a DataLoader worker is
involved: its traceback must not leak)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopreg.cli import main as loopreg_main
from loopreg.data.text import byte_level_tokenizer
from loopreg.model import LoopedLM, LoopedLMConfig

from .conftest import REPO, tiny_overrides

RECIPE = str(REPO / "recipes" / "cpu_tiny_text.yaml")


def _error_line(argv: list[str], capsys) -> str:
    """Run ``loopreg ARGV``; assert exit 2, no traceback and exactly one ``error:`` line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _train(corpus: Path, *overrides: str) -> list[str]:
    return ["train", RECIPE, *tiny_overrides(corpus), "export_folder=null", *overrides]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny loopreg model folder (with tokenizer) and a tiny Hugging Face OPT folder (not a supported family)."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    LoopedLM(LoopedLMConfig(spec="4x1", vocab_size=257, d_model=16, n_heads=2,
                            d_ff=32)).save_pretrained(folder / "looped")
    byte_level_tokenizer().save(str(folder / "looped" / "tokenizer.json"))
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                             max_position_embeddings=64, word_embed_proj_dim=16)).save_pretrained(folder / "opt")
    return {"looped": folder / "looped", "opt": folder / "opt"}


def _bad_jsonl(folder: Path, name: str, good_rows: list[str]) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(row + "\n" for row in good_rows) + '{"text": "unterminated\n')
    return path


def test_bad_spec(text_corpus, capsys):
    line = _error_line(_train(text_corpus, "model.spec=12x0"), capsys)
    assert line.endswith("cpu_tiny_text.yaml: model: loop count 0 in stage '12x0' of loop spec '12x0' must be >= 1")


def test_bad_spec_in_surgery(models, tmp_path, capsys):
    line = _error_line(["surgery", str(models["looped"]), "--spec", "4x(1,,1)", "--out", str(tmp_path / "o")], capsys)
    assert "empty loop count" in line and "'4x(1,,1)'" in line


def test_unknown_recipe_key(text_corpus, capsys):
    line = _error_line(_train(text_corpus, "model.d_modle=64"), capsys)
    assert "unknown key 'model.d_modle' (did you mean 'model.d_model'?); valid keys under 'model': " in line


def test_wrong_recipe_type(text_corpus, capsys):
    line = _error_line(_train(text_corpus, "model.d_model=wide"), capsys)
    assert "wrong type for 'model.d_model': Value 'wide' of type 'str' could not be converted to Integer" in line


def test_bad_component_value(text_corpus, capsys):
    line = _error_line(_train(text_corpus, "algorithms.loop_regularizer.lambda_reg=-1"), capsys)
    assert line == "error: algorithms.loop_regularizer.lambda_reg: must be >= 0, got -1"  # the key path once


def test_missing_data_file(text_corpus, capsys):
    line = _error_line(_train(text_corpus, "train_data.source=/nonexistent/corpus.jsonl"), capsys)
    assert line == "error: train_data.source: data source '/nonexistent/corpus.jsonl' not found"


@pytest.mark.slow
def test_malformed_jsonl_line_in_training_data_read_by_a_worker(text_corpus, tmp_path):
    """Read in a DataLoader worker, the error comes back wrapped in the worker's traceback: the one line is
    still all the user sees (a real subprocess: the worker and the exit status are real)."""
    rows = [f'{{"text": "document {i} about looped transformers and their latent thoughts"}}' for i in range(8)]
    bad = _bad_jsonl(tmp_path, "corpus.jsonl", rows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([str(Path(sys.executable).parent / "loopreg"),
                             *_train(text_corpus, f"train_data.source={bad}", "train_data.num_workers=1")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {bad}:9: not valid JSON (Unterminated string starting at column 10)"], result.stderr


def test_malformed_jsonl_line_in_eval_data(models, tmp_path, capsys):
    real = (REPO.parent / "shared" / "evaldata" / "math_word" / "svamp.jsonl")
    rows = real.read_text().splitlines()[:2] if real.is_file() else []
    bad = _bad_jsonl(tmp_path / "evaldata", "math_word/svamp.jsonl", rows)
    line = _error_line(["eval", str(models["looped"]), "--tasks", "svamp", "--data-dir", str(tmp_path / "evaldata"),
                        "--out", str(tmp_path / "e.json")], capsys)
    assert line.startswith(f"error: task svamp: {bad}:{len(rows) + 1}: malformed JSON: ")


def test_unsupported_architecture(models, tmp_path, capsys):
    line = _error_line(["surgery", str(models["opt"]), "--spec", "1x2", "--out", str(tmp_path / "o")], capsys)
    assert line.startswith("error: unsupported architecture 'opt' (OPTForCausalLM); supported families: ")
    assert not (tmp_path / "o").exists()


def test_layer_map_out_of_range(models, tmp_path, capsys):
    line = _error_line(["surgery", str(models["looped"]), "--spec", "2x2", "--layers", "0-1,5-6",
                        "--out", str(tmp_path / "o")], capsys)
    assert line == ("error: layer 6 in range '5-6' of layer map '0-1,5-6' is out of range: "
                    "the source model has layers 0-3")


def test_checkpoint_missing(text_corpus, tmp_path, capsys):
    missing = tmp_path / "ep0-ba2-rank0.pt"
    line = _error_line(_train(text_corpus, f"load_path={missing}"), capsys)
    assert line == f"error: load_path: checkpoint '{missing}' not found"


def test_checkpoint_corrupt_or_truncated(text_corpus, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    torch.save({"state": {"model": {"w": torch.arange(4096.0)}}}, corrupt)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: only the CRC-32 notices
    corrupt.write_bytes(bytes(data))
    line = _error_line(_train(text_corpus, f"load_path={corrupt}"), capsys)
    assert line.startswith(f"error: load_path: checkpoint '{corrupt}' is corrupt (checksum mismatch in '")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(bytes(data[:3000]))
    line = _error_line(["snap", str(truncated), "--recipe", RECIPE, "--out", str(tmp_path / "s")], capsys)
    assert line == f"error: checkpoint '{truncated}' is truncated or not a checkpoint (File is not a zip file)"


def test_autoresume_without_a_readable_checkpoint(text_corpus, tmp_path, capsys):
    (tmp_path / "ep0-ba2-rank0.pt").write_bytes(b"killed while writing")
    line = _error_line(_train(text_corpus, f"save_folder={tmp_path}", "autoresume=true"), capsys)
    assert line == (f"error: autoresume: no readable checkpoint in '{tmp_path}' (checkpoint "
                    f"'{tmp_path / 'ep0-ba2-rank0.pt'}' is truncated or not a checkpoint (File is not a zip file)); "
                    "move the files away to start over")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_requested_but_absent(text_corpus, capsys):
    line = _error_line(_train(text_corpus, "device=gpu"), capsys)
    assert line == "error: device: 'gpu' was requested but no CUDA device is visible (set device=cpu or device=auto)"


def test_world_size_not_dividing_the_global_batch(text_corpus, monkeypatch, capsys):
    # What each rank of `composer -n 2 ... global_train_batch_size=3` sees (the launcher sets WORLD_SIZE and
    # RANK; the check runs before the process group exists, so one process stands for rank 0).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    line = _error_line(_train(text_corpus, "global_train_batch_size=3"), capsys)
    assert line == "error: global_train_batch_size=3 is not divisible by the world size 2; choose a multiple of 2"


def test_loops_on_a_model_that_does_not_loop(models, tmp_path, capsys):
    line = _error_line(["eval", str(models["looped"]), "--tasks", "svamp", "--loops", "1,2",
                        "--out", str(tmp_path / "e.json")], capsys)
    assert line == "error: --loops: this LoopedLM does not loop (spec 4x1); loop it first with `loopreg surgery`"
    assert not (tmp_path / "e.json").exists()
