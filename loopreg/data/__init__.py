"""Training data: what a recipe's data sections build for one rank, and the batch conventions every
kind shares (``labels`` aligned with ``input_ids``, :data:`IGNORE_INDEX` where there is no loss).

    >>> IGNORE_INDEX
    -100
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["IGNORE_INDEX", "Data"]

IGNORE_INDEX = -100  # labels with no loss (PyTorch's cross_entropy default, Hugging Face's convention)


@dataclass
class Data:
    """What a recipe's data sections build for one rank."""

    train: DataLoader
    evaluation: Any  # a DataLoader, a list of Composer Evaluators, or None
    tokenizer: Any
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # task metrics beside the LM metrics
    task: Any = None  # loopreg.data.tasks.TaskData for synthetic tasks
