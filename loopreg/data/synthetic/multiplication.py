"""k x k multiplication in the iCoT format of Deng et al. (2023), digits least-significant first.

Both operands are true ``digits``-digit numbers. Every number is written reversed with one space
between digits. For ``5432 * 3918 = 21282576``:

    prompt  2 3 4 5 * 8 1 9 3
    cot     6 5 4 3 4                              a * 8, padded to k+1 digits
            0 2 3 4 5 0 ( 6 7 7 7 9 0 )            a * 1 * 10, then the running sum, both k+2 digits
            0 0 8 8 8 8 4 ( 6 7 5 6 8 9 4 )        a * 9 * 100, running sum, k+3 digits
            0 0 0 6 9 2 6 1                        a * 3 * 1000, 2k digits (its sum is the answer)
    answer  6 7 5 2 8 2 1 2

Step ``i`` is the partial product ``a * b_i * 10**i`` zero-padded to ``k+1+i`` digits; the steps
strictly between the first and the last also carry the running sum in parentheses. ``render_cot``
joins the steps with `` + ``, which reproduces Deng et al.'s files exactly:
``2 3 4 5 * 8 1 9 3||6 5 4 3 4 + 0 2 3 4 5 0 ( 6 7 7 7 9 0 ) + ... #### 6 7 5 2 8 2 1 2``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import ClassVar

from loopreg.data.synthetic.base import Example, SyntheticTask, check_knob

__all__ = ["Multiplication", "reversed_digits"]


def reversed_digits(number: int, width: int) -> str:
    """``number`` zero-padded to ``width`` digits, least significant first, space separated.

    >>> reversed_digits(5432, 5)
    '2 3 4 5 0'
    """
    return " ".join(reversed(f"{number:0{width}d}"))


@dataclass(frozen=True)
class Multiplication(SyntheticTask):
    """Products of two ``digits``-digit numbers with the partial-product chain of thought.

    >>> Multiplication(digits=2).sample(random.Random(0)).prompt
    '9 5 * 3 6'
    """

    name: ClassVar[str] = "multiplication"
    has_cot: ClassVar[bool] = True
    cot_step_separator: ClassVar[str] = " + "

    digits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_knob(self.digits >= 1, self.name, "digits", self.digits, "must be >= 1")

    def sample(self, rng: random.Random) -> Example:
        """One product; operands are uniform over the ``digits``-digit numbers."""
        k = self.digits
        left, right = (rng.randrange(10 ** (k - 1), 10**k) for _ in range(2))
        steps = []
        running_sum = 0
        for place, digit in enumerate(reversed(str(right))):
            partial = left * int(digit) * 10**place
            running_sum += partial
            step = reversed_digits(partial, k + 1 + place)
            if 0 < place < k - 1:
                step += f" ( {reversed_digits(running_sum, k + 1 + place)} )"
            steps.append(step)
        prompt = f"{reversed_digits(left, k)} * {reversed_digits(right, k)}"
        return Example(prompt=prompt, answer=reversed_digits(left * right, 2 * k), cot=tuple(steps))

    def _problem_symbols(self) -> str:
        return string.digits + " *()+"
