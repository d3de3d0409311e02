"""The looping core: one plan of layer applications per forward, run by every looped model.

A looped model stores some layers and applies them in the order its loop spec gives. Everything a forward does
around those applications is resolved here once, from the model's spec and the call's options, into a
:class:`LoopPlan`: for each application, which stored layer it is, its KV-cache slot, how it runs (plainly,
checkpointed, without an autograd graph, skippable once every token exited) and the hooks around it (the update
rule, truncated backprop, adaptive exit, hidden-state capture, the latent-thought machinery of
:mod:`loopreg.latent`). :class:`~loopreg.model.LoopedLM` and every Hugging Face family
(:mod:`loopreg.looped_hf`) call :meth:`LoopPlan.apply` at each application with a function that runs the layer;
nothing else about looping lives in them.

    >>> plan = LoopPlan(LoopSpec.parse("1x1+2x3"), loops=2)
    >>> [(step.layer, step.slot) for step in plan.steps]
    [(0, 0), (1, 1), (2, 2), (1, 3), (2, 4)]

Portable: torch, the standard library and its siblings only; copied into model folders as remote code.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.utils.checkpoint

from .adaptive import ExitRule, ExitStats, LoopExit, check_kv_policy
from .errors import UserError
from .spec import LoopSpec
from .update_rules import iteration_hooks

__all__ = ["Step", "LoopPlan", "batch_option", "check_loop_options"]

Before = Callable[[torch.Tensor], None]
After = Callable[[torch.Tensor], torch.Tensor]


def batch_option(value: int | torch.Tensor | None) -> int | None:
    """A per-batch loop option as an int. In a Composer batch it is a (B,) tensor of one repeated value, so
    that Composer can count samples and split the batch into microbatches (it cannot do either with an int).

    >>> batch_option(torch.full((4,), 3)), batch_option(2), batch_option(None)
    (3, 2, None)
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() == 0 or bool((value != value.flatten()[0]).any()):
        raise UserError(f"a per-batch loop option must repeat one value over the batch, got {value.tolist()}")
    return int(value.flatten()[0])


def check_loop_options(spec: LoopSpec, tied: bool, loops: int | Sequence[int] | None = None,
                       grad_loops: int | None = None, exit: ExitRule | None = None,
                       kv_policy: str = "per_application", update: str = "plain", latent: bool = False) -> LoopSpec:
    """The one check of a forward's loop options against its model; returns the spec the forward runs.

    A loop override, an exit rule and the shared KV policy need a tied model (its stored layers *are* the loop;
    truncated backprop also runs untied); an exit rule or the shared policy also needs a looped block, and an exit
    rule plain looping (no latent thoughts either). Each failure is a one-line :class:`~loopreg.errors.UserError`
    naming the option.

    >>> str(check_loop_options(LoopSpec.parse("2x3"), tied=True, loops=5))
    '2x5'
    """
    check_kv_policy(kv_policy)
    asked = [text for given, text in ((loops is not None, f"loops={loops!r}"), (exit is not None, f"exit={exit}"),
                                      (kv_policy != "per_application", f"kv_policy={kv_policy!r}")) if given]
    if asked and not tied:
        raise UserError(f"{', '.join(asked)} needs a tied looped model; this one is untied ('{spec}', "
                        f"{spec.effective_depth} separate layers): snap it to a looped model first")
    if (exit is not None or kv_policy != "per_application") and not spec.is_looped:
        raise UserError(f"{asked[-1] if exit is None else f'exit={exit}'} needs a looped block; "
                        f"loop spec '{spec}' has none")
    if exit is not None and (update != "plain" or latent):
        raise UserError(f"exit={exit} needs plain looping; this model has update={update!r}"
                        f"{' and latent thoughts' if latent else ''}")
    try:
        running = spec.with_loops(loops) if loops is not None else spec
        running.truncated_applications(grad_loops)
    except ValueError as err:  # the spec's own message: a bad loop count or grad_loops
        raise UserError(str(err)) from None
    return running


def _plain(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return run(x)


def _checkpointed(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


def _without_graph(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run(x)


@dataclass
class Step:
    """One layer application of a plan: stored ``layer`` at cache ``slot``, its ``application``-th use in the forward
    (which per-application deltas a relaxed layer adds, :mod:`loopreg.relaxed`), run by ``mode`` between its hooks
    (``before`` see its input; ``after`` map its output, in order). ``skippable``: a later thinking iteration
    that adaptive exit skips once every token has left the loop."""

    layer: int
    slot: int
    application: int = 0
    mode: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor] = _plain
    skippable: bool = False
    before: list[Before] = field(default_factory=list)
    after: list[After] = field(default_factory=list)

    @property
    def plain(self) -> bool:
        return self.mode is _plain and not (self.skippable or self.before or self.after)


class LoopPlan:
    """The layer applications of one forward (see the module docstring).

    ``spec``/``tied``: the model's own layout; ``loops`` and ``grad_loops`` the call's override and truncated
    backprop (``grad_loops=k`` builds the autograd graph of the thinking block's last k iterations only; earlier
    ones count as the identity in backward, Jacobian-free, so the embedding and earlier layers still learn);
    ``update``/``anchor`` the update rule (:mod:`loopreg.update_rules`); ``checkpoint`` recomputes every layer in
    backward; ``latent``: the model adds latent-thought hooks (:mod:`loopreg.latent`). ``exit``/``kv_policy`` are
    adaptive exit and the cache layout (:mod:`loopreg.adaptive`): they need
    ``decode(h) -> logits`` (the final norm and head) and ``scratch()`` (an empty cache for an uncached forward);
    ``real`` (B, T_total) marks real tokens, ``exit_stats`` accumulates the iterations run.

    >>> LoopPlan(LoopSpec.parse("2x2"), tied=False).steps[3].layer  # untied: one stored layer per application
    3
    """

    def __init__(self, spec: LoopSpec, tied: bool = True, loops: int | Sequence[int] | None = None,
                 grad_loops: int | None = None, update: str = "plain", anchor: float = 0.0,
                 checkpoint: bool = False, latent: bool = False, exit: ExitRule | str | None = None,
                 kv_policy: str = "per_application",
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 scratch: Callable[[], Any] | None = None, real: torch.Tensor | None = None,
                 exit_stats: ExitStats | None = None) -> None:
        rule = ExitRule.parse(exit) if exit is not None else None
        self.spec = check_loop_options(spec, tied, batch_option(loops), batch_option(grad_loops), rule, kv_policy,
                                       update, latent)
        schedule = self.spec.schedule if tied else range(self.spec.effective_depth)
        uses: Counter[int] = Counter()  # stored layer -> applications so far (built at every forward: one pass)
        self.steps = []
        for slot, layer in enumerate(schedule):
            self.steps.append(Step(layer, slot, uses[layer]))
            uses[layer] += 1
        self.hidden: dict[int, torch.Tensor] = {}
        if torch.is_grad_enabled():
            if checkpoint:
                for step in self.steps:
                    step.mode = _checkpointed
            self._truncate(self.spec.truncated_applications(batch_option(grad_loops)))
        enter, leave = iteration_hooks(self.spec, update, anchor)
        for slot, hook in enter.items():
            self.steps[slot].before.append(hook)
        for slot, hook in leave.items():
            self.steps[slot].after.append(hook)
        self.looping: LoopExit | None = None
        if rule is not None or kv_policy != "per_application":
            self.looping = LoopExit(self.spec, rule, kv_policy, decode=decode, scratch=scratch, real=real,
                                    stats=exit_stats)
            if rule is not None:
                self._exit_hooks(self.looping)

    # --------------------------------------------------------------- building
    def _truncate(self, skipped: range) -> None:
        """Truncated backprop: ``skipped`` run without a graph; in backward they are the identity from their first
        input to their last output."""
        if not skipped:
            return
        first_input: dict[str, torch.Tensor] = {}
        self.steps[skipped.start].before.append(functools.partial(first_input.__setitem__, "x"))
        for slot in skipped:
            self.steps[slot].mode = _without_graph
        self.steps[skipped.stop - 1].after.append(
            lambda x: x.detach() + (first_input["x"] - first_input["x"].detach()))

    def _exit_hooks(self, looping: LoopExit) -> None:
        """Each thinking iteration's input and output go to ``looping``; the iterations after the first are
        skipped once every token exited."""
        for start, end in zip(looping.starts, looping.loop_ends):
            self.steps[start].before.append(functools.partial(looping.enter, start))
            self.steps[end].after.append(functools.partial(looping.leave, end))
        for slot in looping.later_iterations:
            self.steps[slot].skippable = True

    def before(self, slot: int, hook: Before) -> None:
        """Call ``hook(x)`` with application ``slot``'s input."""
        self.steps[slot].before.append(hook)

    def after(self, slot: int, hook: After) -> None:
        """Map application ``slot``'s output through ``hook``, after the hooks already there."""
        self.steps[slot].after.append(hook)

    def after_each_loop(self, step: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Map the output of thinking iteration t with ``step(x, t)``."""
        for loop, end in enumerate(self.spec.loop_ends):
            self.after(end, functools.partial(step, loop=loop))

    def keep_hidden(self, slots: Iterable[int] | bool) -> None:
        """Record the residual stream after each of ``slots`` (``True``: every application) in :attr:`hidden`."""
        for slot in range(len(self.steps)) if slots is True else slots:
            if not 0 <= slot < len(self.steps):
                raise UserError(f"output_hidden: layer application {slot} is out of range; this forward runs "
                                f"{len(self.steps)} (0..{len(self.steps) - 1})")
            self.after(slot, functools.partial(self._keep, slot))

    def _keep(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        self.hidden[slot] = x
        return x

    # ---------------------------------------------------------------- running
    @property
    def plain(self) -> bool:
        """Nothing between the layers: the caller may run them directly."""
        return self.looping is None and all(step.plain for step in self.steps)

    def cache(self, cache: Any) -> Any:
        """The cache the layers write to: ``cache`` itself, or under adaptive exit or the shared policy the
        wrapper that maps applications to slots and puts exited tokens' keys/values in place."""
        return self.looping.bind(cache) if self.looping is not None else cache

    def apply(self, slot: int, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Application ``slot`` on hidden state ``x``; ``run(x)`` runs its layer and returns the new state."""
        step = self.steps[slot]
        for hook in step.before:
            hook(x)
        if step.skippable and self.looping.skips(slot):  # every token exited: stand-ins fill the slot
            self.looping.cache.fill(slot)
        else:
            x = step.mode(run, x)
        for hook in step.after:
            x = hook(x)
        return x
