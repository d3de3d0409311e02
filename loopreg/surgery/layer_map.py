"""Which source layers seed each distinct block of a loop spec: the ``--layers`` grammar and its default.

A layer map is one comma-separated range per block, in block order: ``"0-3,13-16,26-29"`` seeds the
three 4-layer blocks of ``4x(1,4,1)`` from layers 0–3, 13–16 and 26–29 of a 30-layer model. A range
``a-b`` is inclusive; a single number is a one-layer range.

    >>> parse_layer_map("0-3,13-16,26-29", "4x(1,4,1)", 30)[1]
    [13, 14, 15, 16]

With ``copy`` a range has exactly its block's size. ``average`` and ``stepwise`` may seed a block from a
longer range whose length is a multiple of the block size (see :mod:`loopreg.surgery.core`).
"""

from __future__ import annotations

import re

from loopreg.errors import UserError
from loopreg.spec import LoopSpec

__all__ = ["INITS", "parse_layer_map", "default_layer_map", "format_layer_map", "check_init"]

INITS = ("copy", "average", "stepwise")

_RANGE = re.compile(r"^(?P<first>[0-9]+)(?:\s*-\s*(?P<last>[0-9]+))?$")


def parse_layer_map(text: str, spec: LoopSpec | str, num_source_layers: int, init: str = "copy") -> list[list[int]]:
    """One list of source-layer indices per distinct block of ``spec``; any bad part raises a one-line
    :class:`~loopreg.errors.UserError` naming it (every string either parses or raises it, a ``ValueError``).

    >>> parse_layer_map("0-1, 4-7", "2x1+2x2", 8, init="average")
    [[0, 1], [4, 5, 6, 7]]
    """
    spec = LoopSpec.parse(spec)
    check_init(init)
    if not isinstance(text, str):
        raise UserError(f"layer map must be a string like '0-3,4-7,26-29', got {type(text).__name__} {text!r}")
    ranges = [_parse_range(part.strip(), text, num_source_layers) for part in text.split(",")]
    _check_ranges(ranges, spec, text, init)
    return ranges


def default_layer_map(spec: LoopSpec | str, num_source_layers: int, init: str = "copy") -> list[list[int]]:
    """The first block from the first layers, the last block from the last layers, the blocks between
    from the middle of the stack. With ``average``/``stepwise`` a looped block spans ``size × loops``
    source layers when they all fit (so ``12x2`` on 24 layers averages the whole stack).

    >>> default_layer_map("4x(1,4,1)", 30)
    [[0, 1, 2, 3], [13, 14, 15, 16], [26, 27, 28, 29]]
    """
    spec = LoopSpec.parse(spec)
    check_init(init)
    blocks = spec.blocks
    lengths = [block.size for block in blocks]
    if init != "copy" and sum(b.size * b.loops for b in blocks) <= num_source_layers:
        lengths = [block.size * block.loops for block in blocks]
    if sum(lengths) > num_source_layers:
        raise UserError(f"loop spec '{spec}' needs {sum(lengths)} distinct source layers but the source model has "
                         f"{num_source_layers}")
    if len(blocks) == 1:
        starts = [0]
    else:
        middle = sum(lengths[1:-1])
        middle_start = min(max((num_source_layers - middle) // 2, lengths[0]), num_source_layers - lengths[-1] - middle)
        starts = [0, *_running_starts(middle_start, lengths[1:-1]), num_source_layers - lengths[-1]]
    return [list(range(start, start + length)) for start, length in zip(starts, lengths)]


def format_layer_map(ranges: list[list[int]]) -> str:
    """The ``--layers`` text for ``ranges`` (the inverse of :func:`parse_layer_map`).

    >>> format_layer_map([[0, 1, 2, 3], [13], [26, 27]])
    '0-3,13,26-27'
    """
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in ranges)


def check_init(init: str) -> None:
    """Raise a one-line :class:`~loopreg.errors.UserError` unless ``init`` is one of :data:`INITS`."""
    if init not in INITS:
        raise UserError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def _running_starts(start: int, lengths: list[int]) -> list[int]:
    starts = []
    for length in lengths:
        starts.append(start)
        start += length
    return starts


def _parse_range(part: str, text: str, num_source_layers: int) -> list[int]:
    match = _RANGE.match(part)
    if match is None:
        raise UserError(f"layer range {part!r} in layer map {text!r} is not 'FIRST-LAST' or a single layer number")
    first = int(match["first"])
    last = int(match["last"]) if match["last"] is not None else first
    if first > last:
        raise UserError(f"layer range {part!r} in layer map {text!r} is reversed; write it as '{last}-{first}'")
    if last >= num_source_layers:
        raise UserError(f"layer {last} in range {part!r} of layer map {text!r} is out of range: the source model has "
                         f"layers 0-{num_source_layers - 1}")
    return list(range(first, last + 1))


def _check_ranges(ranges: list[list[int]], spec: LoopSpec, text: str, init: str) -> None:
    blocks = spec.blocks
    if len(ranges) != len(blocks):
        raise UserError(f"layer map {text!r} has {len(ranges)} ranges but loop spec '{spec}' "
                         f"has {len(blocks)} blocks; give one range per block")
    for block, layers in zip(blocks, ranges):
        label = format_layer_map([layers])
        if init == "copy" and len(layers) != block.size:
            raise UserError(f"layer range '{label}' has {len(layers)} layers but its block in loop spec '{spec}' has "
                             f"{block.size}; with init 'copy' they must match")
        if len(layers) % block.size:
            raise UserError(f"layer range '{label}' has {len(layers)} layers, not a multiple of its block size "
                             f"{block.size} in loop spec '{spec}'")
    ordered = sorted(ranges)
    for before, after in zip(ordered, ordered[1:]):
        if after[0] <= before[-1]:
            raise UserError(f"layer ranges '{format_layer_map([before])}' and '{format_layer_map([after])}' "
                             f"in layer map {text!r} overlap; each source layer may seed one block")
