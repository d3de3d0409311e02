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

**Loop-count curriculum** (McLeish et al. 2025, "retrofitted recurrence"): ``curriculum: {shape, start, ramp}``
moves the draw's mean ``E[loops]`` from ``start`` at the first batch to the distribution's own mean at the end
of the ramp, and ``grad_loops_curriculum: {shape, start, ramp}`` moves ``grad_loops`` from ``start`` to
``grad_loops`` (:func:`curriculum_value` gives the shapes). Each batch's mean, ``grad_loops`` and draw stay
a pure function of ``(seed, batch index, the schedule, the ramp in batches)``: no state, so ranks agree and
a resume continues the schedule. After the ramp the draws are exactly those of the run without a curriculum.

    >>> sample_loops({"kind": "uniform", "low": 1, "high": 4}, seed=0, step=3)
    3
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from loopreg.errors import RecipeError

__all__ = ["RandomLoops", "SHAPES", "check_curriculum", "check_distribution", "curriculum_value", "distribution_mean",
           "mean_range", "ramp_batches", "sample_loops", "scheduled_grad_loops"]

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


def distribution_mean(distribution: Mapping[str, Any]) -> float:
    """The distribution's own mean, where a curriculum ends: the mean of ``values``, ``(low + high) / 2``, or
    ``mean`` (``poisson_lognormal``: before the cap ``max``, which lowers the drawn mean a little).

    >>> distribution_mean({"kind": "uniform", "low": 1, "high": 4})
    2.5
    """
    kind = distribution["kind"]
    if kind == "choice":
        values = list(distribution["values"])
        return sum(values) / len(values)
    if kind == "uniform":
        return (distribution["low"] + distribution["high"]) / 2
    return float(distribution["mean"])


def mean_range(distribution: Mapping[str, Any]) -> tuple[float, float]:
    """The means a curriculum may schedule for ``distribution`` (``start`` must lie in it).

    ``choice``/``uniform`` shift their mean by letting in their values from the smallest up (a prefix of the
    sorted values; uniform: the upper bound ``high`` ramps up from ``low``), so the mean runs from the smallest
    value to the distribution's mean; ``poisson_lognormal`` ramps its ``mean`` anywhere in ``[1, max]`` (mean 1:
    always one loop).

    >>> mean_range({"kind": "choice", "values": [4, 1, 2]}), mean_range({"kind": "poisson_lognormal", "mean": 3})
    ((1.0, 2.3333333333333335), (1.0, inf))
    """
    kind = distribution["kind"]
    if kind == "choice":
        return float(min(distribution["values"])), distribution_mean(distribution)
    if kind == "uniform":
        return float(distribution["low"]), distribution_mean(distribution)
    cap = distribution.get("max")
    return 1.0, float(cap) if cap is not None else math.inf


def _support(distribution: Mapping[str, Any]) -> list[int]:
    if distribution["kind"] == "choice":
        return sorted(distribution["values"])
    return list(range(distribution["low"], distribution["high"] + 1))


def sample_loops(distribution: Mapping[str, Any], seed: int, step: int, mean: float | None = None) -> int:
    """The loop count for batch ``step`` (deterministic in ``seed``, ``step`` and ``mean``).

    ``mean`` (a curriculum's :func:`curriculum_value`, inside :func:`mean_range`) shifts the draw's mean;
    ``None`` or the distribution's own mean draws exactly as without a curriculum. ``choice``/``uniform`` at a
    lower mean draw uniformly from the smallest k sorted values, mixing the k- and (k+1)-value prefixes so that
    ``E[loops] = mean`` exactly (uniform: the upper bound ``2·mean − low``, fractional bounds mixed);
    ``poisson_lognormal`` uses ``mean`` in place of its own (mean 1: always 1).

    >>> sample_loops({"kind": "uniform", "low": 1, "high": 4}, seed=0, step=3, mean=1.0)
    1
    """
    rng = np.random.default_rng([seed, step])
    kind = distribution["kind"]
    if kind in ("choice", "uniform"):
        if mean is None or mean >= distribution_mean(distribution):
            if kind == "choice":
                return int(rng.choice(list(distribution["values"])))
            return int(rng.integers(distribution["low"], distribution["high"] + 1))
        values = _support(distribution)
        prefix_means = np.cumsum(values) / np.arange(1, len(values) + 1)
        k = int(np.searchsorted(prefix_means, mean, side="right"))  # prefix_means[k - 1] <= mean < prefix_means[k]
        k = max(k, 1)
        low, high = prefix_means[k - 1], prefix_means[k]
        share = (mean - low) / (high - low) if high > low else 0.0  # P(the longer prefix)
        size = k + 1 if rng.random() < share else k
        return int(values[rng.integers(size)])
    mean = float(distribution["mean"]) if mean is None else mean
    if mean <= 1:
        return 1
    sigma = float(distribution.get("sigma", 0.5))
    tau = rng.normal(math.log(mean - 1) - sigma ** 2 / 2, sigma)
    loops = 1 + int(rng.poisson(math.exp(tau)))
    cap = distribution.get("max")
    return min(loops, cap) if cap is not None else loops


# ------------------------------------------------------------------------------------------ curriculum
# The curriculum's shapes, f(t) of the ramp's progress t = min(step / ramp, 1), after McLeish et al. 2025
# ("Teaching Pretrained Language Models to Think Deeper with Retrofitted Recurrence"). Their released training
# code (train.py, not the paper's text, which we could not consult) schedules the mean recurrence as the warm-up
# of a Hugging Face warmup_stable_decay "learning rate" over a fraction of the run, warmup_type linear (f = t)
# or 1-sqrt (f = 1 − sqrt(1 − t), transformers' definition: slow at first and fast at the end, so more of the
# ramp is spent at shallow, cheap depths), from 0 to the final mean, rounded up each step. We implement
# start + (end − start)·f(t) with those two shapes, from an explicit start and without rounding (the draw takes
# a real mean), plus "constant" (f = 1: the end value from the first batch, i.e. no curriculum).
SHAPES = ("constant", "linear", "1-sqrt")
_CURRICULUM_KEYS = {"shape", "start", "ramp"}
_KEY_MEAN, _KEY_GRAD = "algorithms.random_loops.curriculum", "algorithms.random_loops.grad_loops_curriculum"


def curriculum_value(shape: str, start: float, end: float, step: int, ramp: float) -> float:
    """``start + (end − start)·f(t)`` at batch ``step`` of a ramp of ``ramp`` batches, ``t = min(step / ramp, 1)``:
    ``f = 1`` (``constant``), ``t`` (``linear``) or ``1 − sqrt(1 − t)`` (``1-sqrt``); ``end`` itself once
    ``t = 1``.

    >>> curriculum_value("1-sqrt", 1.0, 3.0, step=75, ramp=100), curriculum_value("linear", 1.0, 3.0, 50, 100)
    (2.0, 2.0)
    """
    progress = 1.0 if shape == "constant" or ramp <= 0 else min(step / ramp, 1.0)
    if progress >= 1.0:
        return float(end)
    fraction = progress if shape == "linear" else 1.0 - math.sqrt(1.0 - progress)
    return start + (end - start) * fraction


def scheduled_grad_loops(shape: str, start: float, end: int, step: int, ramp: float) -> int:
    """``grad_loops`` at batch ``step``: :func:`curriculum_value` rounded half up (never below 1).

    >>> [scheduled_grad_loops("linear", 1, 4, step, ramp=6) for step in range(8)]
    [1, 2, 2, 3, 3, 4, 4, 4]
    """
    return max(1, math.floor(curriculum_value(shape, start, end, step, ramp) + 0.5))


def check_curriculum(curriculum: Mapping[str, Any] | None, key: str, low: float, high: float,
                     what: str) -> dict[str, Any]:
    """``curriculum`` checked and normalised (``ramp`` as a Composer ``Time``); a one-line
    :class:`~loopreg.errors.RecipeError` naming ``key.<field>`` for an unknown key or shape, a missing ``start``
    or ``ramp``, a ramp not in ``ba``/``ep``/``dur`` or not positive, or a ``start`` outside ``[low, high]``
    (``what`` says what ``start`` is).

    >>> check_curriculum({"shape": "linear", "start": 1, "ramp": "0.5dur"}, "c", 1, 2.5, "mean")["ramp"]
    Time(0.5, TimeUnit.DURATION)
    """
    if curriculum is None:
        return {"shape": "constant", "start": None, "ramp": None}
    if not isinstance(curriculum, Mapping):
        raise RecipeError(f"expected a mapping {{shape, start, ramp}}, got {curriculum!r}", key=key)
    unknown = sorted(set(curriculum) - _CURRICULUM_KEYS)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown}; a curriculum takes {sorted(_CURRICULUM_KEYS)}", key=key)
    shape = curriculum.get("shape", "constant")
    if shape not in SHAPES:
        raise RecipeError(f"{shape!r} is not one of {', '.join(SHAPES)}", key=f"{key}.shape")
    if shape == "constant":  # start and ramp, if given, are ignored
        return {"shape": shape, "start": None, "ramp": None}
    for field in ("start", "ramp"):
        if curriculum.get(field) is None:
            raise RecipeError(f"shape {shape!r} needs {field}", key=f"{key}.{field}")
    start, ramp_text = curriculum["start"], curriculum["ramp"]
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not low <= start <= high:
        raise RecipeError(f"{what} {start!r} must be a number in [{low:g}, {high:g}]", key=f"{key}.start")
    try:
        ramp = Time.from_timestring(str(ramp_text))
    except ValueError:
        ramp = None
    if ramp is None or ramp.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.DURATION) or ramp.value <= 0:
        raise RecipeError(f"{ramp_text!r} must be a positive time in batches (1000ba), epochs (2ep) or a fraction "
                          f"of max_duration (0.5dur)", key=f"{key}.ramp")
    return {"shape": shape, "start": float(start), "ramp": ramp}


def ramp_batches(ramp: Time, max_duration: Time | None, dataloader_len: Time | None, key: str) -> float:
    """``ramp`` in batches: ``ba`` as is, ``ep`` times the batches per epoch, ``dur`` as that fraction of
    ``max_duration`` (itself in ``ba``, or ``ep`` times the batches per epoch).

    >>> ramp_batches(Time.from_timestring("0.75dur"), Time.from_timestring("60ba"), None, "c.ramp")
    45.0
    """
    def batches(time: Time) -> float:
        if time.unit == TimeUnit.BATCH:
            return float(time.value)
        if time.unit == TimeUnit.EPOCH and dataloader_len is not None:
            return float(time.value) * int(dataloader_len)
        raise RecipeError(f"{ramp} needs a max_duration in ba (or ep with a sized train dataloader), got "
                          f"{max_duration}; give the ramp in ba", key=key)

    if ramp.unit == TimeUnit.DURATION:
        if max_duration is None:
            raise RecipeError(f"{ramp} needs a max_duration; give the ramp in ba", key=key)
        return float(ramp.value) * batches(max_duration)
    return batches(ramp)


class RandomLoops(Algorithm):
    """Draws the thinking block's loop count per training batch (see the module docstring); logs
    ``random_loops/loops``, the scheduled mean ``random_loops/mean`` and ``random_loops/grad_loops``.

    Args:
        distribution: ``{kind: choice|uniform|poisson_lognormal, ...}``.
        grad_loops: backpropagate through only the last ``grad_loops`` thinking iterations (``None``: all).
        seed: the draw's seed (the same on every rank).
        curriculum: ``{shape: constant|linear|1-sqrt, start: E[loops] at the first batch, ramp: 1000ba|0.5dur}``;
            the mean ends at the distribution's (:func:`mean_range` says where ``start`` may lie).
        grad_loops_curriculum: ``{shape, start: >= 1, ramp}``, ending at ``grad_loops``.

    >>> RandomLoops({"kind": "choice", "values": [1, 2, 3, 4]}, grad_loops=2)
    RandomLoops(distribution={'kind': 'choice', 'values': [1, 2, 3, 4]}, grad_loops=2, seed=0)
    """

    def __init__(self, distribution: Mapping[str, Any], grad_loops: int | None = None, seed: int = 0,
                 curriculum: Mapping[str, Any] | None = None,
                 grad_loops_curriculum: Mapping[str, Any] | None = None) -> None:
        self.distribution = dict(distribution)
        try:
            check_distribution(self.distribution)
        except ValueError as err:
            raise RecipeError(str(err), key="algorithms.random_loops.distribution") from None
        if grad_loops is not None and (not isinstance(grad_loops, int) or grad_loops < 1):
            raise RecipeError(f"must be an integer >= 1, got {grad_loops!r}", key="algorithms.random_loops.grad_loops")
        self.grad_loops, self.seed = grad_loops, seed
        self.mean_end = distribution_mean(self.distribution)
        self.curriculum = check_curriculum(curriculum, _KEY_MEAN, *mean_range(self.distribution), what="start mean")
        if grad_loops_curriculum is not None and grad_loops is None:
            raise RecipeError("needs grad_loops (the value it ramps to)", key=_KEY_GRAD)
        self.grad_loops_curriculum = check_curriculum(grad_loops_curriculum, _KEY_GRAD, 1, math.inf,
                                                      what="grad_loops start")
        self._given = {"curriculum": curriculum, "grad_loops_curriculum": grad_loops_curriculum}

    def __repr__(self) -> str:
        given = "".join(f", {name}={dict(value)}" for name, value in self._given.items() if value is not None)
        return (f"RandomLoops(distribution={self.distribution}, grad_loops={self.grad_loops}, seed={self.seed}"
                f"{given})")

    def _ramp(self, curriculum: dict[str, Any], state: State, key: str) -> float:
        if curriculum["ramp"] is None:
            return 0.0
        return ramp_batches(curriculum["ramp"], state.max_duration, state.dataloader_len, f"{key}.ramp")

    def scheduled(self, state: State) -> tuple[float, int | None]:
        """The mean and ``grad_loops`` for the batch about to run (``state.timestamp.batch`` batches done)."""
        step = int(state.timestamp.batch)
        mean = curriculum_value(self.curriculum["shape"], self.curriculum["start"], self.mean_end, step,
                                self._ramp(self.curriculum, state, _KEY_MEAN))
        grad_loops = self.grad_loops
        if grad_loops is not None:
            schedule = self.grad_loops_curriculum
            ramp = self._ramp(schedule, state, _KEY_GRAD)
            grad_loops = scheduled_grad_loops(schedule["shape"], schedule["start"], grad_loops, step, ramp)
        return mean, grad_loops

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if not isinstance(state.batch, dict):
            raise ValueError(f"RandomLoops needs dict batches (it adds a 'loops' key), "
                             f"got {type(state.batch).__name__}")
        mean, grad_loops = self.scheduled(state)
        loops = sample_loops(self.distribution, self.seed, int(state.timestamp.batch), mean)
        rows = state.batch["input_ids"].shape[0]
        # One value per row (loopreg.model.batch_option): Composer counts samples and splits microbatches.
        state.batch["loops"] = torch.full((rows,), loops)
        metrics = {"random_loops/loops": loops, "random_loops/mean": mean}
        if grad_loops is not None:
            state.batch["grad_loops"] = torch.full((rows,), grad_loops)
            metrics["random_loops/grad_loops"] = grad_loops
        logger.log_metrics(metrics)
