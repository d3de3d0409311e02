"""Token-weighted perplexity of any causal LM on a text source, with the model's own tokenizer.

    >>> result = perplexity(model, tokenizer, "/work/shared/textdata/wiki_passages_heldout.jsonl")  # doctest: +SKIP
    >>> result.ppl, result.tokens  # doctest: +SKIP

Works for a loopreg ``LoopedLM`` with its ``tokenizers.Tokenizer`` and for any Hugging Face causal LM
(plain, or a tied looped surgery output) with its Hugging Face tokenizer.

How the text is scored:

* documents come from :func:`loopreg.data.text.text_stream` (``.txt`` files, ``.jsonl`` rows' ``text``,
  folders, hub datasets); each is tokenized without special tokens and followed by EOS, as in training;
* the stream is cut into non-overlapping windows of ``seq_len`` tokens; the **last partial window is
  dropped**, so every window has the same length and context budget;
* BOS: when the tokenizer adds one (Llama-style HF tokenizers, loopreg tokenizers with ``<bos>``) every
  window is ``BOS`` + ``seq_len - 1`` text tokens, so every text token is predicted exactly once; without
  a BOS the first token of each window is context only;
* each window predicts its ``seq_len - 1`` next tokens (exactly what ``model(input_ids=w, labels=w).loss``
  averages); ``nll`` is the mean over all predicted tokens of all windows and ``ppl = exp(nll)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from loopreg.errors import UserError

__all__ = ["DEFAULT_MAX_TOKENS", "PerplexityResult", "perplexity", "text_windows"]

DEFAULT_MAX_TOKENS = 32768  # 64 windows of 512: a stable estimate that a 135M model scores in a minute on CPU


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean next-token NLL (nats) over ``tokens`` predictions in ``windows``.

    Example: ``PerplexityResult(ppl=math.e, nll=1.0, tokens=511, windows=1)``
    """

    ppl: float
    nll: float
    tokens: int
    windows: int


def _special_ids(tokenizer: Any) -> tuple[int, int | None]:
    """``(eos, bos)`` of an HF tokenizer or a ``tokenizers.Tokenizer``; ``bos`` only if it prefixes inputs."""
    if hasattr(tokenizer, "convert_tokens_to_ids"):  # Hugging Face
        if tokenizer.eos_token_id is None:
            raise UserError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token to join documents with")
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        return tokenizer.eos_token_id, bos if adds_bos else None
    from loopreg.data.text import eos_id

    # loopreg's synthetic-task tokenizers carry "<bos>" and their models were trained with it in front
    return eos_id(tokenizer), tokenizer.token_to_id("<bos>")


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.encode(text, add_special_tokens=False).ids


def _windows(tokenizer: Any, source: str, seq_len: int, text_field: str) -> Iterator[list[int]]:
    from loopreg.data.text import text_stream

    eos, bos = _special_ids(tokenizer)
    prefix = [bos] if bos is not None else []
    width = seq_len - len(prefix)
    buffer: list[int] = []
    for document in text_stream(source, text_field=text_field)():
        buffer.extend(_encode(tokenizer, document) + [eos])
        while len(buffer) >= width:
            yield prefix + buffer[:width]
            buffer = buffer[width:]


def text_windows(tokenizer: Any, source: str, seq_len: int, max_windows: int | None = None,
                 text_field: str = "text") -> torch.Tensor:
    """The ``(windows, seq_len)`` token ids :func:`perplexity` scores (see the module docstring).

    A source shorter than one window raises a one-line :class:`~loopreg.errors.UserError` naming it.

    Example: ``text_windows(tokenizer, "heldout.jsonl", seq_len=512, max_windows=8).shape`` -> ``(8, 512)``
    """
    if seq_len < 2:
        raise UserError(f"seq_len must be >= 2 (one context and one predicted token), got {seq_len}")
    rows: list[list[int]] = []
    for window in _windows(tokenizer, source, seq_len, text_field):
        if max_windows is not None and len(rows) >= max_windows:
            break
        rows.append(window)
    if not rows:
        raise UserError(f"{source}: the text is shorter than one window of {seq_len} tokens; "
                         "give more text or a smaller sequence length")
    return torch.tensor(rows, dtype=torch.long)


def _model_context(model: nn.Module) -> int | None:
    """The longest input ``model`` was built for (``max_seq_len`` / ``max_position_embeddings``), if known."""
    config = model.config
    return getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", None)


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer: Any, source: str, *, seq_len: int | None = None,
               max_tokens: int | None = DEFAULT_MAX_TOKENS, loops: int | Sequence[int] | None = None,
               batch_size: int = 4, text_field: str = "text", exit: Any = None,
               exit_stats: Any = None) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on ``source`` read with ``tokenizer`` (module docstring).

    ``seq_len`` defaults to ``min(512, model context)``; ``max_tokens`` caps the predicted tokens (whole
    windows: the first ``ceil(max_tokens / (seq_len - 1))``; ``None`` reads all the text); ``loops`` is
    passed to the forward (``model(input_ids, loops=loops)``) only when given, so plain HF models work;
    so are an adaptive ``exit`` rule and the ``exit_stats`` that count its thinking iterations
    (:mod:`loopreg.adaptive`; uncached, so the KV policy does not matter). The model is put in eval mode.

    Example: ``perplexity(model, tokenizer, "heldout.jsonl", seq_len=256, loops=4).ppl``
    """
    context = _model_context(model)
    seq_len = seq_len if seq_len is not None else min(512, context or 512)
    if context is not None and seq_len > context:
        raise UserError(f"sequence length {seq_len} exceeds the model's context of {context} tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    max_windows = None if max_tokens is None else math.ceil(max_tokens / (seq_len - 1))
    windows = text_windows(tokenizer, source, seq_len, max_windows, text_field)
    model.eval()
    device = next(model.parameters()).device
    extra = {} if loops is None else {"loops": loops}
    if exit is not None:
        extra.update(exit=exit, exit_stats=exit_stats)
    total = 0.0
    for batch in windows.to(device).split(batch_size):
        logits = model(input_ids=batch, **extra).logits
        total += nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                             reduction="sum").item()
    tokens = windows.shape[0] * (seq_len - 1)
    nll = total / tokens
    return PerplexityResult(math.exp(nll), nll, tokens, windows.shape[0])
