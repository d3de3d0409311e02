"""A rich progress bar for Composer training runs (one task line per run, with the latest loss).

    >>> from rich.progress import Progress
    >>> callback = RichProgress(Progress(), description="(1⊗4)")
"""

from __future__ import annotations

from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["RichProgress", "training_progress"]


def training_progress() -> Progress:
    """A ``rich`` progress display laid out for training runs."""
    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())


class RichProgress(Callback):
    """Drive one task of a shared :class:`rich.progress.Progress` from Composer's batch events.

    Composer's own progress bar is tqdm; a demo that trains several models wants them in one rich display.
    """

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description
        self.task_id = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.max_duration is None or state.max_duration.unit != TimeUnit.BATCH:
            raise ValueError(f"RichProgress needs max_duration in batches (e.g. '3000ba'), got {state.max_duration}")
        self.task_id = self.progress.add_task(self.description, total=state.max_duration.value, loss="-")

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = state.loss.get("total", sum(state.loss.values())) if isinstance(state.loss, dict) else state.loss
        self.progress.update(self.task_id, completed=int(state.timestamp.batch), loss=f"{float(loss):.3f}")
