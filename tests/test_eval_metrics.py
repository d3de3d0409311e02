"""Answer normalization, EM / F1 / numeric match and the bootstrap stderr."""

from __future__ import annotations

import math

import pytest

from loopreg.evals import bootstrap_stderr, exact, exact_match, f1, numeric_match, parse_number, score


@pytest.mark.parametrize(("prediction", "gold"), [
    ("The Beatles", "beatles"),            # article and case
    ("a  Tale of Two   Cities", "tale of two cities"),  # article and whitespace
    ("Paris!", "paris"),                   # punctuation
    ("'Hamlet.'", "Hamlet"),
    ("1,000", "1000"),                     # SQuAD strips the comma
    ("2.50", "250"),                       # ... and the decimal point
])
def test_squad_normalization_makes_these_equal(prediction: str, gold: str) -> None:
    assert exact_match(prediction, [gold]) == 1.0


@pytest.mark.parametrize(("prediction", "gold"), [
    ("Paris France", "paris"),
    ("2.5", "2.50"),                       # "25" vs "250": EM is not numeric
    ("theater", "the ater"),
])
def test_squad_normalization_keeps_these_apart(prediction: str, gold: str) -> None:
    assert exact_match(prediction, [gold]) == 0.0


def test_exact_match_takes_the_best_gold_answer() -> None:
    assert exact_match("JFK", ["John F. Kennedy", "jfk"]) == 1.0


def test_f1_is_token_overlap_with_the_best_gold() -> None:
    assert f1("the big cat", ["big dog"]) == pytest.approx(0.5)
    assert f1("big cat", ["dog", "a big cat"]) == pytest.approx(1.0)
    assert f1("", [""]) == 1.0  # SQuAD v2: an empty answer to an unanswerable question
    assert f1("something", [""]) == 0.0


@pytest.mark.parametrize(("text", "number"), [
    ("1,000", 1000.0),
    ("2.50", 2.5),
    ("-3 degrees", -3.0),
    ("It costs $1,234.50 in total", 1234.5),
    (" 12 apples and 5 pears", 12.0),
    ("0.6666666666666666", 2 / 3),
    (".5", 0.5),
    ("The answer is 7.", 7.0),
])
def test_parse_number_reads_the_first_number(text: str, number: float) -> None:
    assert parse_number(text) == pytest.approx(number)


def test_parse_number_without_a_number_is_none() -> None:
    assert parse_number("no idea") is None


def test_numeric_match_uses_relative_and_absolute_tolerance() -> None:
    assert numeric_match("1,000", ["1000"]) == 1.0
    assert numeric_match("2.50", ["2.5"]) == 1.0
    assert numeric_match("0.6667", ["0.6666666666666666"]) == 1.0   # rel error 5e-5 < 1e-4
    assert numeric_match("0.667", ["0.6666666666666666"]) == 0.0    # rel error 5e-4
    assert numeric_match("0.0000005", ["0"]) == 1.0                # abs error 5e-7 < 1e-6
    assert numeric_match("-4", ["4"]) == 0.0
    assert numeric_match("none", ["4"]) == 0.0


def test_exact_is_strict_so_one_letter_answers_survive() -> None:
    assert exact(" a", ["a"]) == 1.0
    assert exact("b", ["a"]) == 0.0
    assert exact_match("", ["a"]) == 1.0  # why synthetic tasks do not use SQuAD normalization


def test_score_dispatches_by_metric_name() -> None:
    assert score("numeric", "$1,000", ["1000.0"]) == 1.0
    assert score("f1", "big cat", ["big dog"]) == pytest.approx(0.5)


def test_bootstrap_stderr_is_seeded_and_close_to_the_analytic_value() -> None:
    scores = [1.0, 0.0] * 500
    assert bootstrap_stderr(scores, seed=3) == bootstrap_stderr(scores, seed=3)
    assert bootstrap_stderr(scores) == pytest.approx(math.sqrt(0.25 / 1000), rel=0.1)
    assert bootstrap_stderr([1.0] * 10) == 0.0
    with pytest.raises(ValueError):
        bootstrap_stderr([])
