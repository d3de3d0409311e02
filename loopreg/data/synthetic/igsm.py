"""Symbolic i-GSM (paper Sec. 2.3, after Ye et al. 2024 "Physics of LMs 2.1"), mod-``modulus`` arithmetic.

Generation: an entity hierarchy of ``levels`` levels with ``entities_per_level`` capital letters each
(defaults: A–D, E–H, I–L, M–P); a random *structure graph* of edges from level ``i`` to level ``i+1``,
each edge an instance parameter named ``X#Y``; a dependency DAG over those parameters in which every
parameter is a constant ``0..modulus-1`` or a sum/difference of others, with optional ``c * NAME`` terms.
The query needs exactly ``num_ops`` parameters (itself included); ``num_distractors`` more are defined
from any parameters but are never needed by the query. ``num_ops`` may be a tuple, the size curriculum of
Ye et al.: each problem draws its count from it (``(1, 2, 3, 4)`` mixes lookups of one constant with
full chains), and an eval variant fixes one count.

No shortcuts: the query's value is a linear form of the constants it reads (mod ``modulus``), and a problem
is drawn again until that form has a nonzero coefficient on every one of them and reads at least two
(where two leaves fit: ``num_ops >= 3`` and ``max_edges >= 2``). So no chain cancels (``X − X`` is 0
whatever X is), the answer is uniform over ``0..modulus-1`` (no majority answer to learn), and it is
never a function of one digit of the prompt (a copy chain ``A := B. B := 5.`` is answered by the only needed
constant, whatever the chain).
``tests/test_synthetic_generators.py`` checks that a majority rule and a linear probe on shallow features
stay at chance.

Prompt: every statement ``NAME := expr.`` in scrambled order, joined by single spaces, then ``NAME?``.
Answer: the query's value, one digit. CoT: the needed parameters in topological order (operands first,
query last), each step written without spaces as ``X=expr=>X=v.``

    prompt  L#M := 3. J#P := F#K + E#I. F#K := 5. E#I := 3 * L#P. L#P := 0. J#P?
    answer  5
    cot     F#K=5=>F#K=5.  L#P=0=>L#P=0.  E#I=3*L#P=>E#I=0.  J#P=F#K+E#I=>J#P=5.

(``num_ops=4, num_distractors=1``: ``L#M`` is the distractor; ``render_cot`` joins steps with a space.)
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import ClassVar

from loopreg.data.synthetic.base import Example, SyntheticTask, as_counts, check_knob

__all__ = ["SymbolicIGSM"]

Term = tuple[int, int, str]  # (sign +1/-1, coefficient >= 1, parameter name)
Definition = int | list[Term]  # a constant, or a signed sum of terms


@dataclass(frozen=True)
class SymbolicIGSM(SyntheticTask):
    """Symbolic i-GSM problems: evaluate one parameter of a scrambled modular dependency DAG.

    ``max_edges`` bounds the operands of one expression; ``max_depth`` bounds the longest dependency
    path (query to a constant); ``coefficient_rate`` is the chance that a term is ``c * NAME``.

    >>> SymbolicIGSM().sample(random.Random(0)).prompt.endswith("?")
    True
    """

    name: ClassVar[str] = "igsm"
    has_cot: ClassVar[bool] = True

    num_ops: int | tuple[int, ...] = 8
    max_edges: int = 3
    max_depth: int = 4
    num_distractors: int = 4
    levels: int = 4
    entities_per_level: int = 4
    modulus: int = 7
    coefficient_rate: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_knob(self.levels >= 2, self.name, "levels", self.levels, "must be >= 2 to have any edge")
        check_knob(self.entities_per_level >= 1 and self.levels * self.entities_per_level <= 26, self.name,
                   "entities_per_level", self.entities_per_level, "needs levels * entities_per_level in [1, 26]")
        check_knob(3 <= self.modulus <= 10, self.name, "modulus", self.modulus,
                   "must be in [3, 10] so values are one digit and coefficients 2.. exist")
        check_knob(0.0 <= self.coefficient_rate <= 1.0, self.name, "coefficient_rate", self.coefficient_rate,
                   "must be in [0, 1]")
        check_knob(self.max_edges >= 1, self.name, "max_edges", self.max_edges, "must be >= 1")
        check_knob(self.max_depth >= 1, self.name, "max_depth", self.max_depth, "must be >= 1")
        # the query's dependency tree has at most 1 + E + E^2 + .. + E^D nodes
        capacity = sum(self.max_edges**level for level in range(self.max_depth + 1))
        most = min(capacity, self.num_parameters)
        counts = self.op_counts
        check_knob(len(counts) > 0 and all(isinstance(n, int) and 1 <= n <= most for n in counts), self.name,
                   "num_ops", self.num_ops, f"every count must be in [1, {most}] for max_edges={self.max_edges}, "
                   f"max_depth={self.max_depth} and {self.num_parameters} structure edges")
        check_knob(0 <= self.num_distractors <= self.num_parameters - max(counts), self.name, "num_distractors",
                   self.num_distractors, f"must be in [0, {self.num_parameters - max(counts)}]")

    @property
    def op_counts(self) -> tuple[int, ...]:
        """The needed-parameter counts problems are drawn from, always as a tuple."""
        return as_counts(self.num_ops)

    @property
    def num_parameters(self) -> int:
        """How many distinct instance parameters (structure edges) the hierarchy offers."""
        return (self.levels - 1) * self.entities_per_level**2

    def sample(self, rng: random.Random) -> Example:
        """One problem: a fresh structure graph, dependency DAG, scrambled statements and the query, whose
        value depends on every constant it reads (drawn again until it does)."""
        counts = self.op_counts
        # one count draws nothing, so a fixed-count task keeps the stream it had before curricula existed
        count = counts[0] if len(counts) == 1 else rng.choice(counts)
        while True:
            example = self._draw(rng, count)
            if example is not None:
                return example

    def _draw(self, rng: random.Random, count: int) -> Example | None:
        names = self._sample_parameter_names(rng, count)
        needed, distractors = names[:count], names[count:]
        query = needed[0]
        definitions: dict[str, Definition] = {
            needed[node]: self._define(rng, [needed[operand] for operand in operands])
            for node, operands in enumerate(self._sample_dependency_dag(rng, count))
        }
        order = topological_order(definitions, query)
        dependence = self._dependence(definitions, order)
        if not all(dependence.values()) or len(dependence) < self._min_constants(count):
            return None  # a constant cancels out, or one digit decides the answer: a shortcut around the chain
        values: dict[str, int] = {}
        heights: dict[str, int] = {}
        for name in order:
            values[name] = self._evaluate(definitions[name], values)
            heights[name] = _height(definitions[name], heights)
        for name in distractors:  # defined from anything earlier; nothing needed reads them
            candidates = [other for other in definitions if heights[other] < self.max_depth]
            operands = rng.sample(candidates, rng.randint(0, min(self.max_edges, len(candidates))))
            definitions[name] = self._define(rng, operands)
            heights[name] = _height(definitions[name], heights)
        statements = [f"{name} := {_expression(definition)}." for name, definition in definitions.items()]
        rng.shuffle(statements)
        cot = tuple(
            f"{name}={_expression(definitions[name]).replace(' ', '')}=>{name}={values[name]}." for name in order
        )
        return Example(prompt=" ".join(statements) + f" {query}?", answer=str(values[query]), cot=cot)

    def _sample_parameter_names(self, rng: random.Random, count: int) -> list[str]:
        """Distinct ``X#Y`` edges of a random structure graph (``X`` on level i, ``Y`` on level i+1)."""
        letters = string.ascii_uppercase
        per_level = self.entities_per_level
        edges = [
            f"{letters[level * per_level + upper]}#{letters[(level + 1) * per_level + lower]}"
            for level in range(self.levels - 1)
            for upper in range(per_level)
            for lower in range(per_level)
        ]
        return rng.sample(edges, count + self.num_distractors)

    def _sample_dependency_dag(self, rng: random.Random, count: int) -> list[list[int]]:
        """Operands of each needed node; node 0 is the query and every node is reachable from it.

        A random tree rooted at the query guarantees reachability and the depth bound; then
        expressions may also read any node deeper in that tree, which shares operands (as in the
        paper's example) while every edge still goes strictly deeper, so the graph stays acyclic.
        """
        depth = [0]
        operands: list[list[int]] = [[]]
        while len(depth) < count:
            expandable = [node for node, node_depth in enumerate(depth)
                          if node_depth < self.max_depth and len(operands[node]) < self.max_edges]
            parent = rng.choice(expandable)  # non-empty: count is within the tree capacity
            operands[parent].append(len(depth))
            operands.append([])
            depth.append(depth[parent] + 1)
        for node, node_operands in enumerate(operands):
            if node_operands:
                deeper = [other for other, other_depth in enumerate(depth)
                          if other_depth > depth[node] and other not in node_operands]
                extra = rng.randint(0, self.max_edges - len(node_operands))
                node_operands += rng.sample(deeper, min(extra, len(deeper)))
                rng.shuffle(node_operands)
        return operands

    def _define(self, rng: random.Random, operands: list[str]) -> Definition:
        """A constant when there are no operands, else a signed sum with occasional coefficients."""
        if not operands:
            return rng.randrange(self.modulus)
        terms = []
        for position, operand in enumerate(operands):
            sign = 1 if position == 0 else rng.choice((1, -1))
            coefficient = rng.randrange(2, self.modulus) if rng.random() < self.coefficient_rate else 1
            terms.append((sign, coefficient, operand))
        return terms

    def _min_constants(self, count: int) -> int:
        """Constants a query of ``count`` needed parameters must read: two where its tree can have two leaves."""
        return 2 if count >= 3 and self.max_edges >= 2 else 1

    def _dependence(self, definitions: dict[str, Definition], order: list[str]) -> dict[str, int]:
        """The query's coefficient (mod ``modulus``) on each constant it reads: its value as a linear form."""
        forms: dict[str, dict[str, int]] = {}
        for name in order:  # operands first
            definition = definitions[name]
            if isinstance(definition, int):
                forms[name] = {name: 1}
                continue
            form: dict[str, int] = {}
            for sign, coefficient, operand in definition:
                for constant, weight in forms[operand].items():
                    form[constant] = (form.get(constant, 0) + sign * coefficient * weight) % self.modulus
            forms[name] = form
        return forms[order[-1]]

    def _evaluate(self, definition: Definition, values: dict[str, int]) -> int:
        if isinstance(definition, int):
            return definition
        return sum(sign * coefficient * values[name] for sign, coefficient, name in definition) % self.modulus

    def _problem_symbols(self) -> str:
        letters = string.ascii_uppercase[: self.levels * self.entities_per_level]
        digits = string.digits[: self.modulus]
        return letters + digits + "#:=.+-*?> "


def topological_order(definitions: dict[str, Definition], query: str) -> list[str]:
    """The parameters ``query`` needs, each after its operands (depth-first post-order), query last.

    Example: ``topological_order({"A#E": 3, "B#E": [(1, 1, "A#E")]}, "B#E") == ["A#E", "B#E"]``
    """
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        definition = definitions[name]
        if not isinstance(definition, int):
            for _, _, operand in definition:
                visit(operand)
        order.append(name)

    visit(query)
    return order


def _height(definition: Definition, heights: dict[str, int]) -> int:
    """Longest path down to a constant, given the heights of the operands."""
    if isinstance(definition, int):
        return 0
    return 1 + max(heights[name] for _, _, name in definition)


def _expression(definition: Definition) -> str:
    """``4``, or terms like ``2 * J#P + H#J - E#I`` (the first term is always added)."""
    if isinstance(definition, int):
        return str(definition)
    text = ""
    for position, (sign, coefficient, name) in enumerate(definition):
        term = f"{coefficient} * {name}" if coefficient > 1 else name
        text += term if position == 0 else f" {'+' if sign > 0 else '-'} {term}"
    return text
