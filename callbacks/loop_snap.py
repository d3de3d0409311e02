"""Snap an untied model to the looped one during training: write the tied ``LoopedLM`` whose every distinct
layer averages the untied layers tied to it (:func:`~loopreg.algorithms.loop_regularizer.snap_to_looped`),
and log the eval-loss change that snapping causes.

At ``at`` (``"fit_end"``, or a time such as ``"800ba"`` or ``"0.5dur"``, checked at each batch end) it saves
``<save_folder>/snapped_<target>`` (or ``folder``) atomically (``write_model_folder``) and logs
``loop_reg/snap/eval_loss_{untied,looped,change}`` over the first ``eval_batches`` batches of the first
evaluator. A resumed run does not snap twice. ``block_size``/``blocks`` pick the looped target as for the
regularizer (give it the same ones); with neither, the untied model's own spec is the target.

    >>> # Trainer(..., algorithms=[LoopRegularizer(lambda_reg=10)], callbacks=[LoopSnap(at="fit_end")])
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from torch import nn

from loopreg.algorithms.loop_regularizer import snap_to_looped
from loopreg.checkpoints import run_folder
from loopreg.errors import RecipeError, UserError
from loopreg.folders import write_model_folder
from loopreg.surgery.adapters import model_family, unwrap
from loopreg.surgery.core import is_tied

__all__ = ["LoopSnap", "eval_loss"]

log = logging.getLogger(__name__)


def eval_loss(model: nn.Module, state: State, batches: int) -> float | None:
    """Mean loss of the ComposerModel ``model`` over the first ``batches`` batches of ``state``'s first
    evaluator (``None`` without an evaluator or with ``batches < 1``).

    >>> # eval_loss(ComposerLoopedLM(looped), trainer.state, batches=8)
    """
    if not state.evaluators or batches < 1:
        return None
    model = state.device.module_to_device(model).eval()
    losses = []
    with torch.no_grad():
        for index, batch in enumerate(state.evaluators[0].dataloader.dataloader):
            if index == batches:
                break
            batch = state.device.batch_to_device(batch)
            losses.append(float(model.loss(model(batch), batch)))
    return sum(losses) / len(losses) if losses else math.nan


class LoopSnap(Callback):
    """Snaps the untied ``LoopedLM`` being trained to a looped checkpoint (see the module docstring).

    Args:
        at: ``"fit_end"`` or a Composer time string (``"800ba"``, ``"0.5dur"``).
        block_size, blocks: the looped target, see :func:`~loopreg.algorithms.loop_regularizer.loop_target`.
        folder: where to save; default ``<save_folder>/snapped_<target>``.
        eval_batches: eval batches (first evaluator) for the eval-loss change.

    >>> LoopSnap(at="fit_end").snapped
    False
    """

    def __init__(self, at: str = "fit_end", block_size: int | None = None,
                 blocks: Sequence[Sequence[int]] | None = None, folder: str | None = None,
                 eval_batches: int = 8) -> None:
        try:
            self.at = None if at == "fit_end" else Time.from_timestring(str(at))
        except ValueError:
            raise RecipeError(f"'{at}' is neither 'fit_end' nor a time such as '800ba' or '0.5dur'",
                              key="callbacks.loop_snap.at") from None
        self.layout = dict(block_size=block_size, blocks=blocks)
        self.folder, self.eval_batches = folder, eval_batches
        self.snapped = False

    def state_dict(self) -> dict[str, Any]:
        return {"snapped": self.snapped}  # a resumed run does not snap twice

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapped = state.get("snapped", False)

    def init(self, state: State, logger: Logger) -> None:
        model = unwrap(state.model)
        loopreg = model_family(model) == "loopreg"
        if not loopreg or is_tied(model):
            raise UserError(f"LoopSnap needs an untied LoopedLM; got {type(model).__name__}"
                            f"{' (tied: already looped)' if loopreg else ''}")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.at is not None and not self.snapped and _reached(state, self.at):
            self.snap(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.at is None and not self.snapped:
            self.snap(state, logger)

    def snap(self, state: State, logger: Logger) -> Path | None:
        """Write the snapped looped model and log the eval-loss change; returns the folder (rank 0)."""
        from composer.utils import dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from loopreg.composer_model import ComposerLoopedLM
        from loopreg.model import LoopedLM

        self.snapped = True
        # Full weights on rank 0 only (a collective under FSDP): once per run, so gathering is fine here.
        weights = get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_global_rank() != 0:
            return None
        untied = LoopedLM(unwrap(state.model).config)
        untied.load_state_dict({name.removeprefix("model."): tensor for name, tensor in weights.items()})
        looped = snap_to_looped(untied, **self.layout)
        before, after = (eval_loss(ComposerLoopedLM(m), state, self.eval_batches) for m in (untied, looped))
        folder = Path(self.folder) if self.folder else run_folder(state) / f"snapped_{looped.spec}"
        write_model_folder(looped, folder)  # staged and renamed: a crash never leaves half a model
        if before is not None:
            logger.log_metrics({"loop_reg/snap/eval_loss_untied": before, "loop_reg/snap/eval_loss_looped": after,
                                "loop_reg/snap/eval_loss_change": after - before})
        log.info("snapped to looped %s at %s: eval loss %s -> %s; saved %s", looped.spec,
                 state.timestamp.batch, before, after, folder)
        return folder


def _reached(state: State, time: Time) -> bool:
    if time.unit == TimeUnit.DURATION:
        return state.get_elapsed_duration() >= time
    return state.timestamp.get(time.unit) >= time
