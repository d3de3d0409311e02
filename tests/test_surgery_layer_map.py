"""Layer-map parsing, its errors, the default map and the per-init seeding plan."""

import pytest

from loopreg.surgery.core import plan_surgery
from loopreg.surgery.layer_map import default_layer_map, format_layer_map, parse_layer_map


def test_parses_one_range_per_block():
    assert parse_layer_map("0-3,4-7,26-29", "4x(1,4,1)", 30) == [[0, 1, 2, 3], [4, 5, 6, 7], [26, 27, 28, 29]]
    assert parse_layer_map(" 2 , 5-6 ", "1x1+2x3", 8) == [[2], [5, 6]]


@pytest.mark.parametrize("text, spec, layers, init, message", [
    ("0-3,4-7,26-30", "4x(1,4,1)", 30, "copy", "layer 30 in range '26-30'.* out of range"),
    ("0-3,2-5,26-29", "4x(1,4,1)", 30, "copy", "'0-3' and '2-5' .* overlap"),
    ("3-0,4-7,26-29", "4x(1,4,1)", 30, "copy", "'3-0' .* reversed"),
    ("0-3,4-7", "4x(1,4,1)", 30, "copy", "2 ranges but loop spec '4x\\(1,4,1\\)' has 3 blocks"),
    ("0-3,4-8,26-29", "4x(1,4,1)", 30, "copy", "'4-8' has 5 layers but its block .* has 4"),
    ("0-3,4-9,26-29", "4x(1,4,1)", 30, "average", "'4-9' has 6 layers, not a multiple of its block size 4"),
    ("0-3,a-7,26-29", "4x(1,4,1)", 30, "copy", "'a-7' .* is not 'FIRST-LAST'"),
    ("0-3,,26-29", "4x(1,4,1)", 30, "copy", "'' in layer map"),
    ("0-3", "4x1", 30, "mean", "unknown init 'mean'"),
])
def test_errors_name_the_bad_part(text, spec, layers, init, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_map(text, spec, layers, init)


@pytest.mark.parametrize("text", ["", "-", "1--2", "٣-4", "0-3;4-7", "9" * 5000, "0x3", "(0-3)", "0-3,\n"])
def test_any_string_parses_or_raises_value_error(text):
    try:
        parse_layer_map(text, "4x1", 30)
    except ValueError:
        pass


def test_longer_ranges_allowed_for_average_and_stepwise():
    assert parse_layer_map("0-7", "4x2", 8, init="average") == [list(range(8))]
    assert parse_layer_map("0-7", "4x2", 8, init="stepwise") == [list(range(8))]


def test_default_keeps_the_ends_and_seeds_the_middle_from_the_middle():
    assert default_layer_map("4x(1,4,1)", 30) == [[0, 1, 2, 3], [13, 14, 15, 16], [26, 27, 28, 29]]
    assert default_layer_map("6x1", 6) == [list(range(6))]
    # average/stepwise span size x loops source layers when they fit
    assert default_layer_map("4x(1,4,1)", 24, init="average") == [[0, 1, 2, 3], list(range(4, 20)), [20, 21, 22, 23]]
    assert format_layer_map(default_layer_map("2x1+2x2+2x1", 12)) == "0-1,5-6,10-11"
    with pytest.raises(ValueError, match="needs 12 distinct source layers but the source model has 10"):
        default_layer_map("4x(1,4,1)", 10)


def test_seeding_plan_per_init():
    assert plan_surgery(8, "2x2", layers="0-3", init="average").seeds == ((0, 2), (1, 3))
    assert plan_surgery(8, "2x2", layers="0-3", init="stepwise").seeds == ((0,), (2,))
    assert plan_surgery(8, "2x2", layers="4-5").seeds == ((4,), (5,))
