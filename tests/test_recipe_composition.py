"""Composed recipes (``base:``): every runnable recipe resolves to exactly the config it resolved to before the
recipes were composed (``tests/data/resolved_recipes.json``); base chains, cycles, missing bases, overrides on
top of a base, errors that name the file at fault, and the ``max_seq_len`` cross-check.

A runnable recipe is any ``.yaml`` under ``recipes/`` outside a ``base/`` folder; files in ``base/`` are bases."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from loopreg.config import load_recipe, recipe_fingerprint
from loopreg.errors import RecipeError

from .conftest import REPO

SNAPSHOT = json.loads((REPO / "tests" / "data" / "resolved_recipes.json").read_text())
RECIPE_FILES = sorted((REPO / "recipes").rglob("*.yaml"))
RUNNABLE = [path for path in RECIPE_FILES if "base" not in path.relative_to(REPO / "recipes").parts[:-1]]
BASES = [path for path in RECIPE_FILES if path not in RUNNABLE]
LAUNCHER = '_run: int = __import__("loopreg.train").train.main(__file__) or r\'\'\''


def resolved(path: Path) -> dict:
    """``asdict(load_recipe(path))`` normalised as the snapshot was: the SmolLM2 GGUF path as ``${smollm2_gguf:}``."""
    from loopreg.surgery.sources import smollm2_gguf

    text = json.dumps(asdict(load_recipe(path)), sort_keys=True)
    return json.loads(text.replace(str(smollm2_gguf()), "${smollm2_gguf:}"))


@pytest.fixture
def default_data_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot resolved ``${oc.env:LOOPREG_EVALDATA,...}``, ``LOOPREG_TEXTDATA``, ``LOOPREG_PILE_MDS`` and
    ``LOOPREG_MDS_CACHE`` to their defaults."""
    monkeypatch.delenv("LOOPREG_EVALDATA", raising=False)
    monkeypatch.delenv("LOOPREG_TEXTDATA", raising=False)
    monkeypatch.delenv("LOOPREG_PILE_MDS", raising=False)  # the Pile rows' MDS shards and their cache
    monkeypatch.delenv("LOOPREG_MDS_CACHE", raising=False)


@pytest.mark.usefixtures("default_data_folders")
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(REPO / "recipes")) for p in RUNNABLE])
def test_every_recipe_resolves_to_its_config_from_before_composition(path: Path) -> None:
    key = str(path.relative_to(REPO))
    assert key in SNAPSHOT, f"{key} is not in the snapshot"
    assert resolved(path) == SNAPSHOT[key]


def test_every_snapshot_entry_is_still_a_runnable_recipe() -> None:
    assert sorted(SNAPSHOT) == sorted(str(path.relative_to(REPO)) for path in RUNNABLE)


def test_runnable_recipes_keep_the_launcher_line_and_bases_are_used() -> None:
    assert BASES
    for path in RUNNABLE:
        lines = path.read_text().splitlines()
        assert lines[0] == LAUNCHER and lines[-1] == "# '''", path
        compile(path.read_text(), str(path), "exec")
    named = set()
    for path in RECIPE_FILES:
        for line in path.read_text().splitlines():
            if line.startswith("base: "):
                named.add((path.parent / line.removeprefix("base: ")).resolve())
    for base in BASES:
        assert not base.read_text().startswith("_run:"), base
        assert base.resolve() in named, f"{base} is no recipe's base"


def test_model_max_seq_len_is_the_data_length_unless_pretrained() -> None:
    for key, config in SNAPSHOT.items():
        if config["model"]["pretrained"] is None:
            assert config["model"]["max_seq_len"] == config["max_seq_len"], key


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_chain_of_bases_merges_base_first_and_resolves_after(tmp_path: Path) -> None:
    write(tmp_path, "base/root.yaml", "# a base\n_note: dropped like every _ key\nrun_name: row_${model.spec}\n"
                                      "max_seq_len: 64\n"
                                      "model: {d_model: 32, n_heads: 2, max_seq_len: '${max_seq_len}'}\n"
                                      "save_folder: runs/${run_name}/checkpoints\n"
                                      "train_data: {kind: synthetic, task: phop, task_kwargs: {hops: 2, length: 16}}\n")
    write(tmp_path, "base/middle.yaml", "base: root.yaml\nmodel: {spec: 2x2, n_heads: 4}\nmax_duration: 5ba\n")
    child = write(tmp_path, "rows/child.yaml", f"{LAUNCHER}\nbase: ../base/middle.yaml\nmodel: {{spec: 3x1}}\n"
                                              "train_data: {task_kwargs: {hops: 3}}\n# '''\n")
    recipe = load_recipe(child)
    assert (recipe.model.spec, recipe.model.n_heads, recipe.model.d_model) == ("3x1", 4, 32)
    assert (recipe.run_name, recipe.save_folder, recipe.max_duration) == ("row_3x1", "runs/row_3x1/checkpoints", "5ba")
    assert recipe.train_data.task_kwargs == {"hops": 3, "length": 16}  # mappings merge key by key
    assert recipe.model.max_seq_len == 64


def test_overrides_go_on_top_of_the_base_and_the_recipe(tmp_path: Path) -> None:
    write(tmp_path, "base/root.yaml", "run_name: row_${model.spec}\nmodel: {spec: 1x1, d_model: 32, n_heads: 2}\n"
                                      "max_seq_len: 64\noptimizer: {lr: 0.1}\n"
                                      "train_data: {kind: synthetic, task: phop}\n")
    child = write(tmp_path, "child.yaml", "base: base/root.yaml\nmodel: {spec: 2x2}\noptimizer: {lr: 0.2}\n")
    recipe = load_recipe(child, ["model.spec=4x1", "optimizer.lr=0.3", "model.max_seq_len=128"])
    assert (recipe.model.spec, recipe.run_name, recipe.optimizer.lr) == ("4x1", "row_4x1", 0.3)
    assert recipe.model.max_seq_len == 128
    paper = load_recipe(REPO / "recipes" / "reg_loop_12x2.yaml", ["model.spec=6x4", "max_seq_len=256"])
    assert (paper.run_name, paper.save_folder) == ("reg_loop_6x4", "runs/reg_loop_6x4/checkpoints")
    assert (paper.model.max_seq_len, paper.model.tied, paper.algorithms) == (256, False,
                                                                            {"loop_regularizer": {"lambda_reg": 10.0}})



def test_a_null_algorithm_or_callback_is_off(tmp_path: Path) -> None:
    """A child (or an override) drops an entry its base has by setting it to null."""
    reg = load_recipe(REPO / "recipes" / "cpu_phop_reg.yaml")
    assert list(reg.callbacks) == ["loop_snap", "loop_similarity_monitor"]
    off = load_recipe(REPO / "recipes" / "cpu_phop_reg.yaml", ["callbacks.loop_snap=null",
                                                               "algorithms.loop_regularizer=null"])
    assert (list(off.callbacks), off.algorithms) == (["loop_similarity_monitor"], {})
    child = write(tmp_path, "child.yaml", f"base: {REPO / 'recipes' / 'cpu_phop_reg.yaml'}\n"
                                          "callbacks: {loop_similarity_monitor: null}\n")
    assert list(load_recipe(child).callbacks) == ["loop_snap"]

@pytest.mark.parametrize("files, start, fragments", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "a.yaml",
     ["b.yaml: base 'a.yaml' makes a cycle: ", "a.yaml -> ", "b.yaml -> "]),
    ({"a.yaml": "base: ./a.yaml\n"}, "a.yaml", ["a.yaml: base './a.yaml' makes a cycle"]),
    ({"a.yaml": "base: base/nope.yaml\n"}, "a.yaml", ["a.yaml: base 'base/nope.yaml' not found", "nope.yaml"]),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: gone.yaml\n"}, "a.yaml", ["b.yaml: base 'gone.yaml' not found"]),
    ({"a.yaml": "base: [b.yaml]\n"}, "a.yaml", ["a.yaml: base must be the path of a recipe file", "['b.yaml']"]),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "model: [unclosed\n"}, "a.yaml", ["b.yaml: not valid YAML"]),
])
def test_bad_bases_are_one_line_errors_naming_the_file(tmp_path: Path, files: dict, start: str,
                                                       fragments: list[str]) -> None:
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(RecipeError) as error:
        load_recipe(tmp_path / start)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(tmp_path)), message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_keys_and_wrong_types_name_the_file_they_are_in(tmp_path: Path) -> None:
    base = write(tmp_path, "base/root.yaml", "model: {d_modle: 32}\n")
    child = write(tmp_path, "child.yaml", "base: base/root.yaml\nmax_duration: 5ba\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(child)
    assert str(error.value).startswith(f"{base}: unknown key 'model.d_modle' (did you mean 'model.d_model'?)")
    base.write_text("model: {d_model: 32}\n")
    child.write_text("base: base/root.yaml\nmax_durration: 5ba\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(child)
    assert str(error.value).startswith(f"{child}: unknown key 'max_durration' (did you mean 'max_duration'?)")
    base.write_text("model: {d_model: wide}\n")
    with pytest.raises(RecipeError, match=f"^{base}: wrong type for 'model.d_model'"):
        load_recipe(child)


def test_a_model_shorter_than_its_sequences_is_a_one_line_error(tmp_path: Path) -> None:
    path = REPO / "recipes" / "cpu_phop.yaml"
    with pytest.raises(RecipeError) as error:
        load_recipe(path, ["model.max_seq_len=32"])
    assert str(error.value) == (f"{path}: model.max_seq_len=32 is less than max_seq_len=64: the model cannot hold the "
                                "data's sequences (leave model.max_seq_len at ${max_seq_len})")
    assert load_recipe(path, ["model.max_seq_len=128"]).model.max_seq_len == 128  # room to spare is fine
    assert load_recipe(path, ["max_seq_len=96"]).model.max_seq_len == 96  # the model follows the data
    # model.pretrained: the length is the source's, the schema's model.max_seq_len is unused
    retrofit = load_recipe(REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_cpu.yaml", ["max_seq_len=4096"])
    assert (retrofit.max_seq_len, retrofit.model.max_seq_len) == (4096, 2048)


def test_the_fingerprint_follows_every_setting_and_no_machine_path(monkeypatch: pytest.MonkeyPatch):
    recipe = REPO / "recipes" / "lm_mini.yaml"
    first = recipe_fingerprint(recipe, ["seed=17"])
    monkeypatch.setenv("LOOPREG_TEXTDATA", "/elsewhere/textdata")  # interpolations are hashed unresolved
    assert recipe_fingerprint(recipe, ["seed=17"]) == first
    assert recipe_fingerprint(recipe, ["seed=18"]) != first
    assert recipe_fingerprint(recipe, ["model.init_depth=null", "seed=17"]) != first
