"""How a looped block turns one iteration's output into the next iteration's input: the *update rule*.

* ``plain`` (the default, the paper's looping): ``h ← g(h)``, K times.
* ``damped`` (training-free looping of a frozen model, arXiv 2605.23872): K damped sub-steps
  ``h_{t+1} = h_t + (g(h_t) − h_t)/K`` from the block's input ``h_0``, and the block's output is anchored to
  the source's single application: ``β·g(h_0) + (1 − β)·h_K``.

A model without loops is unchanged by either rule; ``K = 1`` or ``β = 1`` gives exactly ``g(h_0)``, the
source's output. Both :class:`~loopreg.model.LoopedLM` and tied Hugging Face retrofits run a rule through
:func:`iteration_hooks`: callables at the first and last layer application of every iteration.

    >>> enter, leave = iteration_hooks(LoopSpec.parse("1x1+2x2"), "damped", anchor=0.5)
    >>> sorted(enter), sorted(leave)
    ([1, 3], [2, 4])
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import UserError
from .spec import LoopSpec  # relative: copied into model folders as remote code (loopreg.remote_code)

__all__ = ["UPDATE_RULES", "check_update_rule", "iteration_hooks", "DampedBlock"]

UPDATE_RULES = ("plain", "damped")

Enter = Callable[[torch.Tensor], None]
Leave = Callable[[torch.Tensor], torch.Tensor]


def check_update_rule(update: str, anchor: float) -> None:
    """Raise a one-line ``UserError`` for an unknown rule or an anchor outside [0, 1].

    >>> check_update_rule("damped", 0.25)
    """
    if update not in UPDATE_RULES:
        raise UserError(f"unknown update rule '{update}'; valid: {', '.join(UPDATE_RULES)}")
    if not isinstance(anchor, (int, float)) or not 0.0 <= float(anchor) <= 1.0:
        raise UserError(f"anchor must be in [0, 1], got {anchor!r}")


class DampedBlock:
    """One damped block's state during one forward pass (``loops`` = K sub-steps, ``anchor`` = β).

    >>> block = DampedBlock(loops=2, anchor=0.0)
    >>> block.enter(0, torch.zeros(1)); h1 = block.leave(0, torch.ones(1))
    >>> block.enter(1, h1); block.leave(1, torch.ones(1))
    tensor([0.7500])
    """

    def __init__(self, loops: int, anchor: float) -> None:
        self.loops, self.anchor = loops, float(anchor)
        self.h: torch.Tensor | None = None
        self.first_output: torch.Tensor | None = None

    def enter(self, iteration: int, h: torch.Tensor) -> None:
        self.h = h
        if iteration == 0:
            self.first_output = None

    def leave(self, iteration: int, out: torch.Tensor) -> torch.Tensor:
        if iteration == 0:
            self.first_output = out
        h = self.h + (out - self.h) / self.loops
        if iteration < self.loops - 1:
            return h
        if self.anchor == 1.0:  # exactly the source's g(h_0); the sub-steps only fill their KV-cache slots
            return self.first_output
        return self.anchor * self.first_output + (1.0 - self.anchor) * h


def iteration_hooks(spec: LoopSpec, update: str, anchor: float = 0.0) -> tuple[dict[int, Enter], dict[int, Leave]]:
    """``(enter, leave)``: for the first layer application of an iteration, a callable given that
    iteration's input; for its last one, a callable mapping the layer's output to what the stack carries on
    with. Empty for ``plain``, and for blocks applied once (the damped rule is exact there)."""
    check_update_rule(update, anchor)
    enter: dict[int, Enter] = {}
    leave: dict[int, Leave] = {}
    if update == "plain":
        return enter, leave
    slot = 0
    for block in spec.blocks:
        if block.loops > 1:
            state = DampedBlock(block.loops, anchor)
            for iteration in range(block.loops):
                first = slot + iteration * block.size
                enter[first] = lambda h, s=state, t=iteration: s.enter(t, h)
                leave[first + block.size - 1] = lambda out, s=state, t=iteration: s.leave(t, out)
        slot += block.size * block.loops
    return enter, leave
