"""How looped is the model during training: block-pair cosines logged at an interval, heatmaps at fit end.

For every parameter group (attention Q, MLP down projection, …) and every two blocks a < b of the loop
layout, logs ``loop_similarity/<group>/block<a>_block<b>``: the mean cosine between the position-aligned
layers of the two blocks. At fit end writes ``<save_folder>/loop_similarity/<group>.png``, a block × block
heatmap like the paper's Fig. 5.

    >>> # Trainer(..., callbacks=[LoopSimilarityMonitor(interval="100ba", block_size=4)])
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from loopreg.algorithms.loop_regularizer import block_similarity
from loopreg.checkpoints import run_folder

__all__ = ["LoopSimilarityMonitor", "plot_block_similarity"]


def plot_block_similarity(matrices: dict[str, torch.Tensor], folder: str | Path, title: str = "") -> list[Path]:
    """One heatmap PNG per group (``<folder>/<group>.png``) of a :func:`block_similarity` result.

    >>> # plot_block_similarity(block_similarity(model, block_size=4), "runs/x/loop_similarity")
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for group, matrix in matrices.items():
        blocks = matrix.shape[0]
        figure, axes = plt.subplots(figsize=(1.0 + 0.6 * blocks, 0.6 + 0.6 * blocks))
        image = axes.imshow(matrix.numpy(), cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0)
        for a in range(blocks):
            for b in range(blocks):
                axes.text(b, a, f"{float(matrix[a, b]):.2f}", ha="center", va="center", fontsize=7,
                          color="black" if matrix[a, b] > 0.6 else "white")
        axes.set_xticks(range(blocks))
        axes.set_yticks(range(blocks))
        axes.set_xlabel("block")
        axes.set_ylabel("block")
        axes.set_title(f"{title} {group}".strip(), fontsize=9)
        figure.colorbar(image, ax=axes, fraction=0.046, label="cosine")
        figure.tight_layout()
        paths.append(folder / f"{group}.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    return paths


class LoopSimilarityMonitor(Callback):
    """Logs every block pair's cosine per group every ``interval`` and writes heatmaps at fit end.

    Args:
        interval: how often to log (a Composer time string, e.g. ``"100ba"``).
        block_size, blocks, include_norms: the loop layout and groups, as for
            :func:`~loopreg.algorithms.loop_similarity` (default: an untied ``LoopedLM``'s own spec).
        folder: where the heatmaps go; default ``<save_folder>/loop_similarity`` (``<run_name>/…`` unsaved).
    """

    def __init__(self, interval: str = "100ba", block_size: int | None = None,
                 blocks: Sequence[Sequence[int]] | None = None, include_norms: bool = False,
                 folder: str | None = None) -> None:
        self.should_log = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False,
                                                    final_events={Event.BATCH_END})
        self.layout = dict(block_size=block_size, blocks=blocks, include_norms=include_norms)
        self.folder = folder
        self.heatmaps: list[Path] = []

    def init(self, state: State, logger: Logger) -> None:
        block_similarity(state.model, **self.layout)  # a bad layout fails before training, not at the first log

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.should_log(state, Event.BATCH_END):
            return
        metrics = {}
        for group, matrix in block_similarity(state.model, **self.layout).items():
            for a in range(matrix.shape[0]):
                for b in range(a + 1, matrix.shape[0]):
                    metrics[f"loop_similarity/{group}/block{a}_block{b}"] = float(matrix[a, b])
        logger.log_metrics(metrics)

    def fit_end(self, state: State, logger: Logger) -> None:
        matrices = block_similarity(state.model, **self.layout)  # a collective under FSDP: every rank computes
        if dist.get_global_rank() == 0:
            folder = Path(self.folder) if self.folder else run_folder(state) / "loop_similarity"
            self.heatmaps = plot_block_similarity(matrices, folder, title=f"{state.run_name} @ {state.timestamp.batch}")
