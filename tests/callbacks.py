"""Composer callbacks the resume tests share."""

from __future__ import annotations

from composer.core import Callback


class Crash(Callback):
    """Dies at the end of batch ``batch``, after that batch's checkpoint (if any) was written: the crash a resume
    test resumes from."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_checkpoint(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            raise KeyboardInterrupt(f"crash after batch {self.batch}")
