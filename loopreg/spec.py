"""The loop-spec grammar: one parser for every place that names a looped architecture.

A spec is a ``+``-separated sequence of *stages*. A stage ``kxL`` is a k-layer block applied L times
(the paper's ``(k⊗L)``); ``kx(L1,L2,...)`` is several distinct k-layer blocks in a row with their own
loop counts (``4x(1,4,1)`` is the paper's middle looping ``(4⊗1,4,1)``). ``⊗`` may be written for ``x``.

    >>> spec = LoopSpec.parse("4x(1,4,1)")
    >>> spec.distinct_layers, spec.effective_depth, spec.units_label
    (12, 24, '12x / 24x')

Blocks are applied in order and the order inside a loop is block-level (layers 1..k, then 1..k again),
so ``schedule`` lists, for each layer *application*, the index of the distinct layer it uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from .errors import UserError  # relative: copied into model folders as remote code

__all__ = ["Block", "LoopSpec"]

_STAGE = re.compile(r"^(?P<size>[0-9]*)\s*[x⊗X]\s*(?P<loops>.*)$")
_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Block:
    """``size`` distinct layers applied ``loops`` times in a row; ``offset`` is its first distinct layer."""

    size: int
    loops: int
    offset: int


@dataclass(frozen=True)
class Stage:
    """One ``+``-separated part of a spec: blocks of one size with their loop counts."""

    size: int
    loops: tuple[int, ...]

    def __str__(self) -> str:
        if len(self.loops) == 1:
            return f"{self.size}x{self.loops[0]}"
        return f"{self.size}x({','.join(map(str, self.loops))})"


@dataclass(frozen=True)
class LoopSpec:
    """A parsed loop spec. Build it with :meth:`parse`; ``str(spec)`` gives the canonical text back.

    >>> LoopSpec.parse("12⊗2").schedule[:3], str(LoopSpec.parse("12⊗2"))
    ((0, 1, 2), '12x2')
    """

    stages: tuple[Stage, ...]

    # ---------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str | LoopSpec) -> LoopSpec:
        """Parse ``text``; a malformed spec raises ``UserError`` naming the bad part.

        >>> LoopSpec.parse("2x1+4x3+2x1").effective_depth
        16
        """
        if isinstance(text, LoopSpec):
            return text
        if not isinstance(text, str):
            raise UserError(f"loop spec must be a string like '12x2', got {type(text).__name__} {text!r}")
        body = text.strip()
        # "(2⊗6)" as printed in the paper's tables: one pair of outer parentheses is allowed.
        if body.startswith("(") and body.endswith(")") and body.count("(") == 1:
            body = body[1:-1].strip()
        if not body:
            raise UserError(f"empty loop spec {text!r}; expected e.g. '12x2', '4x(1,4,1)' or '2x1+4x3+2x1'")
        stages = tuple(cls._parse_stage(part, text) for part in body.split("+"))
        return cls(stages)

    @staticmethod
    def _parse_stage(part: str, text: str) -> Stage:
        part = part.strip()
        if not part:
            raise UserError(f"empty stage in loop spec {text!r} (a stray '+')")
        match = _STAGE.match(part)
        if match is None:
            raise UserError(f"stage {part!r} of loop spec {text!r} is not of the form 'KxL' or 'Kx(L1,L2,...)'")
        size_text, loops_text = match["size"], match["loops"].strip()
        if not size_text:
            raise UserError(f"stage {part!r} of loop spec {text!r} is missing the block size before 'x'")
        size = int(size_text)
        if size < 1:
            raise UserError(f"block size {size} in stage {part!r} of loop spec {text!r} must be >= 1")
        if loops_text.startswith("(") and loops_text.endswith(")"):
            items = loops_text[1:-1].split(",")
        elif "," in loops_text and "(" not in loops_text and ")" not in loops_text:
            items = loops_text.split(",")  # the paper's own "(4⊗1,4,1)"
        elif _NUMBER.fullmatch(loops_text):
            items = [loops_text]
        else:
            raise UserError(f"loop count {loops_text!r} in stage {part!r} of loop spec {text!r} "
                             "must be a number or a parenthesised list like (1,4,1)")
        loops = []
        for item in items:
            item = item.strip()
            if not item:
                raise UserError(f"empty loop count in stage {part!r} of loop spec {text!r}")
            if not _NUMBER.fullmatch(item):
                raise UserError(f"loop count {item!r} in stage {part!r} of loop spec {text!r} is not a number")
            if int(item) < 1:
                raise UserError(f"loop count {int(item)} in stage {part!r} of loop spec {text!r} must be >= 1")
            loops.append(int(item))
        return Stage(size, tuple(loops))

    def __str__(self) -> str:
        return "+".join(map(str, self.stages))

    # ------------------------------------------------------------- structure
    @property
    def blocks(self) -> tuple[Block, ...]:
        """Every distinct block in order, with its loop count and first distinct-layer index."""
        blocks, offset = [], 0
        for stage in self.stages:
            for loops in stage.loops:
                blocks.append(Block(stage.size, loops, offset))
                offset += stage.size
        return tuple(blocks)

    @property
    def distinct_layers(self) -> int:
        """Layers with their own weights in the looped model (the paper's Params, in layer units)."""
        return sum(block.size for block in self.blocks)

    @property
    def effective_depth(self) -> int:
        """Layer applications per forward pass, D (the paper's FLOPs, in layer units)."""
        return sum(block.size * block.loops for block in self.blocks)

    @property
    def schedule(self) -> tuple[int, ...]:
        """Distinct-layer index used by each layer application, in order."""
        return tuple(block.offset + j for block in self.blocks for _ in range(block.loops) for j in range(block.size))

    @property
    def tie_groups(self) -> tuple[tuple[int, ...], ...]:
        """For each distinct layer, the application indices that share it (what an untied model regroups)."""
        groups: list[list[int]] = [[] for _ in range(self.distinct_layers)]
        for application, layer in enumerate(self.schedule):
            groups[layer].append(application)
        return tuple(tuple(group) for group in groups)

    @property
    def is_looped(self) -> bool:
        """True when any block is applied more than once."""
        return any(block.loops > 1 for block in self.blocks)

    @property
    def thinking_block(self) -> int:
        """Index (in :attr:`blocks`) of the block whose iterations carry latent thoughts: the one looped
        most often (the first on ties), e.g. the middle block of ``4x(1,4,1)``."""
        loops = [block.loops for block in self.blocks]
        return loops.index(max(loops))

    @property
    def loop_ends(self) -> tuple[int, ...]:
        """Application index of the last layer of each iteration of the :attr:`thinking_block`.

        >>> LoopSpec.parse("2x(1,3,1)").loop_ends
        (3, 5, 7)
        """
        start = sum(block.size * block.loops for block in self.blocks[:self.thinking_block])
        block = self.blocks[self.thinking_block]
        return tuple(start + (t + 1) * block.size - 1 for t in range(block.loops))

    def truncated_applications(self, grad_loops: int | None) -> range:
        """Layer applications of the thinking block's early iterations that run without an autograd graph
        when only its last ``grad_loops`` iterations are backpropagated (truncated backprop).

        >>> LoopSpec.parse("1x1+2x4+1x1").truncated_applications(1)
        range(1, 7)
        """
        block = self.blocks[self.thinking_block]
        if grad_loops is None or grad_loops >= block.loops:
            return range(0)
        if grad_loops < 1:
            raise UserError(f"grad_loops must be >= 1, got {grad_loops}")
        first = self.loop_ends[0] - block.size + 1
        return range(first, self.loop_ends[block.loops - grad_loops - 1] + 1)

    # ----------------------------------------------------------- accounting
    @property
    def params_units(self) -> int:
        return self.distinct_layers

    @property
    def flops_units(self) -> int:
        return self.effective_depth

    @property
    def units_label(self) -> str:
        """Params/FLOPs in layer units exactly as the paper's tables print them, e.g. ``'2x / 12x'``."""
        return f"{self.params_units}x / {self.flops_units}x"

    @property
    def paper_label(self) -> str:
        """The paper's notation, e.g. ``'(2⊗6)'`` or ``'(4⊗1,4,1)'``."""
        return " + ".join(f"({stage.size}⊗{','.join(map(str, stage.loops))})" for stage in self.stages)

    # ----------------------------------------------------------- variations
    def with_loops(self, loops: int | Sequence[int]) -> LoopSpec:
        """The same blocks run a different number of times (an inference-time loop override).

        An int sets every looped block (loop count > 1; the only block of a one-block spec); a sequence
        gives one count per block.

        >>> str(LoopSpec.parse("4x3").with_loops(6)), str(LoopSpec.parse("4x(1,4,1)").with_loops(8))
        ('4x6', '4x(1,8,1)')
        """
        blocks = self.blocks
        if isinstance(loops, int):
            looped = [b.loops > 1 for b in blocks] if len(blocks) > 1 else [True]
            if not any(looped):
                raise UserError(f"loop spec '{self}' has no looped block to override; give one count per block "
                                 f"({len(blocks)} blocks)")
            counts = [loops if is_looped else b.loops for b, is_looped in zip(blocks, looped)]
        else:
            counts = list(loops)
            if len(counts) != len(blocks):
                raise UserError(f"loop override {tuple(counts)} has {len(counts)} counts but loop spec '{self}' "
                                 f"has {len(blocks)} blocks")
        if any(not isinstance(c, int) or c < 1 for c in counts):
            raise UserError(f"loop override {loops!r} for loop spec '{self}': every count must be an int >= 1")
        stages, index = [], 0
        for stage in self.stages:
            stages.append(Stage(stage.size, tuple(counts[index:index + len(stage.loops)])))
            index += len(stage.loops)
        return LoopSpec(tuple(stages))

    def unrolled(self) -> LoopSpec:
        """The iso-FLOP non-looped baseline ``(D⊗1)``."""
        return LoopSpec((Stage(self.effective_depth, (1,)),))

    def iso_param(self) -> LoopSpec:
        """The iso-param non-looped baseline ``(distinct⊗1)``."""
        return LoopSpec((Stage(self.distinct_layers, (1,)),))

    def check_layer_count(self, num_layers: int, source: str = "source") -> None:
        """Raise ``UserError`` unless the spec's D layer applications match ``num_layers`` one to one.

        Used wherever existing layers are regrouped into this spec's blocks (untied grouping,
        averaging surgery, snapping).
        """
        if self.effective_depth != num_layers:
            raise UserError(f"loop spec '{self}' has {self.effective_depth} layer applications but the "
                             f"{num_layers}-layer {source} has {num_layers}; their counts must match")
