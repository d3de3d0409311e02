"""Registries: an entry registers where it is defined; data kinds and tokenizer kinds are looked up, not
if-chained, so a user's own kind works in a recipe without editing loopreg."""

from __future__ import annotations

import pytest

from loopreg.config import load_recipe
from loopreg.data import DATA_KINDS, TOKENIZERS, Data, DataKind
from loopreg.data.text import byte_level_tokenizer, load_tokenizer
from loopreg.errors import RecipeError
from loopreg.registry_base import Registry

from .conftest import REPO

RECIPE = REPO / "recipes" / "cpu_tiny_text.yaml"


def test_register_lookup_and_a_taken_name():
    shapes = Registry("shape")

    @shapes.register("square")
    def square(side: float) -> float:
        return side * side

    assert shapes.lookup("square", "shape.kind") is square and shapes.register("square")(square) is square
    with pytest.raises(ValueError, match="shape 'square' is already registered"):
        shapes.register("square")(abs)
    with pytest.raises(RecipeError) as err:
        shapes.lookup("sqare", "shape.kind")
    assert str(err.value) == "unknown shape.kind 'sqare' (did you mean 'square'?); valid: square"


def test_the_built_in_kinds_are_registered():
    from loopreg import registry

    assert registry.DATA_KINDS is DATA_KINDS and registry.TOKENIZERS is TOKENIZERS
    assert sorted(DATA_KINDS) == ["mds", "mixture", "paired", "synthetic", "text"]
    assert sorted(TOKENIZERS) == ["byte_level", "file", "hub", "source", "synthetic"]


def test_unknown_kinds_are_one_line_did_you_mean_errors():
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, ["train_data.kind=txt"])
    assert str(err.value) == (f"{RECIPE}: unknown train_data.kind 'txt' (did you mean 'text'?); "
                              "valid: mds, mixture, paired, synthetic, text")
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, ["tokenizer.kind=bytelevel"])
    assert str(err.value) == (f"{RECIPE}: unknown tokenizer.kind 'bytelevel' (did you mean 'byte_level'?); valid: "
                              "byte_level, file, hub, source, synthetic")


@pytest.mark.parametrize("overrides, message", [
    (["train_data.source=null"], "train_data.source is required for text data (a hub dataset id or a local path)"),
    (["eval_data.kind=synthetic"], "eval_data.task is required for synthetic data (e.g. phop)"),
    (["train_data.kind=paired", "train_data.source=null"], "train_data of kind paired needs task (addition, igsm, "
                                                           "multiplication) or source "
                                                           "(a JSONL file of question/cot/answer)"),
])
def test_each_kind_checks_its_own_section(overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, overrides)
    assert str(err.value) == f"{RECIPE}: {message}"


def test_a_users_data_kind_and_tokenizer_kind_work_in_a_recipe(monkeypatch, text_corpus):
    """Registered from the user's own code: validated with its own check, built by build_dataloaders."""
    from loopreg.train import build_dataloaders

    built = []

    def check(section, name):
        if not section.task:
            raise RecipeError(f"{name}.task names the line file")

    def build(recipe, per_device, world_size, rank, pretrained):
        built.append((per_device, world_size, rank, pretrained))
        return Data(train=[], evaluation=None, tokenizer=load_tokenizer(recipe.tokenizer.kind))

    monkeypatch.setitem(DATA_KINDS, "lines", DataKind(check=check, build=build))
    monkeypatch.setitem(TOKENIZERS, "bytes_again", lambda name: byte_level_tokenizer())
    with pytest.raises(RecipeError, match=r"cpu_tiny_text.yaml: train_data.task names the line file$"):
        load_recipe(RECIPE, ["train_data.kind=lines"])
    recipe = load_recipe(RECIPE, ["train_data.kind=lines", "train_data.task=x", "tokenizer.kind=bytes_again",
                                  "global_train_batch_size=4"])
    data = build_dataloaders(recipe, world_size=2, rank=1)
    assert built == [(2, 2, 1, None)] and data.tokenizer.get_vocab_size() == 257


def test_the_synthetic_tokenizer_needs_synthetic_data(text_corpus):
    from loopreg.train import build_dataloaders

    recipe = load_recipe(RECIPE, [f"train_data.source={text_corpus}", f"eval_data.source={text_corpus}",
                                  "tokenizer.kind=synthetic"])
    with pytest.raises(RecipeError) as err:
        build_dataloaders(recipe, world_size=1, rank=0)
    assert str(err.value) == "tokenizer.kind=synthetic needs train_data.kind=synthetic"


def test_tokenizer_kinds_name_their_key(tmp_path):
    assert load_tokenizer("byte_level").get_vocab_size() == 257
    with pytest.raises(RecipeError) as err:
        load_tokenizer("file", str(tmp_path / "missing.json"))
    assert str(err.value) == f"tokenizer.name: tokenizer file '{tmp_path / 'missing.json'}' not found"
    with pytest.raises(RecipeError, match=r"^tokenizer.name is required for tokenizer.kind=hub"):
        load_tokenizer("hub")
