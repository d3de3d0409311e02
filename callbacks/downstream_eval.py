"""Run downstream eval groups during training and log their scores to Composer's loggers.

Each run also logs the isoplot pair of the paper's Fig. 2: the validation log-perplexity (from the
``LanguageCrossEntropy`` eval metric, when the trainer has an eval set) against every group score.

    callbacks:
      downstream_eval: {groups: [reasoning_primitives], interval: 20000ba, limit: 200}
"""

from __future__ import annotations

import os
from typing import Any, Sequence
from unittest import mock

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from loopreg.errors import RecipeError

__all__ = ["DownstreamEval"]


class DownstreamEval(Callback):
    """Every ``interval`` (and at fit end) run ``groups`` (loopreg's or any lm-eval task) through lm-eval on the
    model being trained and log ``downstream/<group>`` (and ``downstream/<task>``) scores; rank 0 evaluates, the
    others wait. ``data_dir`` is the offline eval pack (default: ``$LOOPREG_EVALDATA`` or ``../shared/evaldata``).

    The training entry hands over the recipe's tokenizer (:meth:`use_tokenizer`).
    """

    def __init__(self, groups: Sequence[str], interval: str = "10000ba", limit: int | None = 200,
                 batch_size: int = 16, data_dir: str | None = None) -> None:
        from loopreg.evals.run import resolve_tasks

        self.groups, self.limit, self.batch_size, self.data_dir = list(groups), limit, batch_size, data_dir
        resolve_tasks(self.groups)  # validates the names now, not hours into training
        self.interval = Time.from_timestring(interval)
        if self.interval.unit != TimeUnit.BATCH:
            raise RecipeError(f"must be in batches (e.g. '10000ba'), got '{interval}'",
                              key="callbacks.downstream_eval.interval")
        self.tokenizer: Any = None
        self.history: list[dict[str, float]] = []

    def use_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.tokenizer is None:
            raise ValueError("DownstreamEval needs the recipe's tokenizer (the training entry passes it)")
        if state.fsdp_enabled:
            raise ValueError("callbacks.downstream_eval does not run under FSDP; evaluate saved checkpoints with "
                             "`loopreg eval` instead")

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval.value == 0:
            self._evaluate(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval.value:
            self._evaluate(state, logger)

    def _evaluate(self, state: State, logger: Logger) -> None:
        from loopreg.evals.lm_eval_model import LoopregLM
        from loopreg.evals.run import evaluate
        from loopreg.surgery.adapters import unwrap

        if dist.get_global_rank() == 0:
            model = unwrap(state.model)
            was_training = model.training
            # the task folder's utils.py reads the pack's place from the environment (it also runs in plain lm-eval)
            environment = {} if self.data_dir is None else {"LOOPREG_EVALDATA": str(self.data_dir)}
            lm = LoopregLM(model, tokenizer=self.tokenizer, device=str(next(model.parameters()).device),
                           batch_size=self.batch_size)
            with mock.patch.dict(os.environ, environment):
                results = evaluate(lm, self.groups, limit=self.limit, progress=None)
            model.train(was_training)
            metrics = {f"downstream/{name}": group.score for name, group in results.groups.items()
                       if group.score is not None}
            metrics.update({f"downstream/{name}": task.score for name, task in results.tasks.items()
                            if task.score is not None})
            cross_entropy = _eval_cross_entropy(state)
            if cross_entropy is not None:
                metrics["downstream/log_perplexity"] = cross_entropy  # the isoplot's other axis
            logger.log_metrics(metrics)
            self.history.append({"batch": int(state.timestamp.batch), **metrics})
        dist.barrier()


def _eval_cross_entropy(state: State) -> float | None:
    for metrics in state.eval_metrics.values():
        metric = metrics.get("LanguageCrossEntropy")
        if metric is not None and metric.update_called:
            return float(metric.compute())
    return None
