"""Endless training streams that N ranks and W DataLoader workers share, with an exact resume position.

The stream is a sequence of examples with global indices 0, 1, 2, ...; global batch j holds indices
``[start + j·B, start + (j+1)·B)`` for the global batch B = ``batch_size · world_size``. Rank r takes the
indices ≡ r (mod N) of each global batch, and DataLoader worker w of W makes the rank's batches j ≡ w
(mod W) (the DataLoader takes batches from its workers round robin). So every global batch is the same
set of examples whatever N and W are, the examples consumed after k batches are exactly the first k·B,
and the position is one number: Composer's sample count.

    >>> list(islice(positions(start=0, rank=1, world_size=2, batch_size=2, worker=0, workers=1), 4))
    [1, 3, 5, 7]

Composer 0.32.1 saves ``dataset.state_dict(num_samples, from_beginning)`` in the checkpoint and calls
``dataset.load_state_dict`` on resume instead of spinning the dataloader through the consumed batches.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["ResumableStream", "positions"]


def positions(start: int, rank: int, world_size: int, batch_size: int, worker: int, workers: int) -> Iterator[int]:
    """Global indices that ``worker`` of ``workers`` on ``rank`` yields, in order, from ``start`` on.

    >>> list(islice(positions(10, rank=0, world_size=1, batch_size=2, worker=1, workers=2), 4))
    [12, 13, 16, 17]
    """
    global_batch = batch_size * world_size
    batch = worker
    while True:
        first = start + batch * global_batch + rank
        yield from range(first, first + global_batch, world_size)
        batch += workers


class ResumableStream(IterableDataset):
    """Base of the training streams: rank/worker sharding (:func:`positions`) and the resume position.

    Subclasses iterate :meth:`my_positions` and yield the example at each index.

    >>> stream = ResumableStream(rank=0, world_size=2, batch_size=4)
    >>> stream.load_state_dict(stream.state_dict(num_samples=24, from_beginning=True)); stream.start
    24
    """

    def __init__(self, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.start = 0  # global index of the first example to yield (a resume moves it)

    def my_positions(self) -> Iterator[int]:
        """The global indices this rank (and this DataLoader worker, inside one) yields."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return positions(self.start, self.rank, self.world_size, self.batch_size, worker, workers)

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """The resume position after ``num_samples`` examples (all ranks together), counted from the
        stream's beginning or, with ``from_beginning=False``, from the current start."""
        return {"sample": num_samples if from_beginning else self.start + num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the position :meth:`state_dict` recorded (under any world size or worker count)."""
        self.start = int(state["sample"])
