"""Recipes that start from a pretrained checkpoint (``model.pretrained``): every ``recipes/retrofit/`` recipe
trains 2 steps on a tiny random Llama and exports a folder ``loopreg.load`` reads back looped; ``composer -n 2``
runs one literally; the schema's one-line errors; snapping an untied Hugging Face retrofit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopreg.config import load_recipe
from loopreg.errors import RecipeError
from loopreg.surgery.core import TIED_KEY, loop_surgery, looped_spec, stored_layers
from loopreg.surgery.relax import delta_param_count
from loopreg.loading import load
from loopreg.train import run

from .conftest import REPO, free_port

RETROFIT = sorted((REPO / "recipes" / "retrofit").glob("*.yaml"))
TEXT = REPO.parent / "shared" / "textdata"
VENV_BIN = Path(sys.executable).parent
# Each recipe's loop layout shrunk to the tiny source's 6 layers.
TINY_LAYOUT = {"keepall": ["variables.spec=2x1+2x2+2x1", "variables.layers=0-1,2-3,4-5"],
               "untied": ["variables.spec=2x1+2x2+2x1", "variables.layers=0-1,2-3,4-5"],
               "middle": ["variables.spec=1x(1,2,1)", "variables.layers=null"],
               "relaxed": ["variables.spec=1x(1,2,1)", "variables.layers=0,1-4,5",
                           "algorithms.loop_surgery.lora_rank=4"]}


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(source: Path, recipe: Path, out: Path) -> list[str]:
    """Overrides that run ``recipe`` for 2 steps on the tiny source (GPU recipes on the CPU, unsharded)."""
    layout = TINY_LAYOUT[recipe.stem.split("_")[1]]
    return [f"model.pretrained={source}", *layout, f"variables.text={TEXT}", "max_seq_len=32",
            "global_train_batch_size=2", "device_train_microbatch_size=1", "device_eval_batch_size=2",
            "eval_data.eval_size=4", "max_duration=2ba", "eval_interval=2ba", "device=cpu", "precision=fp32",
            "fsdp_config=null", "autoresume=false", "save_folder=null", "progress_bar=false", "log_to_console=false",
            f"export_folder={out}"]


def test_every_retrofit_recipe_has_a_gpu_variant_and_the_launcher_line():
    names = {path.stem for path in RETROFIT}
    assert {"smollm2_keepall_heal_cpu", "smollm2_middle_heal_cpu", "smollm2_untied_reg_kd_cpu"} <= names
    for path in RETROFIT:
        lines = path.read_text().splitlines()
        assert lines[0].startswith('_run: int = __import__("loopreg.train").train.main(__file__) or r\'\'\''), path
        assert lines[-1] == "# '''", path
        compile(path.read_text(), str(path), "exec")
        if path.stem.endswith("_cpu"):
            assert path.with_name(path.name.replace("_cpu", "_gpu")).is_file(), path
    gpu = load_recipe(REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_gpu.yaml")
    assert (gpu.device, gpu.precision, gpu.fsdp_config["sharding_strategy"]) == ("gpu", "amp_bf16", "FULL_SHARD")
    cpu = load_recipe(REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_cpu.yaml")
    assert cpu.model.pretrained.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and cpu.tokenizer.kind == "source"
    assert cpu.algorithms["loop_surgery"] == {"spec": "12x1+6x2+12x1", "layers": "0-11,12-17,18-29", "init": "copy",
                                              "tied": True}
    assert (cpu.global_train_batch_size, cpu.max_seq_len) == (8, 256)


@pytest.mark.parametrize("path", RETROFIT, ids=[p.stem for p in RETROFIT])
def test_retrofit_recipe_trains_two_steps_and_exports_a_looped_folder(path, source, tmp_path):
    overrides = tiny(source, path, tmp_path / "model")
    trainer = run(path, overrides)
    assert int(trainer.state.timestamp.batch) == 2
    recipe = load_recipe(path, overrides)
    surgery = recipe.algorithms["loop_surgery"]
    exported = load(tmp_path / "model")
    assert str(looped_spec(exported)) == surgery["spec"]
    assert getattr(exported.config, TIED_KEY) == surgery["tied"]
    spec = looped_spec(exported)
    assert len(stored_layers(exported)) == (spec.distinct_layers if surgery["tied"] else spec.effective_depth)
    assert (delta_param_count(stored_layers(exported)) > 0) == (surgery.get("lora_rank") is not None)
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    metrics = next(iter(trainer.state.eval_metrics.values()))
    assert "LanguagePerplexity" in metrics and torch.isfinite(metrics["LanguagePerplexity"].compute())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_composer_launcher_runs_a_retrofit_recipe_on_two_ranks(source, tmp_path):
    path = REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_cpu.yaml"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(VENV_BIN / "composer"), "-n", "2", "--master_port", str(free_port()),
                             "--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
                             str(path), *tiny(source, path, tmp_path / "model"), "log_to_console=true",
                             "console_log_interval=1ba"],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    logs = [result.stdout + result.stderr, (tmp_path / "rank1.out").read_text() + (tmp_path / "rank1.err").read_text()]
    assert result.returncode == 0, logs[0][-3000:]
    for log in logs:
        assert "[batch=2/2]" in log and "loss/train/kd" in log
    assert str(looped_spec(load(tmp_path / "model"))) == "2x1+2x2+2x1"


@pytest.mark.parametrize("override, fragment", [
    ("model.d_model=64", "model.pretrained is set, so the architecture is the source's: remove model.d_model"),
    ("tokenizer.kind=byte_level", "tokenizer.kind=byte_level with model.pretrained"),
    ("model.pretrained=/nonexistent/llama", "model.pretrained: /nonexistent/llama: not a model folder"),
])
def test_pretrained_schema_errors_are_one_line(override, fragment, source, tmp_path):
    path = REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_cpu.yaml"
    with pytest.raises(RecipeError) as error:
        run(path, [*tiny(source, path, tmp_path / "model"), override])
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_tokenizer_source_needs_pretrained():
    with pytest.raises(RecipeError, match="tokenizer.kind=source needs model.pretrained"):
        load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml", ["tokenizer.kind=source"])


def test_existing_recipes_resolve_as_before():
    recipe = load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml")
    assert recipe.model.pretrained is None and recipe.tokenizer.kind == "byte_level"


def test_pretrained_batches_follow_the_hugging_face_label_convention(source):
    from loopreg.train import build_dataloaders, load_pretrained

    path = REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_cpu.yaml"
    recipe = load_recipe(path, tiny(source, path, Path("unused")))
    batch = next(iter(build_dataloaders(recipe, 1, 0, load_pretrained(str(source))).train))
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()  # HuggingFaceModel shifts labels in place


def test_snapping_an_identical_untied_retrofit_gives_the_tied_logits_exactly(source, tmp_path):
    """``loopreg snap`` on an untied HF surgery output whose copies are still identical (a 3-loop block, where
    a plain mean of 3 equal floats is not always exact) writes a tied folder with the tied model's logits."""
    from loopreg.snap import application_ranges, cli_main
    from loopreg.folders import write_model_folder
    from loopreg.surgery.sources import load_source_tokenizer

    spec, layers = "1x1+2x3+3x1", "0,1-2,3-5"
    untied = loop_surgery(load(source), spec, layers=layers, tied=False)
    write_model_folder(untied, tmp_path / "untied", load_source_tokenizer(source))
    assert cli_main([str(tmp_path / "untied"), "--out", str(tmp_path / "snapped")]) == 0
    snapped = load(tmp_path / "snapped")
    tied = loop_surgery(load(source), spec, layers=layers, tied=True)
    assert getattr(snapped.config, TIED_KEY) and len(stored_layers(snapped)) == 6
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(snapped(ids).logits, tied(ids).logits)
    assert (tmp_path / "snapped" / "tokenizer.json").is_file()
    assert application_ranges("10x(1,2,1)") == "0-9,10-29,30-39"


def test_a_loopreg_folder_source_stays_a_looped_lm(tmp_path):
    """``model.pretrained`` = a loopreg folder: surgery, KD and export work on the ``LoopedLM`` itself."""
    from loopreg.data.text import byte_level_tokenizer
    from loopreg.model import LoopedLM, LoopedLMConfig

    torch.manual_seed(0)
    LoopedLM(LoopedLMConfig(spec="6x1", vocab_size=257, d_model=32, n_heads=2)).save_pretrained(tmp_path / "src")
    byte_level_tokenizer().save(str(tmp_path / "src" / "tokenizer.json"))
    path = REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_cpu.yaml"
    trainer = run(path, tiny(tmp_path / "src", path, tmp_path / "model"))
    assert int(trainer.state.timestamp.batch) == 2
    exported = load(tmp_path / "model")
    assert isinstance(exported, LoopedLM) and str(exported.spec) == "2x1+2x2+2x1"
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_a_rank_the_source_cannot_take_names_the_recipe_key(source, tmp_path):
    path = REPO / "recipes" / "retrofit" / "smollm2_relaxed_heal_cpu.yaml"
    overrides = [*tiny(source, path, tmp_path / "model"), "algorithms.loop_surgery.lora_rank=32"]
    with pytest.raises(RecipeError, match=r"^algorithms\.loop_surgery: --lora-rank 32 is above the smaller dimension "
                                          r"of projection self_attn\.k_proj \(16x32\); use at most 16 or 'full'$"):
        run(path, overrides)
