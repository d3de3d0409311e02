"""Composer wrapper for :class:`~loopreg.model.LoopedLM`: loss and LM metrics.

Batches are dicts with ``input_ids`` (B, T) and ``labels`` (B, T) already aligned with the inputs
(``labels[:, t]`` is the target at position t, ``-100`` = no loss), so answer-only and per-position
supervision (synthetic tasks) use the same loss as packed text.

    >>> model = ComposerLoopedLM(LoopedLMConfig(spec="2x2", vocab_size=32, d_model=16, n_heads=2))

A pretrained Hugging Face causal LM (a recipe's ``model.pretrained``) is a :class:`PretrainedLM`, Composer's
``HuggingFaceModel``; its batches follow Hugging Face's convention (``labels`` equal ``input_ids``, the
model shifts them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import ComposerModel, HuggingFaceModel
from torchmetrics import Metric

from loopreg.data import IGNORE_INDEX
from loopreg.looping import batch_option
from loopreg.model import LoopedLM, LoopedLMConfig

__all__ = ["ComposerLoopedLM", "PretrainedLM"]


class ComposerLoopedLM(ComposerModel):
    """A :class:`LoopedLM` as a Composer model; ``self.model`` is the LoopedLM (a transformers model).

    ``extra_eval_metrics`` adds task metrics (e.g. answer exact match) next to cross entropy,
    perplexity and token accuracy. Per-batch loop options (``loops``, ``grad_loops``; see
    :func:`~loopreg.model.batch_option`) travel in the batch.
    """

    def __init__(self, config: LoopedLMConfig | LoopedLM, extra_eval_metrics: dict[str, Metric] | None = None) -> None:
        super().__init__()
        self.model = config if isinstance(config, nn.Module) else LoopedLM(config)
        self.train_metrics = self._lm_metrics()
        self.eval_metrics = {**self._lm_metrics(), **(extra_eval_metrics or {})}

    @staticmethod
    def _lm_metrics() -> dict[str, Metric]:
        return {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
            "TokenAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX),
        }

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs (forward + backward = 3x forward) of one batch, counting every layer application;
        Composer's SpeedMonitor turns this into MFU."""
        config, spec = self.model.config, self.model.spec
        depth = (spec.with_loops(batch_option(batch["loops"])) if "loops" in batch else spec).effective_depth
        batch_size, length = batch["input_ids"].shape
        layer_params = sum(p.numel() for p in self.model.layers[0].parameters())
        matmul = 2 * (layer_params * depth + config.d_model * config.vocab_size) * batch_size * length
        attention = 2 * 2 * depth * config.d_model * length * length * batch_size
        return 3.0 * (matmul + attention)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], **self.loop_options(batch)).logits

    @staticmethod
    def loop_options(batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """The per-batch loop options in ``batch`` (RandomLoops, CoTDistillation) as forward keywords.

        >>> ComposerLoopedLM.loop_options({"input_ids": torch.zeros(2, 3), "loops": torch.full((2,), 4)})
        {'loops': 4}
        """
        return {key: batch_option(batch[key]) for key in ("loops", "grad_loops") if key in batch}

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)

    def loss_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets :meth:`loss` averages over in ``batch`` (the trainer weighs microbatches and ranks
        by it, so the loss is the mean over every target of the global batch however the batch is split)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric: Metric) -> None:
        if isinstance(metric, (LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy)):
            metric.update(outputs, batch["labels"])
        else:  # task metrics read the batch themselves (e.g. which positions form the answer)
            metric.update(outputs, batch)


class PretrainedLM(HuggingFaceModel):
    """Composer's ``HuggingFaceModel`` for a pretrained causal LM (plain, or a loop-surgery output) with cross
    entropy (train and eval) and perplexity (eval); ``self.model`` is the Hugging Face module. (Loop surgery
    at ``INIT`` refreshes the batch keys the wrapper passes: see ``apply_loop_surgery``.)

    >>> # PretrainedLM(load(smollm2_gguf()), load_source_tokenizer(smollm2_gguf()))
    """

    def __init__(self, model: Any, tokenizer: Any | None = None) -> None:
        super().__init__(model, tokenizer, use_logits=True, metrics=[LanguageCrossEntropy()],
                         eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()], shift_labels=True)

    def loss_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets the shifted loss averages over in ``batch`` (see ``ComposerLoopedLM.loss_targets``)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
