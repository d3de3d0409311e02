"""Save the trained model as a self-describing loopreg folder at the end of training.

The folder (``config.json`` with the loop spec, ``model.safetensors``, ``tokenizer.json``) is what
``loopreg eval``, ``loopreg export``, ``loopreg similarity`` and ``LoopedLM.from_pretrained`` read.

    >>> ExportModel("runs/loop_12x2/model", tokenizer)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from tokenizers import Tokenizer

from loopreg.surgery.adapters import unwrap

__all__ = ["ExportModel"]


class ExportModel(Callback):
    """At ``fit_end`` rank 0 writes ``folder`` atomically (:func:`~loopreg.surgery.export.write_folder`); under
    FSDP the full weights are gathered first."""

    def __init__(self, folder: str | Path, tokenizer: Tokenizer | None = None) -> None:
        self.folder, self.tokenizer = Path(folder), tokenizer

    def fit_end(self, state: State, logger: Logger) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = state.model
        gather = (FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True)
                  if state.fsdp_enabled else contextlib.nullcontext())
        with gather:
            if dist.get_global_rank() == 0:
                self._write(unwrap(model))  # the LoopedLM inside Composer's and DDP's wrappers
        dist.barrier()

    def _write(self, looped_lm) -> None:
        from loopreg.surgery.export import write_folder

        def save(staging: Path) -> None:
            looped_lm.save_pretrained(staging)
            if self.tokenizer is not None:
                self.tokenizer.save(str(staging / "tokenizer.json"))

        write_folder(self.folder, save)
