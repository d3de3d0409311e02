"""Adaptive exit from the thinking loop, and the key/value policies of a looped model's cache.

After each iteration t of the spec's thinking block a per-token criterion compares the iteration's output h_t with
its input h_{t-1}; a token exits after the first iteration whose criterion is under the threshold, and from then on
keeps its state (its residual stream is put back after every later iteration):

* ``kl``: KL(p_t ‖ p_{t-1}) between the next-token distributions decoded (final norm + LM head) from h_t and h_{t-1};
* ``latent``: ‖h_t − h_{t-1}‖ / ‖h_{t-1}‖.

The test is strict, so threshold 0 never exits: exactly the fixed-loop computation. The compute saved is real at
the batch level: the forward stops iterating as soon as every (real) token of the batch has exited, and the
remaining iterations' layers are not run (see docs/ADAPTIVE.md for why not per token).

KV policy of an exited token ("latest", as Huginn's cache): at every later iteration, the keys/values a block layer
writes for it are replaced, before attention, by the ones that same layer produced at its exit iteration, also for
the iterations skipped by the batch stop. A position's cache entries then depend only on its own exit, so cached
decoding equals recomputing the whole sequence, and a row's result does not depend on the rest of its batch.

Cache layouts (``KV_POLICIES``): ``per_application`` keeps one slot per layer application (exact); ``shared`` one slot
per stored layer: a later iteration overwrites this forward's entries and earlier positions are read at their last
iteration (memory of prelude + block + coda instead of the effective depth; not exact in cached decoding).

Portable like model.py: copied into model folders as remote code (torch, stdlib and relative imports only).

    >>> ExitRule.parse("kl:0.01")
    ExitRule(criterion='kl', threshold=0.01)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import UserError
from .spec import LoopSpec  # relative: copied into model folders as remote code (loopreg.remote_code)

__all__ = ["EXIT_CRITERIA", "KV_POLICIES", "ExitRule", "ExitStats", "ExitCache", "LoopExit", "check_kv_policy"]

EXIT_CRITERIA = ("kl", "latent")
KV_POLICIES = ("per_application", "shared")


@dataclass(frozen=True)
class ExitRule:
    """When a token leaves the thinking loop: after the first iteration whose ``criterion`` is ``< threshold``.

    >>> ExitRule.parse("latent:0.05").threshold, str(ExitRule("kl", 0.01))
    (0.05, 'kl:0.01')
    """

    criterion: str
    threshold: float

    def __post_init__(self) -> None:
        if self.criterion not in EXIT_CRITERIA:
            raise UserError(f"--exit: unknown criterion {self.criterion!r} in '{self.criterion}:{self.threshold}'; "
                             f"valid: {', '.join(EXIT_CRITERIA)}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= float(self.threshold) < float("inf"):
            raise UserError(f"--exit: threshold {self.threshold!r} in '{self.criterion}:{self.threshold}' "
                             "must be a finite number >= 0")

    @classmethod
    def parse(cls, text: str | ExitRule) -> ExitRule:
        """``'kl:0.01'`` or ``'latent:0.05'``; a malformed rule raises a one-line ``UserError``."""
        if isinstance(text, ExitRule):
            return text
        criterion, sep, threshold = str(text).strip().partition(":")
        if not sep:
            raise UserError(f"--exit: {text!r} is not CRITERION:THRESHOLD (e.g. kl:0.01); "
                             f"valid criteria: {', '.join(EXIT_CRITERIA)}")
        try:
            value = float(threshold)
        except ValueError:
            raise UserError(f"--exit: threshold {threshold.strip()!r} in {text!r} is not a number") from None
        return cls(criterion.strip(), value)

    def __str__(self) -> str:
        return f"{self.criterion}:{self.threshold:g}"

    def measure(self, h: torch.Tensor, h_prev: torch.Tensor,
                decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The criterion per token (B, T) between an iteration's output ``h`` and its input ``h_prev`` (B, T, d)."""
        if self.criterion == "latent":
            return (h - h_prev).float().norm(dim=-1) / h_prev.float().norm(dim=-1).clamp_min(1e-12)
        log_p, log_q = (F.log_softmax(decode(state).float(), dim=-1) for state in (h, h_prev))
        return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # rounding can make it a hair below 0


def check_kv_policy(kv_policy: str) -> None:
    """Raise a one-line ``UserError`` for an unknown KV policy.

    >>> check_kv_policy("shared")
    """
    if kv_policy not in KV_POLICIES:
        raise UserError(f"unknown kv_policy {kv_policy!r}; valid: {', '.join(KV_POLICIES)}")


class ExitStats:
    """Accumulates the thinking iterations of the forwards it is passed to: ``mean_loops`` is the mean iteration
    tokens exited at (the block's loop count when they never did), ``executed_loops`` the iterations actually
    computed per token (larger: a batch keeps iterating until its slowest token exits).

    >>> stats = ExitStats(); stats.record(torch.tensor([1, 3]), executed=3, max_loops=4); stats.as_dict()
    {'tokens': 2, 'mean_loops': 2.0, 'executed_loops': 3.0, 'max_loops': 4}
    """

    def __init__(self) -> None:
        self.tokens, self.max_loops = 0, 0
        self._loops, self._executed = 0, 0

    def record(self, exit_loops: torch.Tensor, executed: int, max_loops: int) -> None:
        """One forward: the iteration each of its tokens exited at, and the iterations it computed."""
        self.tokens += exit_loops.numel()
        self._loops += int(exit_loops.sum())
        self._executed += executed * exit_loops.numel()
        self.max_loops = max(self.max_loops, max_loops)

    @property
    def mean_loops(self) -> float:
        return self._loops / self.tokens if self.tokens else 0.0

    @property
    def executed_loops(self) -> float:
        return self._executed / self.tokens if self.tokens else 0.0

    def merge(self, other: ExitStats) -> ExitStats:
        """Add ``other``'s forwards to these; returns ``self``."""
        self.tokens += other.tokens
        self._loops += other._loops
        self._executed += other._executed
        self.max_loops = max(self.max_loops, other.max_loops)
        return self

    def as_dict(self) -> dict[str, float | int]:
        return {"tokens": self.tokens, "mean_loops": self.mean_loops, "executed_loops": self.executed_loops,
                "max_loops": self.max_loops}


class ExitCache:
    """The cache protocol (``update``/``get_seq_length``) over a model's own cache, for one forward: maps a layer
    application to its slot (``slots``: per application, or the stored layer under ``shared``), puts the stand-in
    keys/values of exited tokens in place, and under ``shared`` overwrites this forward's entries when a slot is
    written again. One wrapper serves LoopedLM and the retrofits, over transformers' caches."""

    def __init__(self, cache: Any, slots: Sequence[int], thinking: range, block_size: int, shared: bool) -> None:
        self.cache, self.slots, self.thinking, self.block_size, self.shared = cache, slots, thinking, block_size, shared
        self.active: torch.Tensor | None = None  # (B, T) tokens still iterating; None while all are
        self.latest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block layer -> its newest keys/values
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # shared slot -> all its keys/values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(self.slots[layer_idx])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.thinking:
            layer = (layer_idx - self.thinking.start) % self.block_size
            if self.active is not None:  # exited tokens: the keys/values of their exit iteration stand in
                keep = self.active[:, None, :, None]
                stand_k, stand_v = self.latest[layer]
                key_states, value_states = torch.where(keep, key_states, stand_k), torch.where(keep, value_states,
                                                                                               stand_v)
            self.latest[layer] = key_states, value_states
        slot = self.slots[layer_idx]
        if slot in self.written:  # shared: a later iteration overwrites this forward's positions
            keys, values = self.written[slot]
            keys[:, :, -key_states.shape[2]:] = key_states
            values[:, :, -value_states.shape[2]:] = value_states
            return keys, values
        # the layer's own extra arguments (4.x `cache_kwargs`, 5.x `kwargs=`) go through to the cache
        keys, values = self.cache.update(key_states, value_states, slot, *args, **kwargs)
        if self.shared:
            self.written[slot] = keys, values
        return keys, values

    def fill(self, layer_idx: int) -> None:
        """A skipped application (every token exited): its slot receives the stand-ins, as if it had run."""
        if not self.shared:  # a shared slot already holds them
            layer = (layer_idx - self.thinking.start) % self.block_size
            self.cache.update(*self.latest[layer], self.slots[layer_idx])


class LoopExit:
    """One forward's adaptive exit and KV policy, as hooks around the layer applications of the thinking block:
    ``enter``/``leave`` at each iteration's first/last application (installed with a ``rule`` only; without one
    this is the KV policy alone), ``skips`` once every token exited (then ``cache.fill`` stands in for the layer),
    and ``bind`` for the cache the layers write to.

    ``decode(h) -> logits`` is the model's final norm and head (the ``kl`` criterion); ``real`` (B, T_total) marks
    real tokens (1) and padding (0): padding neither holds the batch in the loop nor counts in ``stats``;
    ``scratch()`` makes an empty cache for a forward that has none, so cached and uncached compute the same.
    """

    def __init__(self, spec: LoopSpec, rule: ExitRule | None, kv_policy: str,
                 decode: Callable[[torch.Tensor], torch.Tensor], scratch: Callable[[], Any],
                 real: torch.Tensor | None = None, stats: ExitStats | None = None) -> None:
        block = spec.blocks[spec.thinking_block]
        self.rule, self.decode, self.scratch, self.real, self.stats = rule, decode, scratch, real, stats
        self.loop_ends = spec.loop_ends
        self.starts = tuple(end - block.size + 1 for end in self.loop_ends)
        thinking = range(self.starts[0], self.loop_ends[-1] + 1)
        slots = spec.schedule if kv_policy == "shared" else range(spec.effective_depth)
        self.cache = ExitCache(None, slots, thinking, block.size, shared=kv_policy == "shared")
        self.exit_loops: torch.Tensor | None = None  # (B, T) the iteration each token exited after
        self.executed, self.done = 0, False
        self._loop_input: torch.Tensor | None = None

    def bind(self, cache: Any) -> ExitCache:
        """The wrapper the layers write to, over ``cache`` (a scratch one when ``None``); bound once per forward."""
        if self.cache.cache is None:
            self.cache.cache = cache if cache is not None else self.scratch()
        return self.cache

    @property
    def later_iterations(self) -> range:
        """The layer applications of the thinking block's iterations after the first: those a batch stop skips."""
        return self.cache.thinking[self.cache.block_size:]

    def skips(self, application: int) -> bool:
        return self.done and application in self.cache.thinking

    def enter(self, application: int, h: torch.Tensor) -> None:
        """Before the first layer of a thinking iteration (an application in :attr:`starts`)."""
        if not self.done:
            self._loop_input = h

    def leave(self, application: int, h: torch.Tensor) -> torch.Tensor:
        """After the last layer of a thinking iteration (an application in :attr:`loop_ends`): exited tokens take
        their state back, newly converged tokens exit, and the batch stops once no real token is left."""
        if self.done:
            return h
        loop = self.loop_ends.index(application)
        self.executed = loop + 1
        if self.exit_loops is None:  # the first iteration: every token is still in the loop
            self.exit_loops = torch.full(h.shape[:2], len(self.loop_ends), device=h.device)
        if self.cache.active is None:
            active = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        else:  # exited tokens keep their state: the one this iteration started from
            active = self.cache.active
            h = torch.where(active[..., None], h, self._loop_input)
        exits = active & (self.rule.measure(h, self._loop_input, self.decode) < self.rule.threshold)
        if bool(exits.any()):
            self.exit_loops[exits] = loop + 1
            active = self.cache.active = active & ~exits
        real = self._real(h)
        self.done = not bool((active & real).any())
        if (self.done or loop == len(self.loop_ends) - 1) and self.stats is not None:
            self.stats.record(self.exit_loops[real], self.executed, len(self.loop_ends))
        return h

    def _real(self, h: torch.Tensor) -> torch.Tensor:
        if self.real is None:
            return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return self.real[:, -h.shape[1]:].bool()
