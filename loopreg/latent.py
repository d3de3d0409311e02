"""Latent thoughts (CoT-to-latent distillation, paper Thm 5.4): what a :class:`~loopreg.model.LoopedLM` whose
config names a placeholder token does around its thinking iterations, added to a forward's
:class:`~loopreg.looping.LoopPlan` as hooks.

* ``latent_mask`` (Thm 5.4's masked block, Def. B.3): thinking iteration t updates only the placeholders of CoT
  steps >= t and what follows them; the question and finished steps keep their state, like CoT inputs.
* ``latent_feedback='soft_token'``: after iteration t the placeholders of step t are decoded through the LM head
  and the expected embedding (a soft token) replaces the residual stream of the aligned placeholder of step t+1
  (plus its learned position embedding, if any): the continuous analogue of feeding a decoded CoT token back.

    >>> placeholder_steps(torch.tensor([[5, 3, 3, 3, 3, 6]]), placeholder_id=3, per_step=2)
    tensor([[-1,  0,  0,  1,  1, -1]])

Portable: copied into model folders as remote code (torch and its siblings only).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .looping import LoopPlan

__all__ = ["placeholder_steps", "frozen_after", "mask_finished_steps", "feed_soft_tokens"]


def placeholder_steps(input_ids: torch.Tensor, placeholder_id: int | None, per_step: int) -> torch.Tensor:
    """(B, T): the CoT step each placeholder token stands for (its rank // ``per_step``), -1 for other tokens."""
    if placeholder_id is None:
        return torch.full_like(input_ids, -1)
    is_placeholder = input_ids == placeholder_id
    rank = is_placeholder.long().cumsum(-1) - 1
    return torch.where(is_placeholder, rank // per_step, -1)


def frozen_after(steps: torch.Tensor) -> torch.Tensor:
    """(B, T): the last thinking loop that updates each position under ``latent_mask``: -1 for the question (before
    the first placeholder; never updated, like CoT inputs), j for the placeholders of step j, and "never frozen" for
    everything after them and for rows without any."""
    never = torch.iinfo(steps.dtype).max
    has_latent = steps >= 0
    seen = has_latent.long().cumsum(-1) > 0
    before = ~seen & has_latent.any(-1, keepdim=True)
    return torch.where(has_latent, steps, torch.where(before, -1, never))


def mask_finished_steps(plan: LoopPlan, steps: torch.Tensor) -> None:
    """``latent_mask``: after thinking iteration t, positions frozen before t take back the iteration's input."""
    frozen = frozen_after(steps)
    size = plan.spec.blocks[plan.spec.thinking_block].size
    for loop, end in enumerate(plan.spec.loop_ends):
        loop_input: dict[str, torch.Tensor] = {}
        plan.before(end - size + 1, functools.partial(loop_input.__setitem__, "x"))
        keep = (frozen < loop)[..., None]
        plan.after(end, lambda x, keep=keep, start=loop_input: torch.where(keep, start["x"], x))


def feed_soft_tokens(plan: LoopPlan, model: Any, steps: torch.Tensor, positions: torch.Tensor) -> None:
    """``latent_feedback='soft_token'``: after each thinking iteration, its decoded steps feed the next step."""
    plan.after_each_loop(functools.partial(_feed_soft_tokens, model, steps=steps, positions=positions))


def _feed_soft_tokens(model: Any, x: torch.Tensor, loop: int, steps: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """Thinking iteration ``loop`` done: its placeholders' decoded distributions, as soft tokens, become the next
    step's aligned placeholders."""
    per_step = model.config.placeholders_per_step
    rows, cols = (steps == loop).nonzero(as_tuple=True)
    targets = cols + per_step  # the aligned placeholder of the next step
    inside = targets < steps.shape[1]
    inside[inside.clone()] = steps[rows[inside], targets[inside]] == loop + 1
    if not bool(inside.any()):
        return x
    rows, cols, targets = rows[inside], cols[inside], targets[inside]
    probs = model.lm_head(model.norm(x[rows, cols])).float().softmax(-1)
    soft = probs.to(x.dtype) @ model.embed.weight
    if model.config.learned_positions:  # a fed-back token is an input like any other: token + position
        soft = soft + model.position_embed(positions[rows, targets])
    return x.index_put((rows, targets), soft)
