"""Reasoning primitives (paper Sec. 3.2, from Saunshi et al. 2024): variable assignment at any depth.

``num_variables`` constants get values in ``[min_value, max_value]`` and the names ``a, b, c, ..``.
Depth 0 queries one of them. Each further level of depth assigns one alias per variable of the level
before (the next letters, pointing at that level in shuffled order), and the query names a variable of
the last level, so answering takes ``depth`` pointer hops. The paper's primitives are depths 0 and 1;
deeper chains (a tuple of depths mixes them) are the multi-step reasoning documents of the pretraining
mixture (``recipes/lm_mini.yaml``). Two surface formats:

* ``fmt="math"``: ``a=1, b=2, c=6, b=?`` -> ``2``; depth 1: ``a=1, b=2, c=a, d=b, d=?`` -> ``2``.
* ``fmt="code"``: one Python statement per line, ending in a newline, so the answer is what the
  program prints: ``"a = 1\\nb = 2\\nc = 6\\nprint(b)\\n"`` -> ``2``.

``few_shot_prompt`` builds the 5-shot evaluation prompt: shots separated by a blank line, each shot the
prompt followed by its answer (after one space for math, directly on the next line for code), then
the query prompt followed by that same gap, so the model's continuation is exactly the answer.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from typing import ClassVar, Literal

from loopreg.data.synthetic.base import Example, SyntheticTask, check_knob

__all__ = ["SHOT_SEPARATOR", "VariableAssignment"]

SHOT_SEPARATOR = "\n\n"
_ANSWER_GAP = {"math": " ", "code": ""}  # what separates a prompt from its answer inside a shot
_FORMAT_SYMBOLS = {"math": "=, ?", "code": " =\nprint()"}


@dataclass(frozen=True)
class VariableAssignment(SyntheticTask):
    """Variable-assignment problems of ``depth`` hops (an int, or a tuple to draw from) in math or code notation.

    >>> VariableAssignment(depth=1, num_variables=2).sample(random.Random(0)).prompt
    'a=6, b=6, c=a, d=b, d=?'
    """

    name: ClassVar[str] = "primitives"

    depth: int | tuple[int, ...] = 0
    fmt: Literal["math", "code"] = "math"
    num_variables: int = 3
    min_value: int = 0
    max_value: int = 9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.depth, (int, tuple)):  # a recipe's YAML list
            object.__setattr__(self, "depth", tuple(self.depth))
        check_knob(all(isinstance(d, int) and d >= 0 for d in self.depths) and self.depths, self.name, "depth",
                   self.depth, "must be an int >= 0 or a non-empty list of them")
        check_knob(self.fmt in _ANSWER_GAP, self.name, "fmt", self.fmt, f"expected one of {sorted(_ANSWER_GAP)}")
        names_needed = self.num_variables * (max(self.depths) + 1)
        check_knob(self.num_variables >= 1 and names_needed <= 26, self.name, "num_variables", self.num_variables,
                   "needs num_variables >= 1 and num_variables * (depth + 1) <= 26 single-letter names")
        check_knob(self.min_value >= 0, self.name, "min_value", self.min_value, "must be >= 0")
        check_knob(self.max_value >= self.min_value, self.name, "max_value", self.max_value, "must be >= min_value")

    @property
    def depths(self) -> tuple[int, ...]:
        return self.depth if isinstance(self.depth, tuple) else (self.depth,)

    @property
    def num_problems(self) -> int:
        """How many distinct problems the knobs allow (values x alias permutations x query choices)."""
        value_choices = (self.max_value - self.min_value + 1) ** self.num_variables
        return sum(value_choices * math.factorial(self.num_variables) ** depth * self.num_variables
                   for depth in self.depths)

    def sample(self, rng: random.Random) -> Example:
        """One problem; the answer is the queried variable's value."""
        depth = rng.choice(self.depth) if isinstance(self.depth, tuple) else self.depth
        count = self.num_variables
        level = list(string.ascii_lowercase[:count])
        values = {name: str(rng.randint(self.min_value, self.max_value)) for name in level}
        assignments = list(values.items())
        for hop in range(1, depth + 1):
            aliases = string.ascii_lowercase[hop * count : (hop + 1) * count]
            targets = rng.sample(level, count)
            assignments += list(zip(aliases, targets))
            values.update((alias, values[target]) for alias, target in zip(aliases, targets))
            level = list(aliases)
        query = rng.choice(level)
        return Example(prompt=self._render(assignments, query), answer=values[query])

    def _render(self, assignments: list[tuple[str, str]], query: str) -> str:
        if self.fmt == "math":
            return ", ".join(f"{name}={value}" for name, value in assignments) + f", {query}=?"
        return "".join(f"{name} = {value}\n" for name, value in assignments) + f"print({query})\n"

    def few_shot_prompt(self, rng: random.Random, shots: int = 5, query: Example | None = None) -> Example:
        """A ``shots``-shot prompt ending in ``query`` (sampled when not given); no shot repeats the query.

        Example: ``'a=3, b=1, c=7, c=? 7\\n\\n ... \\n\\na=1, b=2, c=6, b=? '`` with answer ``'2'``.
        """
        check_knob(0 <= shots < self.num_problems, self.name, "shots", shots,
                   f"must be in [0, {self.num_problems - 1}]: the shots and the query must all differ")
        query = query if query is not None else self.sample(rng)
        gap = _ANSWER_GAP[self.fmt]
        seen = {query.prompt}
        demonstrations = []
        while len(demonstrations) < shots:
            shot = self.sample(rng)
            if shot.prompt not in seen:
                seen.add(shot.prompt)
                demonstrations.append(f"{shot.prompt}{gap}{shot.answer}")
        prompt = "".join(demo + SHOT_SEPARATOR for demo in demonstrations) + query.prompt + gap
        return Example(prompt=prompt, answer=query.answer)

    def _problem_symbols(self) -> str:
        names = string.ascii_lowercase[: self.num_variables * (max(self.depths) + 1)]
        return names + string.digits + _FORMAT_SYMBOLS[self.fmt] + SHOT_SEPARATOR + _ANSWER_GAP[self.fmt]
