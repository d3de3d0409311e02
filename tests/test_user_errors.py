"""The one user-error type: its key path appears once, it survives a DataLoader worker, and it is caught in one
place for the CLI (``loopreg.cli.main``) and one for the recipe entry (``loopreg.train.main``)."""

from __future__ import annotations

import sys

import pytest
from torch.utils.data import DataLoader, IterableDataset

from loopreg.errors import DataError, RecipeError, UserError, under_key

from .conftest import REPO, run_cli, tiny_overrides

RECIPE = str(REPO / "recipes" / "cpu_tiny_text.yaml")


def test_a_key_path_is_never_doubled():
    assert str(RecipeError("must be >= 0", key="a.b")) == "a.b: must be >= 0"
    assert str(RecipeError("must be >= 0", key="a.b").at("a")) == "a.b: must be >= 0"  # names its own key
    assert str(RecipeError("a.b: unknown term").at("a")) == "a.b: unknown term"  # names it in its message
    assert str(RecipeError("a must be >= 0").at("a")) == "a must be >= 0"
    assert str(RecipeError("ab is wrong").at("a")) == "a: ab is wrong"  # 'ab' is another key
    assert str(DataError("line 1\nline 2").at("x")) == "x: line 1"
    assert type(DataError("bad").at("x")) is DataError and isinstance(DataError("bad"), UserError)


def test_under_key_prefixes_once_and_wraps_only_the_named_types():
    with pytest.raises(RecipeError) as err:
        with under_key("optimizer", ValueError):
            raise ValueError("Invalid learning rate: -1\n(more detail)")
    assert str(err.value) == "optimizer: Invalid learning rate: -1"
    with pytest.raises(DataError) as err:
        with under_key("optimizer", ValueError):
            raise DataError("lr must be >= 0", key="optimizer.lr")
    assert str(err.value) == "optimizer.lr: lr must be >= 0"
    with pytest.raises(KeyError):
        with under_key("optimizer", ValueError):
            raise KeyError("not a user error")


class _BadLines(IterableDataset):
    def __iter__(self):
        raise DataError("corpus.jsonl:9: not valid JSON")
        yield


def test_a_data_error_from_a_dataloader_worker_keeps_its_one_line():
    """PyTorch re-raises it as DataError(<the worker's traceback>); the error's own line is what remains."""
    with pytest.raises(DataError) as err:
        next(iter(DataLoader(_BadLines(), num_workers=1)))
    assert str(err.value) == "corpus.jsonl:9: not valid JSON"


class _Keyed:
    """A user's component whose own check names its key (or not, with a plain ValueError)."""

    def __init__(self, level: int = 0) -> None:
        if level == -1:
            raise RecipeError(f"must be >= 0, got {level}", key="algorithms.keyed.level")
        if level == -2:
            raise ValueError(f"level {level} is not a level\n(detail on a second line)")


@pytest.mark.parametrize("level, line", [
    (-1, "error: algorithms.keyed.level: must be >= 0, got -1"),
    (-2, "error: algorithms.keyed: level -2 is not a level"),
])
def test_a_components_error_names_its_key_once_on_the_whole_line(level, line, text_corpus, monkeypatch, capsys):
    from loopreg.registry import ALGORITHMS

    monkeypatch.setitem(ALGORITHMS, "keyed", _Keyed)
    status, _, err = run_cli(["train", RECIPE, *tiny_overrides(text_corpus), f"algorithms.keyed.level={level}"], capsys)
    assert status == 2 and err.strip() == line, err


def test_a_built_in_component_that_names_its_key_is_not_prefixed_again():
    """CoTDistillation's own key path (``algorithms.cot_distillation.weights``) used to get a second
    ``algorithms.cot_distillation:`` in front from train._build."""
    from loopreg.registry import ALGORITHMS
    from loopreg.train import _build

    with pytest.raises(RecipeError) as err:
        _build(ALGORITHMS, "cot_distillation", {"weights": {"stpe": 1.0}}, "algorithms.cot_distillation")
    assert str(err.value).startswith("algorithms.cot_distillation.weights: unknown term(s) ['stpe']; valid: ")


def test_the_recipe_entry_prints_the_same_one_line_and_exits_2(text_corpus, monkeypatch, capsys):
    """``composer recipes/x.yaml ...`` and ``python -m loopreg.train`` reach train.main; ``loopreg train``
    reaches loopreg.cli.main: the same line either way."""
    from loopreg.train import main

    overrides = [*tiny_overrides(text_corpus), "model.d_modle=64"]
    status, _, cli_err = run_cli(["train", RECIPE, *overrides], capsys)
    monkeypatch.setattr(sys, "argv", ["recipe.yaml", *overrides])
    with pytest.raises(SystemExit) as exited:
        main(RECIPE)
    entry_err = capsys.readouterr().err
    assert status == 2 and exited.value.code == 2 and entry_err == cli_err
    assert entry_err.startswith(f"error: override of {RECIPE}: unknown key 'model.d_modle' (did you mean "
                                "'model.d_model'?)") and len(entry_err.splitlines()) == 1


@pytest.mark.parametrize("argv, line", [
    (["demo", "--loops", "1"], "error: --loops must be >= 2 and --steps >= 1"),
    (["reproduce", "--tables", "sudoku"], "error: --tables: unknown table(s) ['sudoku']; "
                                          "choose from lm_mini, addition, phop, igsm"),
    (["reproduce", "--seeds", "0"], "error: --seeds: must be >= 1, got 0"),
    (["reproduce", "--tables", "phop", "--rows", "7x7"], "error: --rows: ['7x7'] not a row of phop; choose from "),
])
def test_command_errors_are_raised_and_printed_once(argv, line, capsys):
    status, out, err = run_cli(argv, capsys)
    assert status == 2 and err.startswith(line) and len(err.splitlines()) == 1 and not out, err
