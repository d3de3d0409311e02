"""p-hop induction (Sanford et al. 2024; paper Sec. 2.2, Definition A.1).

Positions are 1-indexed as in the paper: ``v_1 .. v_n``.

* ``find_1(v, i) = max({0} ∪ {j <= i : v_{j-1} = v_i})``: one step past the previous occurrence of ``v_i``.
* ``find_p(v, i) = find_1(v, find_{p-1}(v, i))``.
* ``hop_p(v) = v_{find_p(v, n)}`` when ``find_p(v, n) != 0``, else ⊥ (``None`` here).

Format: the prompt is the sequence itself, one lowercase letter per position (alphabet = the first
``alphabet_size`` letters); the answer is the single letter ``hop_p(v)``. With
``per_position_labels=True`` every prompt position ``i`` also carries ``hop_p(v_1..v_i)``, or ``_`` when
that prefix has no p-hop chain, so a causal model can be trained at every position while accuracy is
still read at the last one (whose label is the answer).

    prompt  dadccabdccdb    (length 12, hops 2: b at 12 -> d at 8 -> c at 4)
    answer  c
    labels  ____ca__dcac    (hop_2 of every prefix; the last one is the answer)
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import ClassVar, Sequence

from loopreg.data.synthetic.base import Example, SyntheticTask, check_knob

__all__ = ["NO_CHAIN", "PHop", "find_1", "find_p", "hop_p", "prefix_hops"]

NO_CHAIN = "_"  # position label standing for ⊥


def find_1(v: Sequence[str], i: int) -> int:
    """Definition A.1, literally: ``max({0} ∪ {j <= i : v_{j-1} = v_i})`` with 1-indexed positions.

    >>> find_1("abcab", 5)   # v_5 = b; v_2 = b is its previous occurrence, so j = 3
    3
    """
    # v_k is v[k - 1]; j starts at 2 because v_0 does not exist
    return max([0] + [j for j in range(2, i + 1) if v[j - 2] == v[i - 1]])


def find_p(v: Sequence[str], i: int, p: int) -> int:
    """Definition A.1: ``find_p(v, i) = find_1(v, find_{p-1}(v, i))``; position 0 means no chain.

    >>> find_p("abcab", 5, 2)   # find_1 gives 3 (v_3 = c), and c never occurred before
    0
    """
    if p == 1:
        return find_1(v, i)
    return find_1(v, find_p(v, i, p - 1))


def hop_p(v: Sequence[str], p: int) -> str | None:
    """Definition A.1: ``v_{find_p(v, n)}``, or ``None`` (⊥) when ``find_p(v, n) = 0``.

    >>> hop_p("abcab", 1), hop_p("abcab", 2)
    ('c', None)
    """
    position = find_p(v, len(v), p)
    return v[position - 1] if position != 0 else None


def prefix_hops(v: Sequence[str], p: int) -> list[str | None]:
    """``hop_p(v_1..v_i)`` for every prefix, in O(n·p) instead of O(n²·p).

    ``find_1(v, i)`` only reads ``v_1..v_i``, so one table of it serves every prefix.

    >>> prefix_hops("abcab", 1)
    [None, None, None, 'b', 'c']
    """
    find_one = [0] * (len(v) + 1)  # find_one[i] = find_1(v, i); find_one[0] = 0 absorbs
    last_seen: dict[str, int] = {}
    for i, token in enumerate(v, start=1):
        find_one[i] = last_seen.get(token, -1) + 1  # position after the previous occurrence, or 0
        last_seen[token] = i
    hops = []
    for i in range(1, len(v) + 1):
        position = i
        for _ in range(p):
            position = find_one[position]
        hops.append(v[position - 1] if position != 0 else None)
    return hops


@dataclass(frozen=True)
class PHop(SyntheticTask):
    """Sequences of ``length`` letters whose ``hops``-hop chain always exists.

    A chain ``c_0, c_1, .., c_p`` (consecutive letters differ) is laid out as the adjacent pairs
    ``(c_{k-1}, c_k)`` for hops ``k = p .. 1`` at random increasing positions, with ``c_0`` last.
    Fillers after hop ``k``'s pair avoid ``c_{k-1}`` so no filler can shorten that hop, and every
    sample is checked with the reference ``hop_p``.

    >>> PHop(alphabet_size=4, length=12, hops=2).sample(random.Random(0)).answer in "abcd"
    True
    """

    name: ClassVar[str] = "phop"

    alphabet_size: int = 4
    length: int = 32
    hops: int = 4
    per_position_labels: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_knob(2 <= self.alphabet_size <= 26, self.name, "alphabet_size", self.alphabet_size,
                   "must be in [2, 26]")
        check_knob(self.hops >= 1, self.name, "hops", self.hops, "must be >= 1")
        check_knob(self.length >= 2 * self.hops + 1, self.name, "length", self.length,
                   f"must be >= 2 * hops + 1 = {2 * self.hops + 1} to hold the chain")

    @property
    def alphabet(self) -> str:
        """The first ``alphabet_size`` lowercase letters."""
        return string.ascii_lowercase[: self.alphabet_size]

    def sample(self, rng: random.Random) -> Example:
        """One sequence with a guaranteed chain; its answer is the chain's last letter."""
        while True:  # the filler constraints make the first try pass; hop_p is the guarantee
            chain = self._sample_chain(rng)
            sequence = self._lay_out(chain, rng)
            if hop_p(sequence, self.hops) == chain[-1]:
                break
        labels = None
        if self.per_position_labels:
            labels = tuple(NO_CHAIN if hop is None else hop for hop in prefix_hops(sequence, self.hops))
        return Example(prompt=sequence, answer=chain[-1], position_labels=labels)

    def _sample_chain(self, rng: random.Random) -> list[str]:
        """``c_0 .. c_p`` with ``c_k != c_{k-1}`` (a repeat would make the hop land on its own pair)."""
        chain = [rng.choice(self.alphabet)]
        for _ in range(self.hops):
            chain.append(rng.choice(self.alphabet.replace(chain[-1], "")))
        return chain

    def _lay_out(self, chain: list[str], rng: random.Random) -> str:
        """Place the hop pairs at random non-overlapping positions, ``c_0`` last, then fill the rest."""
        n, p = self.length, self.hops
        slack = n - 1 - 2 * p  # filler slots
        # stars and bars: the m-th smallest pick, shifted by m, is where the m-th pair starts
        starts = [pick + m for m, pick in enumerate(sorted(rng.sample(range(slack + p), p)))]
        tokens: list[str | None] = [None] * n
        tokens[-1] = chain[0]
        avoid_from: dict[int, str] = {}  # position -> letter fillers must avoid from there on
        for m, start in enumerate(starts):
            hop = p - m  # pairs appear in the sequence from the last hop to the first
            tokens[start], tokens[start + 1] = chain[hop - 1], chain[hop]
            avoid_from[start + 1] = chain[hop - 1]
        avoid = ""
        for position, token in enumerate(tokens):
            avoid = avoid_from.get(position, avoid)
            if token is None:
                tokens[position] = rng.choice(self.alphabet.replace(avoid, ""))
        return "".join(tokens)  # type: ignore[arg-type]  # every slot is filled above

    def _problem_symbols(self) -> str:
        return self.alphabet + (NO_CHAIN if self.per_position_labels else "")
