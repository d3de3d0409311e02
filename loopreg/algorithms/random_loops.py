"""``RandomLoops``: train a looped model at a random loop count per batch, so one model works across depths.

The thinking block's loop count is drawn per batch from a distribution (Huginn, Geiping et al. 2025):

* ``{kind: choice, values: [1, 2, 4]}`` — one of a fixed set, uniformly;
* ``{kind: uniform, low: 1, high: 4}`` — an integer in ``[low, high]``;
* ``{kind: poisson_lognormal, mean: 4, sigma: 0.5}`` — Huginn's heavy-tailed draw around a mean:
  ``τ ~ N(log(mean − 1) − σ²/2, σ)``, ``loops = 1 + Poisson(e^τ)`` (so ``E[loops] = mean``, never below 1);
  ``max`` caps it.

The draw is a function of ``(seed, batch index)`` only, so every rank draws the same count without
communicating, and a resumed run draws what the uninterrupted one did. The count (and ``grad_loops``,
truncated backprop through the last k iterations) travels in the batch as ``loops``/``grad_loops`` (one
value per row, :func:`~loopreg.model.batch_option`), which both
:class:`~loopreg.composer_model.ComposerLoopedLM` and Composer's ``HuggingFaceModel`` around a tied
retrofit pass to the forward.

    >>> sample_loops({"kind": "uniform", "low": 1, "high": 4}, seed=0, step=3)
    3
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from loopreg.errors import RecipeError

__all__ = ["RandomLoops", "sample_loops", "check_distribution"]

_KEYS = {"choice": {"values"}, "uniform": {"low", "high"}, "poisson_lognormal": {"mean", "sigma", "max"}}
_REQUIRED = {"choice": {"values"}, "uniform": {"low", "high"}, "poisson_lognormal": {"mean"}}


def check_distribution(distribution: Mapping[str, Any]) -> None:
    """Raise a one-line ``ValueError`` for an unknown kind, a missing or unknown key, or a distribution that
    can produce a loop count below 1.

    >>> check_distribution({"kind": "choice", "values": [2, 4]})
    """
    kind = distribution.get("kind")
    if kind not in _KEYS:
        raise ValueError(f"loop distribution kind {kind!r} is not one of {', '.join(_KEYS)}")
    keys = set(distribution) - {"kind"}
    if _REQUIRED[kind] - keys or keys - _KEYS[kind]:
        raise ValueError(f"loop distribution '{kind}' takes {sorted(_KEYS[kind])} (needs {sorted(_REQUIRED[kind])}), "
                         f"got {sorted(keys)}")
    if kind == "choice":
        values = list(distribution["values"])
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"loop distribution 'choice': values {values} must be integers >= 1")
    elif kind == "uniform":
        low, high = distribution["low"], distribution["high"]
        if not (isinstance(low, int) and isinstance(high, int)) or low < 1 or high < low:
            raise ValueError(f"loop distribution 'uniform': needs integers 1 <= low <= high, "
                             f"got low={low}, high={high}")
    else:
        mean, cap = distribution["mean"], distribution.get("max")
        if not mean > 1:
            raise ValueError(f"loop distribution 'poisson_lognormal': mean {mean} must be > 1 (loops = 1 + Poisson)")
        if distribution.get("sigma", 0.5) <= 0:
            raise ValueError(f"loop distribution 'poisson_lognormal': sigma {distribution['sigma']} must be > 0")
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise ValueError(f"loop distribution 'poisson_lognormal': max {cap} must be an integer >= 1")


def sample_loops(distribution: Mapping[str, Any], seed: int, step: int) -> int:
    """The loop count for batch ``step`` (deterministic in ``seed`` and ``step``)."""
    rng = np.random.default_rng([seed, step])
    kind = distribution["kind"]
    if kind == "choice":
        return int(rng.choice(list(distribution["values"])))
    if kind == "uniform":
        return int(rng.integers(distribution["low"], distribution["high"] + 1))
    sigma = float(distribution.get("sigma", 0.5))
    tau = rng.normal(math.log(distribution["mean"] - 1) - sigma ** 2 / 2, sigma)
    loops = 1 + int(rng.poisson(math.exp(tau)))
    cap = distribution.get("max")
    return min(loops, cap) if cap is not None else loops


class RandomLoops(Algorithm):
    """Draws the thinking block's loop count per training batch (see the module docstring).

    Args:
        distribution: ``{kind: choice|uniform|poisson_lognormal, ...}``.
        grad_loops: backpropagate through only the last ``grad_loops`` thinking iterations (``None``: all).
        seed: the draw's seed (the same on every rank).

    >>> RandomLoops({"kind": "choice", "values": [1, 2, 3, 4]}, grad_loops=2)
    RandomLoops(distribution={'kind': 'choice', 'values': [1, 2, 3, 4]}, grad_loops=2, seed=0)
    """

    def __init__(self, distribution: Mapping[str, Any], grad_loops: int | None = None, seed: int = 0) -> None:
        self.distribution = dict(distribution)
        try:
            check_distribution(self.distribution)
        except ValueError as err:
            raise RecipeError(str(err), key="algorithms.random_loops.distribution") from None
        if grad_loops is not None and (not isinstance(grad_loops, int) or grad_loops < 1):
            raise RecipeError(f"must be an integer >= 1, got {grad_loops!r}", key="algorithms.random_loops.grad_loops")
        self.grad_loops, self.seed = grad_loops, seed

    def __repr__(self) -> str:
        return f"RandomLoops(distribution={self.distribution}, grad_loops={self.grad_loops}, seed={self.seed})"

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if not isinstance(state.batch, dict):
            raise ValueError(f"RandomLoops needs dict batches (it adds a 'loops' key), "
                             f"got {type(state.batch).__name__}")
        loops = sample_loops(self.distribution, self.seed, int(state.timestamp.batch))
        rows = state.batch["input_ids"].shape[0]
        # One value per row (loopreg.model.batch_option): Composer counts samples and splits microbatches.
        state.batch["loops"] = torch.full((rows,), loops)
        if self.grad_loops is not None:
            state.batch["grad_loops"] = torch.full((rows,), self.grad_loops)
        logger.log_metrics({"random_loops/loops": loops})
