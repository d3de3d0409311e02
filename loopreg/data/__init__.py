"""Training data: what a recipe's data sections build for one rank, the batch conventions every kind
shares (``labels`` aligned with ``input_ids``, :data:`IGNORE_INDEX` where there is no loss), and the
registries of data kinds and tokenizer kinds that recipes name (``train_data.kind``, ``tokenizer.kind``).

Each kind registers itself in the module that defines it (``text`` in :mod:`loopreg.data.text`,
``synthetic`` in :mod:`loopreg.data.tasks`, ``paired`` in :mod:`loopreg.data.paired`);
:mod:`loopreg.data.kinds` imports those modules, so its ``DATA_KINDS`` and ``TOKENIZERS`` hold every built-in.

    >>> IGNORE_INDEX
    -100
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch.utils.data import DataLoader

from loopreg.registry_base import Registry

__all__ = ["IGNORE_INDEX", "Data", "DataKind", "DATA_KINDS", "TOKENIZERS"]

IGNORE_INDEX = -100  # labels with no loss (PyTorch's cross_entropy default, Hugging Face's convention)


@dataclass
class Data:
    """What a recipe's data sections build for one rank."""

    train: DataLoader
    evaluation: Any  # a DataLoader, a list of Composer Evaluators, or None
    tokenizer: Any
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # task metrics beside the LM metrics
    task: Any = None  # loopreg.data.tasks.TaskData for synthetic tasks


@dataclass(frozen=True)
class DataKind:
    """A ``train_data.kind``: ``check(section, where)`` validates one data section of that kind when the recipe
    loads (raising :class:`~loopreg.errors.RecipeError`); ``build(recipe, per_device_batch, world_size, rank,
    pretrained)`` returns this rank's :class:`Data` (``pretrained``: a loaded ``model.pretrained`` or None).

    >>> DATA_KINDS.register("lines")(DataKind(check=my_check, build=my_loaders))  # doctest: +SKIP
    """

    check: Callable[[Any, str], None]
    build: Callable[..., Data]


# train_data.kind -> DataKind
DATA_KINDS: Registry = Registry("data kind")
# tokenizer.kind -> a loader (tokenizer.name) -> Tokenizer
TOKENIZERS: Registry = Registry("tokenizer kind")
