"""Deterministic synthetic reasoning tasks (paper Sec. 2 and 3.2) and a character tokenizer for them.

    >>> task = build_task("phop", hops=2, length=16)
    >>> example = task.fixed_set("test", 1, seed=0)[0]
    >>> len(example.prompt), task.split_of(example)
    (16, 'test')
"""

from __future__ import annotations

import dataclasses

from loopreg.data.synthetic.addition import NaryAddition
from loopreg.data.synthetic.base import Example, Split, SyntheticTask
from loopreg.data.synthetic.igsm import SymbolicIGSM
from loopreg.data.synthetic.multiplication import Multiplication
from loopreg.data.synthetic.phop import PHop
from loopreg.data.synthetic.primitives import VariableAssignment
from loopreg.data.synthetic.tokenizer import char_tokenizer, decode, encode

__all__ = [
    "TASKS",
    "Example",
    "Multiplication",
    "NaryAddition",
    "PHop",
    "Split",
    "SymbolicIGSM",
    "SyntheticTask",
    "VariableAssignment",
    "build_task",
    "char_tokenizer",
    "decode",
    "encode",
]

TASKS: dict[str, type[SyntheticTask]] = {
    task.name: task for task in (NaryAddition, PHop, SymbolicIGSM, VariableAssignment, Multiplication)
}


def build_task(name: str, **knobs: object) -> SyntheticTask:
    """The task registered as ``name`` with the given knobs; ``ValueError`` for a bad name or knob.

    Example: ``build_task("addition", n_operands=8)``
    """
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; expected one of: {', '.join(TASKS)}")
    task_class = TASKS[name]
    known = [f.name for f in dataclasses.fields(task_class) if f.init]
    for knob in knobs:
        if knob not in known:
            raise ValueError(f"{name}: unknown knob {knob!r}; expected one of: {', '.join(known)}")
    return task_class(**knobs)
