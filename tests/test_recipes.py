"""Every recipe builds and trains 2 batches on CPU; the launcher paths work literally; config errors are one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopreg import LoopedLM
from loopreg.config import load_recipe
from loopreg.errors import RecipeError
from loopreg.train import run

from .conftest import REPO, free_port, mds_overrides, tiny_overrides

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
VENV_BIN = Path(sys.executable).parent


def test_every_recipe_has_the_launcher_line_and_is_valid_python():
    assert RECIPES
    for path in RECIPES:
        lines = path.read_text().splitlines()
        assert lines[0].startswith('_run: int = __import__("loopreg.train").train.main(__file__) or r\'\'\''), path
        assert lines[-1] == "# '''", path
        compile(path.read_text(), str(path), "exec")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_smoke(path, text_corpus, tiny_mds, tmp_path):
    overrides = tiny_overrides(text_corpus, tmp_path / "ckpt")
    kind = load_recipe(path).train_data.kind
    if kind == "mds":  # the Pile rows read pre-tokenized shards
        overrides += mds_overrides(tiny_mds)
    if kind in ("synthetic", "mixture"):  # problems have their own length: eval sets must fit max_seq_len
        overrides.remove("max_seq_len=32")
    trainer = run(path, overrides)
    assert int(trainer.state.timestamp.batch) == 2
    recipe = load_recipe(path)
    exported = LoopedLM.from_pretrained(tmp_path / "ckpt" / "model")
    assert exported.spec == recipe.model.loop_spec and exported.config.tied == recipe.model.tied
    assert (tmp_path / "ckpt" / "model" / "tokenizer.json").is_file()


def test_paper_recipes_match_the_paper_setup():
    for name in ("base_24x1", "loop_12x2", "reg_loop_12x2", "middle_loop_4x1_4_1"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert (recipe.max_seq_len, recipe.global_train_batch_size, recipe.max_duration) == (1280, 512, "400000ba")
        model = recipe.model
        assert (model.d_model, model.d_ff, model.n_heads, recipe.optimizer.lr) == (2048, 5120, 32, 0.01)
    reg = load_recipe(REPO / "recipes" / "reg_loop_12x2.yaml").model
    assert (reg.tied, reg.loop_spec.effective_depth, len(reg.loop_spec.blocks)) == (False, 24, 1)
    assert load_recipe(REPO / "recipes" / "middle_loop_4x1_4_1.yaml").model.spec == "4x(1,4,1)"


def local_text(corpus: Path) -> list[str]:
    return [f"train_data.source={corpus}", f"eval_data.source={corpus}", "train_data.text_field=text",
            "eval_data.text_field=text"]


def _cli(args, cwd=REPO, timeout=300, threads=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads is not None:  # N ranks x N threads on N cores would spin in OpenMP barriers
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("override, fragment", [
    ("model.d_modle=64", "unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    ("max_durration=3ba", "unknown key 'max_durration' (did you mean 'max_duration'?)"),
    ("model.d_model=wide", "wrong type for 'model.d_model'"),
    ("model.spec=12x0", "loop count 0"),
    ("callbacks.speed_monitor.windw_size=3", "unknown key 'callbacks.speed_monitor.windw_size' "
                                             "(did you mean 'callbacks.speed_monitor.window_size'?)"),
    ("optimizer.name=adamm", "unknown optimizer 'adamm' (did you mean 'adamw'?)"),
    ("global_train_batch_size=0", "global_train_batch_size must be >= 1"),
    ("device=tpu", "device must be"),
    ("novalue", "not of the form key=value"),
])
def test_recipe_errors_exit_2_with_one_line(override, fragment, text_corpus):
    args = [str(VENV_BIN / "loopreg"), "train", "recipes/cpu_tiny_text.yaml", *local_text(text_corpus), override]
    result = _cli(args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_world_size_must_divide_global_batch(text_corpus):
    from loopreg.train import build_dataloaders

    recipe = load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml",
                         [*local_text(text_corpus), "global_train_batch_size=6"])
    with pytest.raises(RecipeError, match="not divisible by the world size 4"):
        build_dataloaders(recipe, world_size=4, rank=0)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_composer_launcher_two_cpu_ranks(text_corpus, tmp_path):
    """The user's literal usage: `composer -n 2 recipes/X.yaml` (gloo on CPU) trains and exits 0."""
    result = _cli([str(VENV_BIN / "composer"), "-n", "2", "--master_port", str(free_port()),
                   "--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
                   "recipes/cpu_tiny_text.yaml", *local_text(text_corpus), "max_duration=3ba"], threads=1)
    # Local rank 0 writes to the launcher's console, the other ranks to the --stdout/--stderr files.
    logs = [result.stdout + result.stderr, (tmp_path / "rank1.out").read_text() + (tmp_path / "rank1.err").read_text()]
    assert result.returncode == 0, logs[0][-3000:]
    for log in logs:
        assert "[batch=3/3]" in log


@pytest.mark.slow
def test_python_module_entry(text_corpus):
    result = _cli([sys.executable, "-m", "loopreg.train", "recipes/cpu_tiny_text.yaml", *local_text(text_corpus),
                   "max_duration=1ba"])
    assert result.returncode == 0, result.stderr[-2000:]


SYNTHETIC_RECIPES = sorted((REPO / "recipes" / "synthetic").glob("*.yaml"))
# Shrinks a paper-scale synthetic recipe to a 2-batch CPU run (the task itself keeps its paper knobs).
SYNTHETIC_TINY = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "global_train_batch_size=4",
                  "device_train_microbatch_size=2", "device_eval_batch_size=4", "eval_data.eval_size=4",
                  "max_duration=2ba", "eval_interval=2ba", "device=cpu", "precision=fp32", "autoresume=false",
                  "train_data.num_workers=0", "progress_bar=false"]


@pytest.mark.parametrize("path", SYNTHETIC_RECIPES, ids=[p.stem for p in SYNTHETIC_RECIPES])
def test_synthetic_recipe_smoke(path, tmp_path):
    trainer = run(path, SYNTHETIC_TINY + [f"save_folder={tmp_path}", f"export_folder={tmp_path}/model"])
    assert int(trainer.state.timestamp.batch) == 2
    assert "AnswerExactMatch" in next(iter(trainer.state.eval_metrics.values()))


def test_every_registered_scheduler_builds_from_a_recipe(text_corpus):
    """alpha_f is passed only when set: constant_with_warmup takes none (its own knobs go in scheduler.kwargs)."""
    from loopreg.registry import SCHEDULERS
    from loopreg.train import build_trainer

    for name in SCHEDULERS:
        extra = ["scheduler.alpha_f=null", "scheduler.kwargs.alpha=0.5"] if name == "constant_with_warmup" else []
        recipe = load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml",
                             [*local_text(text_corpus), f"scheduler.name={name}", *extra])
        trainer = build_trainer(recipe)  # before the fix: "unknown key 'scheduler.alpha_f'" for constant
        assert len(trainer.state.schedulers) == 1
        trainer.close()
