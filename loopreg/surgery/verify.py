"""Check a surgery result against its source on a few fixed prompts: max |Δlogit| and greedy agreement
(greedy continuations run through each model's KV-cache ``generate``).

    >>> # before = probe(model, prompts); loop_surgery(model, spec); compare(before, probe(model, prompts))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loopreg.surgery.adapters import find_adapter, unwrap

__all__ = ["PROMPTS", "verification_prompts", "Probe", "probe", "Agreement", "compare"]

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Question: what is 12 + 7?\nAnswer:", "Once upon a time")


def verification_prompts(model: nn.Module, tokenizer: Any | None = None, count: int = 4,
                         length: int = 12) -> list[torch.Tensor]:
    """``count`` prompts of shape (1, T): :data:`PROMPTS` through ``tokenizer``, or fixed random token ids
    (seed 0) when there is none."""
    if tokenizer is not None:
        return [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS[:count]]
    causal_lm = unwrap(model)
    vocab = causal_lm.get_submodule(find_adapter(causal_lm).embeddings[0]).num_embeddings
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, length), generator=generator) for _ in range(count)]


@dataclass
class Probe:
    """Prompt logits and greedy continuations of one model, one entry per prompt."""

    logits: list[torch.Tensor]
    greedy: list[torch.Tensor]


@torch.no_grad()
def probe(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int = 8) -> Probe:
    """Full-prompt logits (fp32) and ``new_tokens`` greedy tokens per prompt (EOS suppressed so both models
    always produce the same number of tokens)."""
    causal_lm = unwrap(model)
    device = next(causal_lm.parameters()).device
    logits, greedy = [], []
    for prompt in prompts:
        prompt = prompt.to(device)
        logits.append(causal_lm(prompt).logits.float().cpu())
        out = causal_lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=causal_lm.config.pad_token_id or 0)
        greedy.append(out[:, prompt.shape[1]:].cpu())
    return Probe(logits, greedy)


@dataclass(frozen=True)
class Agreement:
    """How close a surgery result stays to its source."""

    max_abs_logit_diff: float
    greedy_matches: int
    greedy_total: int

    def __str__(self) -> str:
        share = self.greedy_matches / max(self.greedy_total, 1)
        return (f"max |Δlogit| = {self.max_abs_logit_diff:.3g}; greedy agreement {self.greedy_matches}/"
                f"{self.greedy_total} tokens ({share:.0%})")


def compare(before: Probe, after: Probe) -> Agreement:
    """Max |Δlogit| over every prompt position and the count of equal greedy tokens."""
    diff = max((a - b).abs().max().item() for a, b in zip(before.logits, after.logits))
    matches = sum(int((a == b).sum()) for a, b in zip(before.greedy, after.greedy))
    total = sum(a.numel() for a in before.greedy)
    return Agreement(diff, matches, total)
