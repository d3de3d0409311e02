"""Shared types for the synthetic reasoning tasks: one :class:`Example`, one :class:`SyntheticTask` base.

Every task is a small frozen dataclass whose fields are its knobs. It draws one problem from a
``random.Random`` (never the global RNG), so a seed fixes every example. The train/test split is a
property of the *problem*: a stable hash of the prompt text decides it, so train and test can never
share a problem, whichever seed or sampling order produced them.

    >>> from loopreg.data.synthetic import NaryAddition
    >>> task = NaryAddition(n_operands=4)
    >>> test_set = task.fixed_set("test", 3, seed=0)
    >>> all(task.split_of(example) == "test" for example in test_set)
    True
"""

from __future__ import annotations

import hashlib
import itertools
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal

__all__ = ["ANSWER_MARK", "COT_OPEN", "SPLITS", "Example", "Split", "SyntheticTask", "as_counts", "check_knob"]

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")

# The iCoT layout of Deng et al. (2023): ``question||step + step ... #### answer``.
COT_OPEN = "||"
ANSWER_MARK = " #### "

_HASH_BYTES = 8


@dataclass(frozen=True)
class Example:
    """One problem. ``prompt`` is the model input and ``answer`` the gold continuation.

    Example: ``Example(prompt="315+120+045+824=", answer="1304", cot=("435", "480", "1304"))``
    """

    prompt: str
    answer: str
    cot: tuple[str, ...] = ()
    position_labels: tuple[str, ...] | None = None  # one target symbol per prompt character (p-hop)


def as_counts(counts: int | tuple[int, ...]) -> tuple[int, ...]:
    """A count knob that takes one int or a tuple of them (a curriculum), always as a tuple.

    Example: ``as_counts(4) == (4,)`` and ``as_counts([1, 2]) == (1, 2)``
    """
    return (counts,) if isinstance(counts, int) else tuple(counts)


def check_knob(ok: bool, task: str, knob: str, value: object, why: str) -> None:
    """Raise ``ValueError`` naming the knob when ``ok`` is false.

    Example: ``check_knob(hops >= 1, "phop", "hops", hops, "must be >= 1")``
    """
    if not ok:
        raise ValueError(f"{task}: bad knob {knob}={value!r}: {why}")


@dataclass(frozen=True)
class SyntheticTask(ABC):
    """Base of every generator: sampling, hash-based train/test split, streams and fixed sets.

    Subclasses set ``name``, implement ``sample`` and ``_problem_symbols``, and validate their knobs
    in ``__post_init__`` (calling ``super().__post_init__()``).

    Example: ``PHop(hops=2).stream("train", seed=0)`` yields training problems forever.
    """

    name: ClassVar[str]
    has_cot: ClassVar[bool] = False
    cot_step_separator: ClassVar[str] = " "

    # keyword-only so subclasses keep their own knobs first in positional order
    test_fraction: float = field(default=0.05, kw_only=True)

    def __post_init__(self) -> None:
        check_knob(0.0 < self.test_fraction < 1.0, self.name, "test_fraction", self.test_fraction,
                   "must be in (0, 1)")

    # ------------------------------------------------------------------ per task
    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one problem; it may belong to either split."""

    @abstractmethod
    def _problem_symbols(self) -> str:
        """Every character a prompt, answer, CoT step or position label of this task can contain."""

    # ------------------------------------------------------------------ shared
    @property
    def symbols(self) -> str:
        """Sorted string of every character the task can emit, CoT rendering included.

        Example: ``NaryAddition(sep="+").symbols == " #+0123456789=|"``
        """
        rendering = COT_OPEN + ANSWER_MARK + self.cot_step_separator if self.has_cot else ""
        return "".join(sorted(set(self._problem_symbols()) | set(rendering)))

    def split_of(self, example: Example) -> Split:
        """``"test"`` for a stable ``test_fraction`` share of problems (blake2b of the prompt), else ``"train"``.

        Example: ``task.split_of(task.sample(random.Random(0)))`` -> ``"train"`` (most of the time)
        """
        digest = hashlib.blake2b(example.prompt.encode("utf-8"), digest_size=_HASH_BYTES).digest()
        unit = int.from_bytes(digest, "big") / 2 ** (8 * _HASH_BYTES)
        return "test" if unit < self.test_fraction else "train"

    def stream(self, split: Split, seed: int) -> Iterator[Example]:
        """Endless, seed-determined examples of one split (others are drawn and skipped).

        Example: ``next(task.stream("test", seed=1))``
        """
        check_knob(split in SPLITS, self.name, "split", split, f"expected one of {SPLITS}")
        rng = random.Random(seed)
        while True:
            example = self.sample(rng)
            if self.split_of(example) == split:
                yield example

    def fixed_set(self, split: Split, n: int, seed: int) -> list[Example]:
        """The first ``n`` examples of ``stream(split, seed)``: a deterministic evaluation set.

        Example: ``task.fixed_set("test", 1000, seed=0)``
        """
        return list(itertools.islice(self.stream(split, seed), n))

    def render_cot(self, example: Example) -> str:
        """The full chain-of-thought text, ``question||steps #### answer``.

        Example: ``'315+120+045+824=||435 480 1304 #### 1304'`` for n-ary addition.
        """
        if not example.cot:
            raise ValueError(f"{self.name}: this example has no chain of thought to render")
        steps = self.cot_step_separator.join(example.cot)
        return f"{example.prompt}{COT_OPEN}{steps}{ANSWER_MARK}{example.answer}"
