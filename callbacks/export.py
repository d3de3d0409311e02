"""Save the trained model as a self-describing folder at the end of training.

A :class:`~loopreg.model.LoopedLM` becomes a loopreg folder (``config.json`` with the loop spec,
``model.safetensors``, ``tokenizer.json``, and the remote code that loads it tied in plain transformers); a
Hugging Face model (a retrofit: a tied or untied loop-surgery output) becomes a surgery-style Hugging Face
folder with its tokenizer. Both go through :func:`~loopreg.folders.write_model_folder`. ``loopreg eval``,
``loopreg export``, ``loopreg similarity`` and :func:`loopreg.load` read both back (looped).

    >>> ExportModel("runs/loop_12x2/model", tokenizer)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from loopreg.surgery.adapters import unwrap

__all__ = ["ExportModel"]


class ExportModel(Callback):
    """At ``fit_end`` rank 0 writes ``folder`` atomically (:func:`~loopreg.folders.write_model_folder`); under
    FSDP the full weights are gathered first. ``tokenizer`` is the recipe's: a ``tokenizers.Tokenizer`` for a
    LoopedLM, the source's Hugging Face tokenizer for a Hugging Face model."""

    def __init__(self, folder: str | Path, tokenizer: Any | None = None) -> None:
        self.folder, self.tokenizer = Path(folder), tokenizer

    def fit_end(self, state: State, logger: Logger) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = state.model
        gather = (FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True)
                  if state.fsdp_enabled else contextlib.nullcontext())
        with gather:
            if dist.get_global_rank() == 0:
                self._write(unwrap(model))  # the bare model inside Composer's and DDP's wrappers
        dist.barrier()

    def _write(self, model: nn.Module) -> None:
        from loopreg.folders import write_model_folder

        write_model_folder(model, self.folder, self.tokenizer)
