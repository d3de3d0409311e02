"""Property-based fuzzing of the two user-facing grammars: every input either parses into something that
round-trips or raises ValueError — never another exception."""

from hypothesis import given, settings
from hypothesis import strategies as st

from loopreg.spec import LoopSpec
from loopreg.surgery.layer_map import format_layer_map, parse_layer_map

SPEC_ALPHABET = "0123456789x⊗X(),+ "
LAYER_ALPHABET = "0123456789-, "


@st.composite
def valid_specs(draw) -> str:
    stages = []
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, 12))
        loops = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
        stages.append(f"{size}x{loops[0]}" if len(loops) == 1 else f"{size}x({','.join(map(str, loops))})")
    return "+".join(stages)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(SPEC_ALPHABET, max_size=20), st.text(max_size=12), valid_specs()))
def test_spec_parses_and_round_trips_or_raises_value_error(text):
    try:
        spec = LoopSpec.parse(text)
    except ValueError:
        return
    again = LoopSpec.parse(str(spec))
    assert again == spec and str(again) == str(spec)
    assert len(spec.schedule) == spec.effective_depth >= spec.distinct_layers >= 1


@settings(max_examples=200, deadline=None)
@given(valid_specs())
def test_valid_specs_always_parse(text):
    assert str(LoopSpec.parse(text)) == text


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(LAYER_ALPHABET, max_size=24), st.text(max_size=10)),
       st.sampled_from(["4x(1,4,1)", "2x3", "1x1+2x2", "3x1"]), st.integers(1, 32),
       st.sampled_from(["copy", "average", "stepwise"]))
def test_layer_map_parses_and_round_trips_or_raises_value_error(text, spec, layers, init):
    try:
        ranges = parse_layer_map(text, spec, layers, init)
    except ValueError:
        return
    assert parse_layer_map(format_layer_map(ranges), spec, layers, init) == ranges
    flat = [layer for block in ranges for layer in block]
    assert all(0 <= layer < layers for layer in flat) and len(flat) == len(set(flat))
