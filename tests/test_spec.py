import pytest

from loopreg import LoopSpec


@pytest.mark.parametrize("text, distinct, depth, units", [
    ("12x2", 12, 24, "12x / 24x"),
    ("12⊗2", 12, 24, "12x / 24x"),
    ("(2⊗6)", 2, 12, "2x / 12x"),
    ("4x(1,4,1)", 12, 24, "12x / 24x"),
    ("(4⊗1,4,1)", 12, 24, "12x / 24x"),
    ("2x1+4x3+2x1", 8, 16, "8x / 16x"),
    ("24x1", 24, 24, "24x / 24x"),
])
def test_parse_accounting(text, distinct, depth, units):
    spec = LoopSpec.parse(text)
    assert spec.distinct_layers == distinct
    assert spec.effective_depth == depth
    assert spec.units_label == units
    assert LoopSpec.parse(str(spec)) == spec


def test_schedule_is_block_level():
    # Layers 1..k, then 1..k again: not each layer repeated L times.
    assert LoopSpec.parse("3x2").schedule == (0, 1, 2, 0, 1, 2)
    assert LoopSpec.parse("2x(1,3,1)").schedule == (0, 1, 2, 3, 2, 3, 2, 3, 4, 5)
    assert LoopSpec.parse("1x1+2x2").schedule == (0, 1, 2, 1, 2)


def test_tie_groups_and_labels():
    spec = LoopSpec.parse("4x(1,4,1)")
    assert spec.tie_groups[4] == (4, 8, 12, 16)
    assert spec.tie_groups[0] == (0,)
    assert spec.paper_label == "(4⊗1,4,1)"
    assert LoopSpec.parse("2x6").paper_label == "(2⊗6)"
    assert str(LoopSpec.parse("4x6").unrolled()) == "24x1"
    assert str(LoopSpec.parse("4x6").iso_param()) == "4x1"


def test_loop_override():
    assert str(LoopSpec.parse("4x3").with_loops(6)) == "4x6"
    assert str(LoopSpec.parse("4x(1,4,1)").with_loops(8)) == "4x(1,8,1)"
    assert str(LoopSpec.parse("2x1+4x3+2x1").with_loops([1, 5, 2])) == "2x1+4x5+2x2"
    with pytest.raises(ValueError, match="3 blocks"):
        LoopSpec.parse("4x(1,4,1)").with_loops([1, 2])
    with pytest.raises(ValueError, match="no looped block"):
        LoopSpec.parse("2x1+2x1").with_loops(3)


@pytest.mark.parametrize("text, fragment", [
    ("12x0", "loop count 0"),
    ("4x(1,,1)", "empty loop count"),
    ("x2", "missing the block size"),
    ("0x2", "block size 0"),
    ("", "empty loop spec"),
    ("12x2+", "stray '+'"),
    ("12y2", "not of the form"),
    ("4x(1,a,1)", "'a'"),
    ("4x", "loop count ''"),
    ("4x(1,4", "'(1,4'"),
])
def test_malformed_specs_name_the_bad_part(text, fragment):
    with pytest.raises(ValueError, match=None) as info:
        LoopSpec.parse(text)
    assert fragment in str(info.value)


def test_layer_count_check():
    with pytest.raises(ValueError, match="7-layer source"):
        LoopSpec.parse("3x2").check_layer_count(7)
    LoopSpec.parse("3x2").check_layer_count(6)
