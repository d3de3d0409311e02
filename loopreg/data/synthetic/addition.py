"""n-ary addition (paper Sec. 2.1): add n zero-padded operands.

Format, with the default ``sep="+"``: the prompt is the operands joined by ``sep`` with no spaces and a
final ``=``; the answer is the plain decimal sum (no padding). The paper's ``315 + 120 + 045 + 824 =``
is the same problem with display spaces (use ``sep=" + "`` to get them, minus the space before ``=``).

    prompt  315+120+045+824=
    answer  1304
    cot     435 480 1304        (running sums after each operand from the second on)

With ``reverse_answer=True`` the answer and every CoT sum are written least-significant digit first
(``4031``), the order in which a left-to-right decoder can produce carries. With ``modulus=m`` the answer
and every running sum are taken mod m (``digits=1, modulus=10``: the parity-like sum-mod-10 task whose
one-digit CoT steps the distillation demo uses). With ``cot_from_first=True`` the CoT starts with the
first operand itself (the partial sum of one operand), so every step is the previous step plus one
operand: a mod-m step then has first-order signal from each input, where ``(a + b) mod m`` alone has
none (it is uncorrelated with a and with b), which is what makes sum-mod-10 CoT learnable quickly.

``real_operands=r`` is the operand-count curriculum inside one format: a problem still shows n operands,
but only a count drawn from ``r`` (at most n) of them, at random places, are random; the rest are
``000``. Easy sums of two or three numbers then sit in the same positions as the hard ones, which takes
reversed-digit addition off the long plateau it otherwise sits on (eval sets leave it unset).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import ClassVar

from loopreg.data.synthetic.base import Example, SyntheticTask, as_counts, check_knob

__all__ = ["NaryAddition"]

_DIGITS = "0123456789"


@dataclass(frozen=True)
class NaryAddition(SyntheticTask):
    """Sum of ``n`` operands, each uniform in ``[0, 10**digits - 1]``.

    ``n_operands`` is one count or a tuple of counts mixed uniformly (the paper trains on the mixture
    2, 4, 8, 16, 32 and evaluates each of 8, 16, 24, 32 alone).

    >>> NaryAddition(n_operands=2).sample(random.Random(0)).prompt
    '776+911='
    """

    name: ClassVar[str] = "addition"
    has_cot: ClassVar[bool] = True

    n_operands: int | tuple[int, ...] = (2, 4, 8, 16, 32)
    digits: int = 3
    reverse_answer: bool = False
    sep: str = "+"
    modulus: int | None = None
    cot_from_first: bool = False
    real_operands: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        counts = self.operand_counts
        check_knob(len(counts) > 0 and all(isinstance(n, int) and n >= 2 for n in counts),
                   self.name, "n_operands", self.n_operands, "every operand count must be an int >= 2")
        check_knob(self.digits >= 1, self.name, "digits", self.digits, "must be >= 1")
        check_knob(self.sep != "" and not set(self.sep) & set(_DIGITS + "="), self.name, "sep", self.sep,
                   "must be non-empty and contain no digit or '='")
        check_knob(self.modulus is None or self.modulus >= 2, self.name, "modulus", self.modulus, "must be >= 2")
        real = () if self.real_operands is None else as_counts(self.real_operands)
        check_knob(self.real_operands is None or (len(real) > 0 and all(isinstance(r, int) and r >= 1 for r in real)),
                   self.name, "real_operands", self.real_operands, "every count must be an int >= 1")

    @property
    def operand_counts(self) -> tuple[int, ...]:
        """The operand counts the sampler mixes over, always as a tuple."""
        return as_counts(self.n_operands)

    def sample(self, rng: random.Random) -> Example:
        """One addition problem; the operand count is drawn from ``operand_counts``."""
        count = rng.choice(self.operand_counts)
        operands = [rng.randrange(10**self.digits) for _ in range(count)]
        if self.real_operands is not None:
            real = set(rng.sample(range(count), min(count, rng.choice(as_counts(self.real_operands)))))
            operands = [value if slot in real else 0 for slot, value in enumerate(operands)]
        prompt = self.sep.join(f"{value:0{self.digits}d}" for value in operands) + "="
        running_sums = list(itertools.accumulate(operands))[0 if self.cot_from_first else 1:]
        if self.modulus is not None:
            running_sums = [total % self.modulus for total in running_sums]
        cot = tuple(self._write(total) for total in running_sums)
        return Example(prompt=prompt, answer=cot[-1], cot=cot)

    def _write(self, number: int) -> str:
        text = str(number)
        return text[::-1] if self.reverse_answer else text

    def _problem_symbols(self) -> str:
        return _DIGITS + self.sep + "="
