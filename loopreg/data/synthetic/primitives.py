"""Reasoning primitives (paper Sec. 3.2, from Saunshi et al. 2024): variable assignment, depth 0 and 1.

``num_variables`` constants get values in ``[min_value, max_value]`` and the names ``a, b, c, ..``.
Depth 0 queries one of them. Depth 1 then assigns one alias per constant (the next letters, pointing
at the constants in shuffled order) and queries an alias. Two surface formats:

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
    """Depth-0/1 variable-assignment problems in math or code notation.

    >>> VariableAssignment(depth=1, num_variables=2).sample(random.Random(0)).prompt
    'a=6, b=6, c=a, d=b, d=?'
    """

    name: ClassVar[str] = "primitives"

    depth: int = 0
    fmt: Literal["math", "code"] = "math"
    num_variables: int = 3
    min_value: int = 0
    max_value: int = 9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_knob(self.depth in (0, 1), self.name, "depth", self.depth, "must be 0 or 1")
        check_knob(self.fmt in _ANSWER_GAP, self.name, "fmt", self.fmt, f"expected one of {sorted(_ANSWER_GAP)}")
        names_needed = self.num_variables * (self.depth + 1)
        check_knob(self.num_variables >= 1 and names_needed <= 26, self.name, "num_variables", self.num_variables,
                   "needs num_variables >= 1 and num_variables * (depth + 1) <= 26 single-letter names")
        check_knob(self.min_value >= 0, self.name, "min_value", self.min_value, "must be >= 0")
        check_knob(self.max_value >= self.min_value, self.name, "max_value", self.max_value, "must be >= min_value")

    @property
    def num_problems(self) -> int:
        """How many distinct problems the knobs allow (values x alias permutations x query choices)."""
        value_choices = (self.max_value - self.min_value + 1) ** self.num_variables
        alias_choices = math.factorial(self.num_variables) if self.depth == 1 else 1
        return value_choices * alias_choices * self.num_variables

    def sample(self, rng: random.Random) -> Example:
        """One problem; the answer is the queried variable's value."""
        count = self.num_variables
        constants = list(string.ascii_lowercase[:count])
        values = {name: str(rng.randint(self.min_value, self.max_value)) for name in constants}
        assignments = list(values.items())
        if self.depth == 0:
            query = rng.choice(constants)
            answer = values[query]
        else:
            aliases = string.ascii_lowercase[count : 2 * count]
            targets = rng.sample(constants, count)
            assignments += list(zip(aliases, targets))
            query = rng.choice(aliases)
            answer = values[targets[aliases.index(query)]]
        return Example(prompt=self._render(assignments, query), answer=answer)

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
        names = string.ascii_lowercase[: self.num_variables * (self.depth + 1)]
        return names + string.digits + _FORMAT_SYMBOLS[self.fmt] + SHOT_SEPARATOR + _ANSWER_GAP[self.fmt]
