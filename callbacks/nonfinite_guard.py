"""Stop (or skip the batch) when the training loss or one of its terms is NaN or infinite.

The check runs at ``AFTER_LOSS``, after the algorithms (the ``LoopRegularizer`` adds its ``loop_reg``
term there), on every term of a dict loss (``ce``, ``loop_reg``, ...) or on the single loss tensor, and
keeps the result on the device. At ``AFTER_TRAIN_BATCH`` (all microbatches done, before the optimizer
step) the flags are combined over ranks in one all-reduce, so every rank makes the same decision:

* ``action: stop`` (default): drop the gradients and raise :class:`NonFiniteLossError`, naming the
  terms and the batch; the weights and the last checkpoint are those of the previous batch.
* ``action: skip``: drop the gradients (``zero_grad(set_to_none=True)``: the optimizer then leaves
  every parameter and its state untouched, where zero gradients would still move Adam's weights), log
  ``nonfinite_guard/skipped_batches`` and go on; more than ``max_consecutive_skips`` in a row stops.

    callbacks:
      nonfinite_guard: {action: skip, max_consecutive_skips: 20}

    >>> NonFiniteGuard(action="skip")
    NonFiniteGuard(action='skip', max_consecutive_skips=100)
"""

from __future__ import annotations

import logging

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, ensure_tuple

from loopreg.errors import RecipeError

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]

log = logging.getLogger(__name__)

ACTIONS = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss term; ``str(err)`` is one line naming the terms and the batch."""


class NonFiniteGuard(Callback):
    """See the module docstring.

    Args:
        action: ``"stop"`` or ``"skip"``.
        max_consecutive_skips: in skip mode, stop after this many bad batches in a row (a diverged run
            would otherwise skip forever).
    """

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 100) -> None:
        if action not in ACTIONS:
            raise RecipeError(f"'{action}' must be one of {', '.join(ACTIONS)}", key="callbacks.nonfinite_guard.action")
        if max_consecutive_skips < 1:
            raise RecipeError(f"must be >= 1, got {max_consecutive_skips}",
                              key="callbacks.nonfinite_guard.max_consecutive_skips")
        self.action, self.max_consecutive_skips = action, max_consecutive_skips
        self.skipped = 0  # batches skipped so far in this run
        self._consecutive = 0
        self._bad: dict[str, torch.Tensor] = {}  # term -> "was non-finite in some microbatch", on the device

    def __repr__(self) -> str:
        return f"NonFiniteGuard(action={self.action!r}, max_consecutive_skips={self.max_consecutive_skips})"

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = state.get("skipped", 0)

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss
        terms = loss if isinstance(loss, dict) else {f"loss{i}" if i else "loss": value
                                                      for i, value in enumerate(ensure_tuple(loss))}
        for name, value in terms.items():
            bad = ~torch.isfinite(value.detach()).all()  # no host sync here: one per batch, below
            self._bad[name] = self._bad[name] | bad if name in self._bad else bad

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if not self._bad:
            return
        names = list(self._bad)
        flags = torch.stack([self._bad[name] for name in names]).to(torch.int32)
        self._bad = {}
        dist.all_reduce(flags, reduce_operation="MAX")  # a NaN on any rank: every rank drops the step
        bad = [name for name, flag in zip(names, flags.tolist()) if flag]
        if not bad:
            self._consecutive = 0
            return
        for optimizer in state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        batch = int(state.timestamp.batch) + 1  # the timestamp still counts the batches finished before
        what = f"non-finite loss term{'s' if len(bad) > 1 else ''} {', '.join(bad)} at batch {batch}"
        if self.action == "stop":
            log.error("NonFiniteGuard: %s; stopping before the optimizer step", what)
            raise NonFiniteLossError(f"{what}; training stopped before the optimizer step (NonFiniteGuard)")
        self.skipped += 1
        self._consecutive += 1
        logger.log_metrics({"nonfinite_guard/skipped_batches": self.skipped})
        log.warning("NonFiniteGuard: %s; batch skipped (%d so far)", what, self.skipped)
        if self._consecutive > self.max_consecutive_skips:
            raise NonFiniteLossError(f"{what}: {self._consecutive} batches in a row were non-finite, more than "
                                     f"max_consecutive_skips={self.max_consecutive_skips}; training stopped")
